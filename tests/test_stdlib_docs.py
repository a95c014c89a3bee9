"""The stdlib docstring-topic task (`data.stdlib_docs`): what counts as an
example, labels, the split and the registry path, on a small stdlib tree
and vocabulary the test writes."""

import os
import textwrap

import numpy as np
import pytest

from fedjax_eff.data import registry, stdlib_docs, wordpiece

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'the', 'queue', 'email',
         'message', 'loop', 'event', 'is', 'a', '.']


def _write(root, rel, text):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(textwrap.dedent(text))


@pytest.fixture
def stdlib(tmp_path):
  root = str(tmp_path / 'lib')
  _write(root, 'email/__init__.py', '''\
      """The email message is a parsed message.

      >>> print(the message is here)

      Too short here.

      x = f(a, b) [1, 2] == {3: 4} ** 5; y = 6
      """

      def parse():
        """Parse one email message from the text given."""
      ''')
  _write(root, 'email/test/test_x.py', '''\
      """A test module that must never be read here."""
      ''')
  _write(root, 'asyncio/events.py', '''\
      """The event loop is the core of every asyncio application."""

      class Loop:
        """Parse one email message from the text given."""

        async def run(self):
          """Run the event loop until it is stopped."""
      ''')
  _write(root, 'json/__init__.py', '''\
      """A module that is not one of the topics at all."""
      ''')
  _write(root, 'asyncio/broken.py', 'def f(:\n  """Never parsed."""\n')
  return root


def test_prose_filter():
  assert stdlib_docs.is_prose('The event loop runs callbacks.')
  assert not stdlib_docs.is_prose('Too short here.')
  assert not stdlib_docs.is_prose('>>> print(the message is here)')
  assert not stdlib_docs.is_prose('x = f(a, b) [1, 2] == {3: 4} ** 5')


def test_collect_labels_by_package(stdlib):
  texts, labels = stdlib_docs.collect(stdlib)
  email = stdlib_docs.TOPICS.index('email')
  asyncio = stdlib_docs.TOPICS.index('asyncio')
  assert dict(zip(texts, labels.tolist())) == {
      'The email message is a parsed message.': email,
      'The event loop is the core of every asyncio application.': asyncio,
      'Run the event loop until it is stopped.': asyncio,
  }  # the paragraph found under two topics is dropped; tests, other
  # packages, doctests, short and code-like paragraphs are not examples
  assert labels.dtype == np.int32
  assert list(zip(labels, texts)) == sorted(zip(labels, texts))


def test_split_is_by_text_and_disjoint(stdlib):
  tok = wordpiece.WordPieceTokenizer(VOCAB)
  train, test = stdlib_docs.load_stdlib_docs(tok, seq_len=6,
                                             test_fraction=0.5, root=stdlib)
  assert train['x'].shape[1:] == test['x'].shape[1:] == (6,)
  assert len(train['y']) + len(test['y']) == 3
  texts, _ = stdlib_docs.collect(stdlib)
  ids = tok.encode(texts, 6)
  want = np.array([stdlib_docs.stdlib_corpus.is_heldout(t, 0.5)
                   for t in texts])
  np.testing.assert_array_equal(test['x'], ids[want])
  np.testing.assert_array_equal(train['x'], ids[~want])
  assert (train['x'][:, 0] == VOCAB.index('[CLS]')).all()
  none, everything = stdlib_docs.load_stdlib_docs(tok, 6, 0.0, root=stdlib)
  assert len(everything['y']) == 0 and len(none['y']) == 3
  with pytest.raises(ValueError, match='no docstring paragraphs'):
    stdlib_docs.load_stdlib_docs(tok, 6, 0.2, root=str(stdlib) + '/json')


def test_registry_source_on_this_python(tmp_path):
  """`data.source='stdlib_docs'` on the real stdlib with a tiny vocab:
  ten topics, every one present, ids of `seq_len`, a Dirichlet partition."""
  vocab_dir = tmp_path / 'vocab'
  vocab_dir.mkdir()
  (vocab_dir / 'vocab.txt').write_text('\n'.join(VOCAB) + '\n')
  cfg = registry.default_config()
  cfg.update(dict(source='stdlib_docs', data_dir=str(vocab_dir), seq_len=8,
                  num_clients=20, heldout_clients=2, test_fraction=0.2))
  data = registry.load(cfg)
  assert data.num_classes == len(stdlib_docs.TOPICS) == 10
  assert data.input_shape == (8,)
  assert data.train.num_clients == 20 and data.heldout.num_clients == 2
  assert data.test['x'].dtype == np.int32
  total = sum(len(data.train.client(i)['y']) for i in range(20)) + sum(
      len(data.heldout.client(i)['y']) for i in range(2))
  assert 0.15 < len(data.test['y']) / (total + len(data.test['y'])) < 0.25
  pooled = np.concatenate([data.train.client(i)['y'] for i in range(20)])
  assert set(np.unique(pooled)) == set(range(10))
