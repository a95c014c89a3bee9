"""Builds (or finds cached) the espeak-ng speech set and summarises it.

  python launch/build_speech.py [--utterances=40 --voices=en-us,en+m3
      --rates=140,190 --pitches=35,65 --n_mels=40 --cache_dir=DIR]

Training with `--config.data.source=speech` builds the default set on first
use too; this command does it ahead of time and shows what was built.
Bad input (or a missing espeak-ng) ends with one line and exit status 2.
"""

import time

from absl import app
from absl import flags
from absl import logging

from fedjax_eff.data import speech
from fedjax_eff.experiment import cli

_UTTERANCES = flags.DEFINE_integer('utterances', speech.DEFAULT_UTTERANCES,
                                   'Utterances per speaker.')
_VOICES = flags.DEFINE_list('voices', list(speech.DEFAULT_VOICES),
                            'espeak-ng voices (espeak-ng --voices=en; '
                            'variants as en+m3, en-us+f2).')
_RATES = flags.DEFINE_list('rates', [str(r) for r in speech.DEFAULT_RATES],
                           'Speaking rates, words per minute.')
_PITCHES = flags.DEFINE_list('pitches',
                             [str(p) for p in speech.DEFAULT_PITCHES],
                             'Pitches, 0..99.')
_TEXT = flags.DEFINE_enum('text', 'digits', ['digits', 'words'],
                          'Digit strings or short word sequences.')
_N_MELS = flags.DEFINE_integer('n_mels', 40, 'Mel bins.')
_HELDOUT = flags.DEFINE_integer('heldout', 4, 'Held-out speakers.')
_SEED = flags.DEFINE_integer('seed', 0, 'Text seed.')
_THREADS = flags.DEFINE_integer('threads', 4, 'Synthesis threads.')
_CACHE_DIR = flags.DEFINE_string('cache_dir', None,
                                 'Cache root (default ~/.cache/fedjax_eff/'
                                 'speech).')


def _ints(name, values):
  try:
    return [int(v) for v in values]
  except ValueError:
    cli.fail(f'--{name} must be integers, got {",".join(values)}.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  try:
    corpus = speech.build_espeak_corpus(
        cache_dir=_CACHE_DIR.value,
        num_utterances_per_speaker=_UTTERANCES.value, voices=_VOICES.value,
        rates=_ints('rates', _RATES.value),
        pitches=_ints('pitches', _PITCHES.value), seed=_SEED.value,
        text_kind=_TEXT.value, n_mels=_N_MELS.value,
        num_heldout=_HELDOUT.value, threads=_THREADS.value)
  except (ValueError, speech.EspeakMissingError, RuntimeError) as e:
    cli.fail(str(e))
  m = corpus.meta
  held = corpus.heldout.num_clients if corpus.heldout else 0
  print(f"speech set: {m['num_speakers']} speakers "
        f'({corpus.train.num_clients} training, {held} held-out clients), '
        f"{m['num_utterances']} utterances, {m['hours'] * 60:.1f} min of "
        f"audio, {m['total_frames']} frames (max {m['max_frames']}), "
        f"labels up to {m['max_label_len']} chars, espeak-ng "
        f"{m['espeak_version']}, {time.perf_counter() - start:.1f} s")
  print(f'cache: {corpus.path}')


if __name__ == '__main__':
  app.run(main)
