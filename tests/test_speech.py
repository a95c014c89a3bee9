"""Speech data and the CTC task: the log-mel front end, the character
vocabulary, the espeak-ng set (skipped without espeak-ng), LibriSpeech
through the registry, CTC loss/decoding and the host-side error rates."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_eff.core import speech_metrics, task as task_lib
from fedjax_eff.data import registry, speech, speech_features as sf

needs_espeak = pytest.mark.skipif(shutil.which('espeak-ng') is None,
                                  reason='espeak-ng is not installed')


# -------------------------------------------------------------- front end --

def test_frame_count_and_shape():
  win, hop, n_fft = sf.frame_params()
  assert (win, hop, n_fft) == (400, 160, 512)
  for n in (0, 1, 399, 400, 401, 559, 560, 16_000):
    feats = sf.log_mel(np.zeros(n, np.float32), n_mels=40)
    assert feats.shape == (sf.num_frames(n), 40) and feats.dtype == np.float32
    assert sf.num_frames(n) == (1 if n <= 400 else 1 + (n - 400) // 160)
  assert sf.num_frames(16_000) == 98   # 1 s
  # Silence sits on the log floor.
  np.testing.assert_allclose(sf.log_mel(np.zeros(800)), np.log(1e-6))


@pytest.mark.parametrize('freq, n_mels', [(440.0, 40), (1000.0, 40),
                                          (3000.0, 80), (6500.0, 40)])
def test_tone_peaks_in_its_mel_bin(freq, n_mels):
  t = np.arange(16_000) / 16_000
  feats = sf.log_mel(0.5 * np.sin(2 * np.pi * freq * t), n_mels=n_mels,
                     preemphasis=0.0)
  # Independently: the HTK mel centres, equally spaced in mel over 0..8 kHz;
  # the tone belongs to the filter whose centre is nearest in mel.
  top = 2595 * np.log10(1 + 8000 / 700)
  centres = np.linspace(0, top, n_mels + 2)[1:-1]
  want = int(np.argmin(np.abs(centres - 2595 * np.log10(1 + freq / 700))))
  assert np.all(np.argmax(feats, -1) == want)


def test_filterbank_and_normalisation():
  fb = sf.mel_filterbank(40, 512)
  assert fb.shape == (257, 40) and fb.min() >= 0 and fb.max() <= 1
  assert np.all(fb.max(0) > 0.5)  # every 40-bin filter sees an FFT bin
  x = np.random.default_rng(0).normal(size=8000).astype(np.float32)
  f = sf.log_mel(x, normalize=True)
  np.testing.assert_allclose(f.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(f.std(0), 1, atol=1e-3)
  # int16 input is scaled to [-1, 1] first; jnp gives the same features.
  pcm = (x / 8 * 32768).astype(np.int16)
  np.testing.assert_allclose(sf.log_mel(pcm), sf.log_mel(pcm / 32768.0),
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(sf.log_mel(jnp.asarray(x), xp=jnp)),
                             sf.log_mel(x), atol=2e-3)
  with pytest.raises(ValueError, match='1-D'):
    sf.log_mel(np.zeros((2, 400)))


def test_resample_keeps_a_tone():
  t = np.arange(22_050) / 22_050
  out = sf.resample(np.sin(2 * np.pi * 1000 * t), 22_050, 16_000)
  assert len(out) == 16_000
  spec = np.abs(np.fft.rfft(out))
  assert np.argmax(spec) == 1000  # 1 Hz bins over 1 s


# ------------------------------------------------------------- vocabulary --

def test_vocab_round_trip():
  assert speech.VOCAB_SIZE == 29 and speech.VOCAB[1:3] == (' ', "'")
  ids = speech.encode_text("It's  FOUR,  two!")
  assert speech.decode_ids(ids) == "it's four two"
  assert min(ids) >= 1 and max(ids) < 29
  assert speech.decode_ids([0, *ids, 0, 0]) == "it's four two"
  assert speech.encode_text(' -- ') == []


# ------------------------------------------------------------- espeak set --

@needs_espeak
def test_espeak_build_shapes_determinism_cache(tmp_path, monkeypatch):
  kw = dict(num_utterances_per_speaker=3, voices=('en-us', 'en+f2'),
            rates=(160,), pitches=(50,), num_heldout=1, progress=False,
            threads=2)
  a = speech.build_espeak_corpus(cache_dir=str(tmp_path / 'a'), **kw)
  b = speech.build_espeak_corpus(cache_dir=str(tmp_path / 'b'), **kw)
  assert a.train.num_clients == 1 and a.heldout.num_clients == 1
  assert a.meta['num_utterances'] == 6 and a.meta['espeak_version']
  both = sorted(a.train.client_ids + a.heldout.client_ids)
  assert both == ['en+f2/s160/p50', 'en-us/s160/p50']
  for part in ('train', 'heldout'):
    ca, cb = getattr(a, part).client(0), getattr(b, part).client(0)
    assert ca['x'].shape == (3, a.meta['max_frames'], 40)
    assert ca['x'].dtype == np.float32 and ca['y'].dtype == np.int32
    assert ca['x_len'].max() <= a.meta['max_frames']
    for k in ca:
      np.testing.assert_array_equal(ca[k], cb[k])  # deterministic
    for i in range(3):
      text = speech.decode_ids(ca['y'][i][:ca['y_len'][i]])
      assert all(w in speech.DIGIT_WORDS for w in text.split())
      assert 2 <= len(text.split()) <= 5
      assert np.all(ca['x'][i, ca['x_len'][i]:] == 0)

  def fail(*args, **kwargs):
    raise AssertionError('cache miss: espeak-ng ran again')
  monkeypatch.setattr(speech, 'synthesize', fail)
  monkeypatch.setattr(subprocess, 'run', fail)
  monkeypatch.setattr(speech, 'espeak_version', lambda: '1.51')
  c = speech.build_espeak_corpus(cache_dir=str(tmp_path / 'a'), **kw)
  np.testing.assert_array_equal(c.train.client(0)['x'], a.train.client(0)['x'])


def test_espeak_missing_is_explained(tmp_path, monkeypatch):
  monkeypatch.setattr(shutil, 'which', lambda name: None)
  with pytest.raises(speech.EspeakMissingError, match='apt-get install'):
    speech.build_espeak_corpus(cache_dir=str(tmp_path), voices=('en',),
                               rates=(150,), pitches=(50,), num_heldout=0,
                               num_utterances_per_speaker=1)


@needs_espeak
def test_espeak_rejects_unknown_voice(tmp_path):
  with pytest.raises(ValueError, match='Unknown espeak-ng voice'):
    speech.build_espeak_corpus(cache_dir=str(tmp_path), voices=('en+nosuch',),
                               rates=(150,), pitches=(50,), num_heldout=0,
                               num_utterances_per_speaker=1)


def test_heldout_split_is_stable():
  data = speech.FederatedData({f's{i}': {'x': np.zeros((1, 2, 3))}
                               for i in range(10)})
  _, held = speech.split_heldout(data, 3)
  _, held_more = speech.split_heldout(
      speech.FederatedData({f's{i}': {'x': np.zeros((1, 2, 3))}
                            for i in range(10)}), 4)
  assert set(held.client_ids) < set(held_more.client_ids)


# ------------------------------------------------------------- LibriSpeech --

def _fake_librispeech(split):
  rng = np.random.default_rng(len(split))
  texts = ['HELLO WORLD', "IT'S A TEST", 'ONE TWO THREE', 'A B C, D.']
  return [dict(speech=(rng.normal(size=rng.integers(3000, 9000)) * 3000
                       ).astype(np.int16),
               text=texts[i % 4].encode(), speaker_id=100 + i % 3,
               chapter_id=7, id=f'{100 + i % 3}-7-{i:04d}')
          for i in range(9 if split.startswith('train') else 5)]


def test_librispeech_via_registry(tmp_path, monkeypatch):
  monkeypatch.setattr(speech, '_open_librispeech',
                      lambda split, data_dir: _fake_librispeech(split))
  cfg = registry.default_config()
  cfg.update(dict(source='librispeech', num_clients=2, heldout_clients=1,
                  cache_dir=str(tmp_path), max_sequences=2))
  bundle = registry.load(cfg)
  assert bundle.num_classes == 29
  assert bundle.train.client_ids == ['100', '101']
  assert bundle.heldout.num_clients == 1
  frames = bundle.input_shape[0]
  assert bundle.input_shape == (frames, 40)
  c = bundle.train.client('100')
  assert c['x'].shape == (2, frames, 40)   # max_sequences caps utterances
  assert speech.decode_ids(c['y'][0][:c['y_len'][0]]) == 'hello world'
  assert speech.decode_ids(c['y'][1][:c['y_len'][1]]) == 'a b c d'
  assert bundle.test['x'].shape[1:] == (frames, 40)
  assert len(bundle.test['y']) == 5
  # Cached: a second load reads no example.
  monkeypatch.setattr(sf, 'log_mel', lambda *a, **k: 1 / 0)
  again = registry.load(cfg)
  np.testing.assert_array_equal(again.train.client(0)['x'], c['x'])


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is None,
                    reason="TFDS's Audio feature needs TensorFlow")
def test_librispeech_tfds_mock(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    data = speech.load_librispeech('dev_clean', cache_dir=str(tmp_path),
                                   max_frames=2000, progress=False)
  assert data.features == ['x', 'x_len', 'y', 'y_len']


# --------------------------------------------------------------------- CTC --

def _toy_batch():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 12, 29)), jnp.float32)
  x_len = np.array([12, 9, 5])
  paddings = jnp.asarray(np.arange(12)[None] >= x_len[:, None], jnp.float32)
  y = jnp.array([[3, 4, 4, 5], [7, 8, 0, 0], [1, 0, 0, 0]], jnp.int32)
  y_len = jnp.array([4, 2, 1], jnp.int32)
  return logits, paddings, {'x': jnp.zeros((3, 20, 4)), 'x_len': x_len,
                            'y': y, 'y_len': y_len}


def test_ctc_loss_matches_optax_and_masks_padded_frames():
  logits, paddings, batch = _toy_batch()
  t = task_lib.ctc()
  got = t.loss((logits, paddings), batch)
  lab_pad = (np.arange(4)[None] >= np.asarray(batch['y_len'])[:, None])
  want = optax.ctc_loss(logits, paddings, batch['y'],
                        jnp.asarray(lab_pad, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  changed = jnp.where(paddings[..., None] > 0, 100.0, logits)
  np.testing.assert_allclose(t.loss((changed, paddings), batch), got,
                             rtol=1e-6)
  assert not np.allclose(t.loss((logits * 2, paddings), batch), got)
  x, x_len = t.inputs(batch)
  assert x.shape == (3, 20, 4) and x_len.shape == (3,)
  loss_units, scored = t.units(batch)
  np.testing.assert_array_equal(loss_units, [4, 2, 1])
  np.testing.assert_array_equal(scored, [1, 1, 1])
  sums = task_lib.batch_sums(t, (logits, paddings), batch,
                             jnp.array([1.0, 1.0, 0.0]))
  assert float(sums.loss_units) == 6 and float(sums.scored_units) == 2
  # An all-padded example (batch padding) costs nothing, not nan.
  empty = t.loss((logits, jnp.ones_like(paddings)), batch)
  np.testing.assert_array_equal(empty, 0.0)


def test_jit_greedy_decode_equals_host():
  logits, paddings, _ = _toy_batch()
  logits = logits.at[:, :, 0].add(1.0)  # some blanks among the paths
  ids, n = jax.jit(task_lib.ctc_greedy)(logits, paddings)
  host = speech_metrics.greedy_decode(logits, paddings)
  for b, h in enumerate(host):
    assert list(np.asarray(ids[b][:n[b]])) == h
    assert np.all(np.asarray(ids[b][n[b]:]) == 0)
  # Repeats collapse unless a blank separates them; padded frames ignored.
  path = jnp.asarray([[5, 5, 0, 5, 6, 6, 0, 0, 7, 7]])
  one_hot = jax.nn.one_hot(path, 29) * 10
  pad = jnp.asarray([[0.0] * 8 + [1.0] * 2])
  ids, n = task_lib.ctc_greedy(one_hot, pad)
  assert list(np.asarray(ids[0][:n[0]])) == [5, 5, 6]
  assert speech_metrics.greedy_decode(one_hot, pad) == [[5, 5, 6]]


def test_sequence_accuracy():
  t = task_lib.ctc()
  paths = jnp.asarray([[3, 0, 4, 4, 0, 4, 5, 0],    # 3 4 4 5: right
                       [7, 7, 0, 8, 8, 9, 0, 0],    # 7 8 9: one extra
                       [1, 1, 0, 0, 0, 0, 2, 2]])   # 1 (2 in padding): right
  logits = jax.nn.one_hot(paths, 29) * 10
  pad = jnp.asarray([[0.0] * 8, [0.0] * 8, [0.0] * 5 + [1.0] * 3])
  batch = {'y': jnp.array([[3, 4, 4, 5], [7, 8, 0, 0], [1, 0, 0, 0]]),
           'y_len': jnp.array([4, 2, 1])}
  np.testing.assert_array_equal(t.correct((logits, pad), batch), [1, 0, 1])
  short = jax.nn.one_hot(paths[:, :3], 29) * 10  # T' < label width
  np.testing.assert_array_equal(
      jax.jit(t.correct)((short, pad[:, :3]), batch), [0, 0, 1])


def test_edit_distance_and_error_rates():
  ed = speech_metrics.edit_distance
  assert ed('kitten', 'sitting') == 3
  assert ed('', 'abc') == 3 and ed('abc', '') == 3 and ed('abc', 'abc') == 0
  assert ed('flaw', 'lawn') == 2
  assert ed('one two'.split(), 'one three two'.split()) == 1
  r = speech_metrics.error_rates(['one two', 'thre'], ['one three', 'three'])
  # chars: 'two' -> 'three' is 2 substitutions + 2 insertions; 'thre' ->
  # 'three' one insertion.
  assert r['char_edits'] == 5 and r['chars'] == 14
  assert r['cer'] == pytest.approx(5 / 14)
  assert r['word_edits'] == 2 and r['words'] == 3
  assert r['wer'] == pytest.approx(2 / 3)
  with pytest.raises(ValueError):
    speech_metrics.error_rates(['a'], [])


def test_speech_source_via_registry(monkeypatch):
  def fake_build(cache_dir=None, seed=0, n_mels=40, num_heldout=4, **kw):
    clients = {f'v{i}/s150/p50': speech.pack(
        [(np.ones((5 + i + k, n_mels), np.float32), [3 + k, 4])
         for k in range(3)], 12, 2) for i in range(5)}
    train, held = speech.split_heldout(speech.FederatedData(clients),
                                       num_heldout)
    return speech.SpeechCorpus(train, held, {}, '')
  monkeypatch.setattr(speech, 'build_espeak_corpus', fake_build)
  cfg = registry.default_config()
  cfg.update(dict(source='speech', num_clients=2, heldout_clients=2,
                  max_sequences=2, max_frames=10, n_mels=16))
  bundle = registry.load(cfg)
  assert bundle.num_classes == 29 and bundle.input_shape == (10, 16)
  assert bundle.train.num_clients == 2 and bundle.heldout.num_clients == 2
  assert not set(bundle.train.client_ids) & set(bundle.heldout.client_ids)
  # max_frames drops longer utterances; max_sequences caps the rest.
  assert np.all(bundle.test["x_len"] <= 10) and len(bundle.test['y']) <= 4
  assert all(n <= 2 for n in bundle.train.client_sizes)
