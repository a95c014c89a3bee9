"""Federated speech recognition data: character CTC targets and log-mels.

Two sources share one format, so the same CTC task and model train on both:

* `build_espeak_corpus`: an offline, CPU-sized set synthesised with the
  espeak-ng speech synthesiser. Each simulated speaker is one
  (voice, rate, pitch) triple and is ONE CLIENT: its own timbre, tempo and
  pitch make the clients non-IID in the way real users' devices are, while
  the set needs no download and rebuilds bit-identically (espeak-ng is
  deterministic and the texts are seeded per speaker).
* `load_librispeech`: LibriSpeech through `tfds.data_source`, one client per
  `speaker_id` (the natural federated split of read speech).

Per client, arrays are
  x     float32 [n, max_frames, n_mels]  log-mel frames, zero-padded
  x_len int32   [n]                      real frames of each utterance
  y     int32   [n, max_label_len]       character ids, padded with 0
  y_len int32   [n]                      real characters of each label
Label id 0 is the CTC blank and doubles as label padding: `y_len`, not the
value, says where a label ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import re
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Sequence

import numpy as np

from fedjax_eff.data import speech_features
from fedjax_eff.data.federated import FederatedData

# ------------------------------------------------------------- vocabulary --

BLANK_ID = 0
VOCAB = ('<blank>', ' ', "'") + tuple('abcdefghijklmnopqrstuvwxyz')
VOCAB_SIZE = len(VOCAB)  # 29
_CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB) if i != BLANK_ID}


def encode_text(text: str) -> list[int]:
  """Character ids of `text`: lower-cased, characters outside the
  vocabulary dropped, whitespace runs collapsed to one space and trimmed
  (so LibriSpeech's upper-case transcripts and stray punctuation map
  cleanly)."""
  text = ' '.join(text.lower().split())
  out = [_CHAR_TO_ID[c] for c in text if c in _CHAR_TO_ID]
  # Dropped characters can leave double or edge spaces behind.
  return _collapse_spaces(out)


def _collapse_spaces(ids: Sequence[int]) -> list[int]:
  space = _CHAR_TO_ID[' ']
  out = []
  for i in ids:
    if i == space and (not out or out[-1] == space):
      continue
    out.append(i)
  while out and out[-1] == space:
    out.pop()
  return out


def decode_ids(ids: Sequence[int]) -> str:
  """Text of character ids; blanks (and label padding) decode to nothing."""
  return ''.join(VOCAB[int(i)] for i in ids if int(i) != BLANK_ID)


# -------------------------------------------------------------- espeak-ng --

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
               'eight', 'nine')
# A small vocabulary for short sentences (`text_kind='words'`): common
# words with apostrophes and every letter, so the whole alphabet is trained.
WORDS = DIGIT_WORDS + (
    'the', 'a', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog',
    "it's", "don't", 'we', 'you', 'they', 'have', 'give', 'me', 'my', 'zebra',
    'box', 'jazz', 'very', 'good', 'morning', 'please', 'call', 'home',
    'yes', 'no', 'stop', 'go', 'left', 'right', 'up', 'down', 'open', 'quiet',
    'what', 'time', 'weather', 'play', 'music', 'next', 'song', "i'm", 'king')
DEFAULT_VOICES = ('en-us', 'en-us+f2', 'en+m3', 'en+f4', 'en-gb-scotland+m5',
                  'en-029+f3', 'en-us-nyc+m7', 'en-gb-x-rp+f5')
DEFAULT_RATES = (140, 190)      # words per minute (espeak-ng's default: 175)
DEFAULT_PITCHES = (35, 65)      # 0..99 (default 50)
DEFAULT_UTTERANCES = 40
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'fedjax_eff', 'speech')
ESPEAK_RATE = 22_050
# Bump when the cache format or the synthesis/feature pipeline changes.
_FORMAT = 1
# Incremented on every synthesis, so tests can tell a cache hit.
synth_count = 0


class EspeakMissingError(FileNotFoundError):
  """espeak-ng is not installed (it is only needed to build the set)."""


def espeak_binary() -> str:
  path = shutil.which('espeak-ng')
  if path is None:
    raise EspeakMissingError(
        'espeak-ng is not installed; it is needed only to build the '
        "synthetic speech set (data.source='speech'), which is then cached. "
        'Install it with `apt-get install espeak-ng` (Debian/Ubuntu).')
  return path


def espeak_version() -> str:
  """E.g. '1.51' (the first version number espeak-ng --version prints)."""
  out = subprocess.run([espeak_binary(), '--version'], capture_output=True,
                       text=True, check=True).stdout
  m = re.search(r'(\d+\.\d+(?:\.\d+)?)', out)
  return m.group(1) if m else out.strip()


def speaker_id(voice: str, rate: int, pitch: int) -> str:
  return f'{voice}/s{int(rate)}/p{int(pitch)}'


def speaker_texts(speaker: str, n: int, seed: int = 0,
                  text_kind: str = 'digits') -> list[str]:
  """`n` texts of 2-5 words for one speaker, a pure function of
  (speaker, n, seed, text_kind): digit strings ("three one four") or
  short word sequences from `WORDS`."""
  if text_kind not in ('digits', 'words'):
    raise ValueError(f"text_kind must be 'digits' or 'words', got "
                     f'{text_kind!r}.')
  words = DIGIT_WORDS if text_kind == 'digits' else WORDS
  h = int.from_bytes(hashlib.sha256(speaker.encode()).digest()[:8], 'big')
  rng = np.random.default_rng([seed, h])
  return [' '.join(words[i] for i in rng.integers(0, len(words),
                                                  rng.integers(2, 6)))
          for _ in range(n)]


def synthesize(text: str, voice: str, rate: int, pitch: int,
               workdir: str | None = None) -> np.ndarray:
  """espeak-ng's rendering of `text` as float32 16 kHz samples in [-1, 1]."""
  global synth_count
  synth_count += 1
  binary = espeak_binary()
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    path = os.path.join(tmp, 'out.wav')
    proc = subprocess.run(
        [binary, '-v', voice, '-s', str(int(rate)), '-p', str(int(pitch)),
         '-w', path, text], capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(path):
      raise RuntimeError(f'espeak-ng failed for voice={voice!r} '
                         f'text={text!r}: {proc.stderr.strip()}')
    with wave.open(path, 'rb') as w:
      if w.getsampwidth() != 2 or w.getnchannels() != 1:
        raise RuntimeError('espeak-ng wrote an unexpected WAV format '
                           f'({w.getnchannels()} ch, {w.getsampwidth()} B).')
      rate_in = w.getframerate()
      pcm = np.frombuffer(w.readframes(w.getnframes()), '<i2')
  audio = pcm.astype(np.float32) / 32768.0
  return speech_features.resample(audio, rate_in,
                                  speech_features.SAMPLE_RATE)


def _check_voices(voices: Sequence[str]) -> None:
  """espeak-ng silently falls back to a default voice for unknown names, so
  a typo would build a set with duplicate speakers; reject it up front."""
  binary = espeak_binary()

  def column(arg, col):
    out = subprocess.run([binary, f'--voices{arg}'], capture_output=True,
                         text=True).stdout.splitlines()[1:]
    return {l.split()[col].rsplit('/', 1)[-1].lower() for l in out
            if len(l.split()) > col}
  languages = column('', 1) | column('', 4)
  variants = column('=variant', 4)
  for v in voices:
    base, _, variant = v.partition('+')
    if base.lower() not in languages or (variant and
                                         variant.lower() not in variants):
      raise ValueError(f'Unknown espeak-ng voice {v!r}; see `espeak-ng '
                       '--voices=en` and `espeak-ng --voices=variant` '
                       "(e.g. 'en-us', 'en+m3', 'en-us+f2').")


# -------------------------------------------------------------- packing --

def pack(utterances: Sequence[tuple[np.ndarray, Sequence[int]]],
         max_frames: int, max_label_len: int) -> dict[str, np.ndarray]:
  """Pads (features [t, n_mels], label ids) pairs into the client format."""
  n = len(utterances)
  n_mels = utterances[0][0].shape[1] if n else 0
  x = np.zeros((n, max_frames, n_mels), np.float32)
  y = np.zeros((n, max_label_len), np.int32)
  x_len = np.zeros(n, np.int32)
  y_len = np.zeros(n, np.int32)
  for i, (f, ids) in enumerate(utterances):
    x[i, :len(f)] = f
    y[i, :len(ids)] = ids
    x_len[i], y_len[i] = len(f), len(ids)
  return {'x': x, 'x_len': x_len, 'y': y, 'y_len': y_len}


def repad(data: FederatedData, max_frames: int, max_label_len: int
          ) -> FederatedData:
  """The same clients with `x`/`y` padded (never cut) to new widths, so
  train, held-out and test sets share one input shape."""
  def one(c):
    c = dict(c)
    if max_frames < c['x'].shape[1] or max_label_len < c['y'].shape[1]:
      raise ValueError('repad only pads; use limit() to drop long ones.')
    c['x'] = np.pad(c['x'], ((0, 0), (0, max_frames - c['x'].shape[1]),
                             (0, 0)))
    c['y'] = np.pad(c['y'], ((0, 0), (0, max_label_len - c['y'].shape[1])))
    return c
  return FederatedData({cid: one(data.client(cid)) for cid in data.client_ids},
                       order=data.client_ids)


def limit(data: FederatedData, max_utterances: int = 0, max_frames: int = 0
          ) -> FederatedData:
  """At most `max_utterances` per client (the first ones; 0 = all), and with
  `max_frames` > 0 only utterances of at most that many frames, `x` cut to
  that width. Clients left with nothing are dropped."""
  out = {}
  for cid in data.client_ids:
    c = data.client(cid)
    keep = np.ones(len(c['x_len']), bool)
    if max_frames:
      keep &= c['x_len'] <= max_frames
    rows = np.flatnonzero(keep)[:max_utterances or None]
    if len(rows):
      c = {k: v[rows] for k, v in c.items()}
      if max_frames:
        c['x'] = c['x'][:, :max_frames]
        if c['x'].shape[1] < max_frames:
          c['x'] = np.pad(c['x'], ((0, 0), (0, max_frames - c['x'].shape[1]),
                                   (0, 0)))
      out[cid] = c
  if not out:
    raise ValueError(f'No utterance has at most max_frames={max_frames} '
                     'frames.')
  return FederatedData(out, order=[c for c in data.client_ids if c in out])


def heldout_rank(client_id: str) -> int:
  return int.from_bytes(
      hashlib.sha256(b'heldout:' + client_id.encode()).digest()[:8], 'big')


def split_heldout(data: FederatedData, num_heldout: int
                  ) -> tuple[FederatedData, FederatedData | None]:
  """The `num_heldout` clients with the smallest SHA-256 of their id are
  held out: stable whatever else the set holds, so a speaker never moves
  between training and evaluation when speakers are added."""
  ids = data.client_ids
  if num_heldout == 0:
    return data, None
  if not 0 < num_heldout < len(ids):
    raise ValueError(f'{num_heldout} held-out clients of {len(ids)} leaves no '
                     'training client.')
  held = set(sorted(ids, key=heldout_rank)[:num_heldout])
  return (data.subset([c for c in ids if c not in held]),
          data.subset([c for c in ids if c in held]))


def _save(path: str, data: FederatedData) -> None:
  np.savez(path, client_ids=np.array(data.client_ids),
           sizes=data.client_sizes, **data.concatenated())


def _load(path: str) -> FederatedData:
  with np.load(path) as z:
    ids = [str(c) for c in z['client_ids']]
    b = np.concatenate([[0], np.cumsum(z['sizes'])])
    arrays = {k: z[k] for k in ('x', 'x_len', 'y', 'y_len')}
  return FederatedData({c: {k: v[b[i]:b[i + 1]] for k, v in arrays.items()}
                        for i, c in enumerate(ids)}, order=ids)


def _publish(tmp: str, path: str) -> None:
  try:
    os.replace(tmp, path)
  except OSError:  # Another process finished first (non-empty target).
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------ espeak set --

class SpeechCorpus(NamedTuple):
  train: FederatedData
  heldout: FederatedData | None
  meta: dict   # The cache's meta.json.
  path: str    # The cache directory.


def build_espeak_corpus(
    cache_dir: str | None = None,
    num_utterances_per_speaker: int = DEFAULT_UTTERANCES,
    voices: Sequence[str] = DEFAULT_VOICES,
    rates: Sequence[int] = DEFAULT_RATES,
    pitches: Sequence[int] = DEFAULT_PITCHES,
    seed: int = 0, text_kind: str = 'digits', n_mels: int = 40,
    normalize: bool = True, num_heldout: int = 4, threads: int = 4,
    progress: bool = True) -> SpeechCorpus:
  """The espeak-ng speech set, built once and then read from the cache.

  One client per (voice, rate, pitch) speaker, each with
  `num_utterances_per_speaker` seeded texts (`speaker_texts`) rendered by
  `espeak-ng -v voice -s rate -p pitch`, resampled from 22,050 Hz to 16 kHz
  and turned into per-utterance-normalised log-mels (`speech_features`).
  `num_heldout` speakers (by a stable hash, `split_heldout`) are returned
  as held-out clients; the split is made on loading, so it does not change
  the cache.

  Cached under `cache_dir` (default `~/.cache/fedjax_eff/speech`) in a
  directory named by a hash of the knobs and the espeak-ng version, with
  `data.npz` and a `meta.json` recording them and the counts. Raises
  `EspeakMissingError` if the set is not cached and espeak-ng is missing.
  """
  voices, rates, pitches = list(voices), [int(r) for r in rates], [
      int(p) for p in pitches]
  if not voices or not rates or not pitches:
    raise ValueError('voices, rates and pitches must be non-empty.')
  if num_utterances_per_speaker < 1:
    raise ValueError('num_utterances_per_speaker must be >= 1, got '
                     f'{num_utterances_per_speaker}.')
  speakers = [(v, r, p) for v in voices for r in rates for p in pitches]
  ids = [speaker_id(*s) for s in speakers]
  if len(set(ids)) != len(ids):
    raise ValueError('voices, rates and pitches must not repeat.')
  knobs = dict(voices=voices, rates=rates, pitches=pitches, seed=int(seed),
               num_utterances_per_speaker=int(num_utterances_per_speaker),
               text_kind=text_kind, n_mels=int(n_mels),
               normalize=bool(normalize), format=_FORMAT)
  root = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  path = _find_cached(root, knobs)
  if path is None:
    version = espeak_version()
    digest = hashlib.sha256(json.dumps([knobs, version]).encode()
                            ).hexdigest()[:12]
    path = os.path.join(root, f'espeak-{version}-{digest}')
    if not os.path.exists(os.path.join(path, 'meta.json')):
      _build_espeak(path, speakers, ids, knobs, version, threads, progress)
  with open(os.path.join(path, 'meta.json')) as f:
    meta = json.load(f)
  train, heldout = split_heldout(_load(os.path.join(path, 'data.npz')),
                                 num_heldout)
  return SpeechCorpus(train, heldout, meta, path)


def _find_cached(root: str, knobs: dict) -> str | None:
  """A cached build of these knobs by any espeak-ng version, preferring
  the installed one: once built, the set is usable without espeak-ng."""
  if not os.path.isdir(root):
    return None
  try:
    installed = espeak_version()
  except EspeakMissingError:
    installed = None
  hits = []
  for name in sorted(os.listdir(root)):
    meta = os.path.join(root, name, 'meta.json')
    if name.startswith('espeak-') and os.path.exists(meta):
      with open(meta) as f:
        m = json.load(f)
      if m.get('knobs') == knobs:
        hits.append((m.get('espeak_version') != installed, name))
  return os.path.join(root, min(hits)[1]) if hits else None


def _build_espeak(path, speakers, ids, knobs, version, threads, progress):
  from tqdm.auto import tqdm
  _check_voices(knobs['voices'])
  jobs = [(cid, s, text) for cid, s in zip(ids, speakers)
          for text in speaker_texts(cid, knobs['num_utterances_per_speaker'],
                                    knobs['seed'], knobs['text_kind'])]

  def work(job):
    _, (voice, rate, pitch), text = job
    audio = synthesize(text, voice, rate, pitch)
    feats = speech_features.log_mel(audio, n_mels=knobs['n_mels'],
                                    normalize=knobs['normalize'])
    return feats, encode_text(text), len(audio)

  with ThreadPoolExecutor(max(1, int(threads))) as pool:
    results = list(tqdm(pool.map(work, jobs), total=len(jobs),
                        desc='speech: espeak-ng', unit='utt',
                        disable=not progress or not sys.stderr.isatty(), leave=False))
  max_frames = max(len(f) for f, _, _ in results)
  max_label = max(len(l) for _, l, _ in results)
  clients, k = {}, 0
  for cid in ids:
    n = knobs['num_utterances_per_speaker']
    clients[cid] = pack([(f, l) for f, l, _ in results[k:k + n]],
                        max_frames, max_label)
    k += n
  tmp = f'{path}.{os.getpid()}.tmp'
  os.makedirs(tmp, exist_ok=True)
  _save(os.path.join(tmp, 'data.npz'), FederatedData(clients, order=ids))
  samples = sum(s for _, _, s in results)
  meta = dict(espeak_version=version, knobs=knobs, num_speakers=len(ids),
              num_utterances=len(jobs), max_frames=max_frames,
              max_label_len=max_label,
              total_frames=int(sum(len(f) for f, _, _ in results)),
              hours=samples / speech_features.SAMPLE_RATE / 3600.0,
              sample_rate=speech_features.SAMPLE_RATE, speakers=ids)
  with open(os.path.join(tmp, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  _publish(tmp, path)


# ------------------------------------------------------------ LibriSpeech --

def _open_librispeech(split: str, data_dir: str | None):
  """`tfds.data_source('librispeech', split)`; TFDS's Audio feature imports
  TensorFlow, so say so plainly if it is missing."""
  from fedjax_eff.data import sources
  try:
    return sources._open_source('librispeech', split, data_dir)  # pylint: disable=protected-access
  except ModuleNotFoundError as e:
    if 'tensorflow' in str(e) and 'tensorflow_datasets' not in str(e):
      raise ValueError(
          "Reading LibriSpeech through TFDS needs TensorFlow (TFDS's Audio "
          'feature imports it): pip install tensorflow-cpu.') from e
    raise


def load_librispeech(split: str, data_dir: str | None = None,
                     max_clients: int = 0, max_utterances: int = 0,
                     n_mels: int = 40, max_frames: int = 0,
                     normalize: bool = True, cache_dir: str | None = None,
                     progress: bool = True) -> FederatedData:
  """LibriSpeech `split` ('train_clean100', 'dev_clean', 'test_clean', ...)
  as one client per speaker, in the format of the module docstring.

  Clients are the first `max_clients` speakers by id (0 = all), each with
  its first `max_utterances` utterances in TFDS order (0 = all) of at most
  `max_frames` frames (0 = no limit; LibriSpeech utterances run to 35 s,
  3,500 frames, and padding to the longest costs memory). Transcripts are
  lower-cased; characters outside the vocabulary are dropped. The result
  is cached as `.npz` under `cache_dir` (default
  `~/.cache/fedjax_eff/speech`), keyed by the knobs and the source.
  """
  from tqdm.auto import tqdm
  source = _open_librispeech(split, data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f'LibriSpeech split {split!r} has no examples.')
  knobs = dict(split=split, data_dir=data_dir, n=n,
               max_clients=int(max_clients),
               max_utterances=int(max_utterances), n_mels=int(n_mels),
               max_frames=int(max_frames), normalize=bool(normalize),
               reader=type(getattr(source, 'data_source', source)).__name__,
               format=_FORMAT)
  digest = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()
                          ).hexdigest()[:12]
  root = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  cache = os.path.join(root, f'librispeech-{split}-{digest}.npz')
  if os.path.exists(cache):
    return _load(cache)

  # Pass 1: speakers (decodes each example; TFDS reads whole records).
  speakers = np.array([int(source[i]['speaker_id']) for i in
                       tqdm(range(n), desc=f'librispeech {split}: speakers',
                            disable=not progress or not sys.stderr.isatty(), leave=False)])
  chosen = np.unique(speakers)[:max_clients or None]
  rows = {s: np.flatnonzero(speakers == s) for s in chosen}
  # Pass 2: features of the chosen speakers' utterances.
  per, total = {}, sum(len(r) for r in rows.values())
  with tqdm(total=total, desc=f'librispeech {split}: features',
            disable=not progress or not sys.stderr.isatty(), leave=False) as bar:
    for s, idx in rows.items():
      utts = []
      for i in idx:
        e = source[int(i)]
        audio = np.asarray(e['speech'])
        if max_frames and speech_features.num_frames(len(audio)) > max_frames:
          bar.update(1)
          continue
        text = e['text']
        text = text.decode() if isinstance(text, bytes) else str(text)
        ids = encode_text(text)
        if ids:
          utts.append((speech_features.log_mel(audio, n_mels=n_mels,
                                               normalize=normalize), ids))
        bar.update(1)
        if max_utterances and len(utts) == max_utterances:
          bar.update(len(idx) - len(utts))
          break
      if utts:
        per[str(s)] = utts
  if not per:
    raise ValueError(f'No LibriSpeech {split!r} utterance fits '
                     f'max_frames={max_frames}.')
  frames = max(len(f) for u in per.values() for f, _ in u)
  labels = max(len(l) for u in per.values() for _, l in u)
  data = FederatedData({s: pack(u, frames, labels) for s, u in per.items()},
                       order=list(per))
  os.makedirs(root, exist_ok=True)
  tmp = f'{cache}.{os.getpid()}.tmp.npz'
  _save(tmp, data)
  os.replace(tmp, cache)
  return data
