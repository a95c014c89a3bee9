"""BERT WordPiece tokenizer in pure Python, from a checkpoint's vocab.txt.

A pretrained BERT is only useful with the ids it was trained on, and the
project must run without `transformers`/`tokenizers`. This reproduces the
Hugging Face BERT tokenizer (`tokenizer.json`'s BertNormalizer ->
BertPreTokenizer -> WordPiece -> [CLS] ... [SEP]) for uncased models:

1. clean: drop NUL, U+FFFD and control characters (categories C*, except
   tab/newline/CR), turn whitespace into spaces;
2. put spaces around CJK ideographs (each becomes its own word);
3. strip accents (NFD, drop nonspacing marks) and lowercase, in the fast
   tokenizer's order (`strip_accents` follows `lowercase` unless set);
4. split on whitespace and around every punctuation character (Unicode P*
   and all ASCII punctuation, e.g. '$', '+', '^');
5. greedy longest-match WordPiece with the '##' continuation prefix; a word
   longer than 100 characters or with an unmatched piece is one [UNK].

`tests/test_hf.py` checks the ids against the HF tokenizer's on varied
text (`tests/fixtures/minilm_reference.npz`).
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata
from typing import Iterable, Sequence

import numpy as np

# CJK Unified Ideographs blocks (as BERT defines "Chinese characters";
# Hiragana, Katakana and Hangul are not among them).
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
        (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
        (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_control(c: str) -> bool:
  if c in '\t\n\r':
    return False
  return unicodedata.category(c).startswith('C')


def _is_whitespace(c: str) -> bool:
  return c in '\t\n\r ' or c.isspace()


def _is_punctuation(c: str) -> bool:
  cp = ord(c)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(c).startswith('P')


def _is_cjk(c: str) -> bool:
  cp = ord(c)
  return any(lo <= cp <= hi for lo, hi in _CJK)


class WordPieceTokenizer:
  """`encode(texts, max_len)` -> int32 `[N, max_len]` BERT input ids.

  Build from a vocab file (`WordPieceTokenizer(path)`), a token list, or a
  HF model directory (`from_dir`, which also reads tokenizer_config.json's
  casing options).
  """

  def __init__(self, vocab: str | Sequence[str], lowercase: bool = True,
               strip_accents: bool | None = None,
               tokenize_chinese_chars: bool = True, unk_token: str = '[UNK]',
               cls_token: str = '[CLS]', sep_token: str = '[SEP]',
               pad_token: str = '[PAD]', max_chars_per_word: int = 100):
    if isinstance(vocab, str):
      if not os.path.isfile(vocab):
        raise FileNotFoundError(f'{vocab}: no such vocab file.')
      with open(vocab, encoding='utf-8') as f:
        vocab = [line.rstrip('\n') for line in f]
    self.vocab = {tok: i for i, tok in enumerate(vocab)}
    self.inv_vocab = list(vocab)
    missing = [t for t in (unk_token, cls_token, sep_token, pad_token)
               if t not in self.vocab]
    if missing:
      raise ValueError(f'special tokens {missing} are not in the vocab.')
    self.lowercase = lowercase
    self.strip_accents = lowercase if strip_accents is None else strip_accents
    self.tokenize_chinese_chars = tokenize_chinese_chars
    self.unk_id = self.vocab[unk_token]
    self.cls_id = self.vocab[cls_token]
    self.sep_id = self.vocab[sep_token]
    self.pad_id = self.vocab[pad_token]
    self.max_chars_per_word = max_chars_per_word
    self._word_ids = functools.lru_cache(maxsize=65536)(self._wordpiece)

  @classmethod
  def from_dir(cls, hf_dir: str) -> WordPieceTokenizer:
    """From `hf_dir/vocab.txt` and, if present, tokenizer_config.json."""
    kwargs = {}
    path = os.path.join(hf_dir, 'tokenizer_config.json')
    if os.path.isfile(path):
      with open(path) as f:
        tc = json.load(f)
      for key, ours in (('do_lower_case', 'lowercase'),
                        ('strip_accents', 'strip_accents'),
                        ('tokenize_chinese_chars', 'tokenize_chinese_chars')):
        if key in tc:
          kwargs[ours] = tc[key]
      for key in ('unk_token', 'cls_token', 'sep_token', 'pad_token'):
        if isinstance(tc.get(key), str):
          kwargs[key] = tc[key]
    return cls(os.path.join(hf_dir, 'vocab.txt'), **kwargs)

  # -- text -> words ------------------------------------------------------

  def normalize(self, text: str) -> str:
    chars = []
    for c in text:
      if c == '\0' or c == '\ufffd' or _is_control(c):
        continue
      if _is_whitespace(c):
        chars.append(' ')
      elif self.tokenize_chinese_chars and _is_cjk(c):
        chars.extend((' ', c, ' '))
      else:
        chars.append(c)
    text = ''.join(chars)
    if self.strip_accents:
      text = ''.join(c for c in unicodedata.normalize('NFD', text)
                     if unicodedata.category(c) != 'Mn')
    if self.lowercase:
      text = text.lower()
    return text

  def words(self, text: str) -> list[str]:
    """Normalised text split on whitespace and around punctuation."""
    out, cur = [], []
    for c in self.normalize(text):
      if _is_whitespace(c) or _is_punctuation(c):
        if cur:
          out.append(''.join(cur))
          cur = []
        if not _is_whitespace(c):
          out.append(c)
      else:
        cur.append(c)
    if cur:
      out.append(''.join(cur))
    return out

  # -- words -> ids -------------------------------------------------------

  def _wordpiece(self, word: str) -> tuple[int, ...]:
    if len(word) > self.max_chars_per_word:
      return (self.unk_id,)
    ids, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else '##' + word[start:end]
        if piece in self.vocab:
          ids.append(self.vocab[piece])
          break
        end -= 1
      else:
        return (self.unk_id,)
      start = end
    return tuple(ids)

  def tokenize_ids(self, text: str) -> list[int]:
    """WordPiece ids of `text`, without [CLS]/[SEP]."""
    return [i for w in self.words(text) for i in self._word_ids(w)]

  def tokenize(self, text: str) -> list[str]:
    return [self.inv_vocab[i] for i in self.tokenize_ids(text)]

  def encode(self, texts: str | Iterable[str], max_len: int) -> np.ndarray:
    """int32 `[N, max_len]`: [CLS] pieces [SEP], then [PAD] padding.

    Pieces beyond `max_len - 2` are cut (HF `truncation=True`), so [SEP]
    always ends the sequence.
    """
    if max_len < 2:
      raise ValueError(f'max_len={max_len} leaves no room for [CLS] [SEP].')
    if isinstance(texts, str):
      texts = [texts]
    rows = []
    for text in texts:
      ids = self.tokenize_ids(text)[:max_len - 2]
      row = [self.cls_id, *ids, self.sep_id]
      rows.append(row + [self.pad_id] * (max_len - len(row)))
    return np.asarray(rows, np.int32).reshape(-1, max_len)

  def decode(self, ids: Iterable[int]) -> str:
    """Pieces joined back ('##' glued on), special tokens dropped."""
    skip = {self.cls_id, self.sep_id, self.pad_id}
    out = ''
    for i in ids:
      if int(i) in skip:
        continue
      tok = self.inv_vocab[int(i)]
      out += tok[2:] if tok.startswith('##') else (' ' + tok if out else tok)
    return out
