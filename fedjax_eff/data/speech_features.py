"""Log-mel filterbank features: the usual front end of a speech recognizer.

A Conformer (or any CTC acoustic model) does not read raw samples; it reads
a spectrogram summarised by a mel filterbank, because the ear (and speech)
resolves low frequencies finely and high ones coarsely. This module computes
that in plain NumPy so that data building needs no audio library:

  16 kHz audio -> optional pre-emphasis -> 25 ms Hann windows every 10 ms
  -> |rfft|^2 (power spectrum, FFT size the next power of two) -> triangular
  mel filterbank (HTK mel scale) -> log(max(x, 1e-6)) -> optional
  per-utterance mean/variance normalisation.

Framing follows Kaldi's `snip_edges=True`: a clip of `n` samples gives
`num_frames(n) = 1 + max(n - win, 0) // hop` frames (a clip shorter than one
window is zero-padded to one window, so every clip has at least one frame).

The functions take an `xp` argument (`numpy` by default) so the same code runs
under `jax.numpy` when features are wanted on device; only ops that both
libraries share are used.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
WIN_MS = 25.0
HOP_MS = 10.0
LOG_FLOOR = 1e-6


def hz_to_mel(f):
  """HTK mel scale: 2595 log10(1 + f / 700)."""
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def frame_params(sample_rate: int = SAMPLE_RATE, win_ms: float = WIN_MS,
                 hop_ms: float = HOP_MS) -> tuple[int, int, int]:
  """(window, hop, fft size) in samples: 400, 160, 512 at 16 kHz."""
  win = int(round(sample_rate * win_ms / 1000.0))
  hop = int(round(sample_rate * hop_ms / 1000.0))
  if win < 2 or hop < 1:
    raise ValueError(f'window {win_ms} ms / hop {hop_ms} ms at {sample_rate} '
                     'Hz is shorter than two / one samples.')
  return win, hop, 1 << (win - 1).bit_length()


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE,
               win_ms: float = WIN_MS, hop_ms: float = HOP_MS) -> int:
  """Frames `log_mel` returns for `num_samples` samples (see module doc)."""
  win, hop, _ = frame_params(sample_rate, win_ms, hop_ms)
  return 1 + max(int(num_samples) - win, 0) // hop


def mel_filterbank(n_mels: int = 40, n_fft: int = 512,
                   sample_rate: int = SAMPLE_RATE, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
  """Triangular HTK-mel filters as a float32 `[n_fft // 2 + 1, n_mels]` matrix.

  Filter `m` rises linearly from the (m)th to the (m+1)th of `n_mels + 2`
  points equally spaced in mel between `fmin` and `fmax`, and falls to the
  (m+2)th, evaluated at the FFT bin frequencies `k * sample_rate / n_fft`.
  Peaks are 1 (no area normalisation, as in HTK/Kaldi). With many mels and a
  short FFT the lowest filters can fall between bins and be all zero; their
  log energy is then the floor.
  """
  fmax = sample_rate / 2.0 if fmax is None else float(fmax)
  if n_mels < 1:
    raise ValueError(f'n_mels must be >= 1, got {n_mels}.')
  if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
    raise ValueError(f'need 0 <= fmin < fmax <= {sample_rate / 2} Hz, got '
                     f'fmin={fmin}, fmax={fmax}.')
  edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lo) / (mid - lo)
  down = (hi - freqs[:, None]) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(audio, n_mels: int = 40, sample_rate: int = SAMPLE_RATE,
            win_ms: float = WIN_MS, hop_ms: float = HOP_MS,
            preemphasis: float = 0.97, fmin: float = 0.0,
            fmax: float | None = None, normalize: bool = False,
            xp=np) -> np.ndarray:
  """Log-mel features `[num_frames(len(audio)), n_mels]` float32 of 1-D audio.

  Args:
    audio: 1-D samples; floats in [-1, 1] or integers (int16 is scaled by
      1/32768 so the two give the same features).
    n_mels: filterbank bins (40 or 80 are usual).
    preemphasis: `y[t] = x[t] - a x[t-1]` before framing (0 = off); boosts
      the weak high frequencies of voiced speech.
    normalize: subtract each bin's mean over the utterance and divide by its
      standard deviation (per-utterance CMVN), which removes channel and
      loudness differences between speakers.
    xp: `numpy` or `jax.numpy`.
  """
  win, hop, n_fft = frame_params(sample_rate, win_ms, hop_ms)
  a = np.asarray(audio) if xp is np else audio
  if a.ndim != 1:
    raise ValueError(f'audio must be 1-D, got shape {a.shape}.')
  if np.issubdtype(a.dtype, np.integer):
    a = a.astype(np.float32) / 32768.0
  a = a.astype(np.float32)
  if preemphasis:
    a = xp.concatenate([a[:1], a[1:] - preemphasis * a[:-1]])
  n = a.shape[0]
  if n < win:
    a = xp.concatenate([a, xp.zeros(win - n, np.float32)])
  frames = num_frames(n, sample_rate, win_ms, hop_ms)
  idx = np.arange(frames)[:, None] * hop + np.arange(win)[None, :]
  window = np.hanning(win + 1)[:-1].astype(np.float32)  # periodic Hann
  spec = xp.fft.rfft(a[idx] * window, n=n_fft, axis=-1)
  power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
  fb = mel_filterbank(n_mels, n_fft, sample_rate, fmin, fmax)
  feats = xp.log(xp.maximum(power @ fb, LOG_FLOOR))
  if normalize:
    feats = (feats - feats.mean(0)) / xp.maximum(feats.std(0), 1e-5)
  return feats.astype(np.float32)


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
  """Band-limited polyphase resampling (scipy's `resample_poly`, which comes
  with scikit-learn): espeak-ng speaks at 22,050 Hz, the front end wants
  16 kHz. Returns float32."""
  if orig_rate == new_rate:
    return np.asarray(audio, np.float32)
  from math import gcd
  from scipy import signal  # Deferred: only data building needs it.
  g = gcd(int(orig_rate), int(new_rate))
  return signal.resample_poly(np.asarray(audio, np.float64),
                              new_rate // g, orig_rate // g).astype(np.float32)
