"""The Python standard library's docstrings as an offline text-classification task.

CAFF's claim (Pfeiffer et al. 2024) is about pretrained transformers, and
the text arm of `benchmarks/caff_vs_lora.py` needs a sentence task that a
pretrained language model (the shipped all-MiniLM-L6-v2) can be fine-tuned
on without a download. The stdlib is on every machine that runs this
project, and its docstrings are English prose by many authors, grouped by
package. The task: given one docstring paragraph, which of `TOPICS` (ten
top-level packages, present from Python 3.9 to 3.13) it comes from.

Examples: every paragraph (blank-line separated, whitespace collapsed) of
every module, class and function docstring (`ast.get_docstring`) in a
module of a topic package (`stdlib_corpus.list_modules`, whose exclusions
apply: no test suites), kept when it reads as prose: at least `MIN_WORDS`
words, at least `MIN_LETTERS` of its characters letters or spaces, not a
doctest ('>>>'). A text found under two topics is dropped (its label is
ambiguous); a text repeated within one topic is kept once. On Python 3.11:
4,475 paragraphs, from tkinter 1,020 down to urllib 173.

Split: a stable hash of the text (`stdlib_corpus.is_heldout`) puts
`test_fraction` of the paragraphs in the central test set, independently
of the listing; the rest is the central training set that
`data.registry` partitions over clients (Dirichlet over the labels, like
the image sources).

Arrays: `x` int32 [n, seq_len] token ids from `tokenizer.encode` (BERT's
[CLS] ... [SEP] [PAD]..., cut at seq_len), `y` int32 [n] topic indices.
"""

from __future__ import annotations

import ast
from typing import Any

import numpy as np

from fedjax_eff.data import stdlib_corpus

TOPICS = ('tkinter', 'asyncio', 'email', 'importlib', 'xml', 'logging',
          'http', 'unittest', 'multiprocessing', 'urllib')
MIN_WORDS = 4
MIN_LETTERS = 0.85
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def is_prose(paragraph: str) -> bool:
  """A whitespace-collapsed paragraph that reads as a sentence."""
  if len(paragraph.split()) < MIN_WORDS or paragraph.startswith('>>>'):
    return False
  letters = sum(c.isalpha() or c == ' ' for c in paragraph)
  return letters >= MIN_LETTERS * len(paragraph)


def paragraphs(source: str) -> list[str]:
  """The prose paragraphs of every docstring in one module's source text,
  in `ast.walk` order; [] if the source does not parse."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  out = []
  for node in ast.walk(tree):
    if isinstance(node, _DOC_NODES):
      doc = ast.get_docstring(node)
      for para in (doc or '').split('\n\n'):
        para = ' '.join(para.split())
        if is_prose(para):
          out.append(para)
  return out


def collect(root: str | None = None, topics=TOPICS
            ) -> tuple[list[str], np.ndarray]:
  """(texts, labels int32) of every topic module under `root` (default:
  this Python's stdlib), sorted by (label, text) so the order does not
  depend on the listing."""
  found: dict[str, set[int]] = {}
  for name, path in stdlib_corpus.list_modules(root).items():
    top = name.split('.')[0]
    if top not in topics:
      continue
    with open(path, encoding='utf-8', errors='replace') as f:
      for text in paragraphs(f.read()):
        found.setdefault(text, set()).add(topics.index(top))
  pairs = sorted((next(iter(ls)), t) for t, ls in found.items()
                 if len(ls) == 1)
  return [t for _, t in pairs], np.array([l for l, _ in pairs], np.int32)


def load_stdlib_docs(tokenizer: Any, seq_len: int = 32,
                     test_fraction: float = 0.2, root: str | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, test) arrays {'x': int32 [n, seq_len], 'y': int32 [n]}.

  `tokenizer`: anything with `encode(texts, max_len) -> int [n, max_len]`
  (`data.wordpiece.WordPieceTokenizer` of the model to fine-tune).
  """
  if not 0 <= test_fraction < 1:
    raise ValueError(f'test_fraction={test_fraction} must be in [0, 1).')
  texts, labels = collect(root)
  if not texts:
    raise ValueError(f'no docstring paragraphs of {TOPICS} found under '
                     f'{root or stdlib_corpus.stdlib_dir()!r}.')
  ids = np.asarray(tokenizer.encode(texts, seq_len), np.int32)
  test = np.array([stdlib_corpus.is_heldout(t, test_fraction)
                   for t in texts], bool)
  return ({'x': ids[~test], 'y': labels[~test]},
          {'x': ids[test], 'y': labels[test]})
