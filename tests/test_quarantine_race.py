"""Two processes restoring one checkpoint directory must not race when a
checkpoint is unreadable (issue 21, item 8).

Under `jax.distributed` every process calls `RunCheckpointer.restore_latest`
on the shared `workdir/checkpoints`; orbax's restore ends in a barrier, so
the processes try the same steps in lockstep and all find the newest one
unreadable. If each moved it to `checkpoints_unreadable/`, the first move
would win and the second would raise FileNotFoundError (the step is gone),
ending that process's run: only process 0 moves, and a step already gone
is not an error. The test plays two restorers with two threads (two
checkpointers on one directory) held together where each checks a
restored step's digest.
"""

import json
import os
import threading

import numpy as np

from fedjax_eff.experiment import checkpoints


def _corrupt_digest(directory, step):
  path = os.path.join(directory, str(step), checkpoints.DIGEST_FILE)
  with open(path) as f:
    digest = json.load(f)
  digest['sha256'] = '0' * 64  # the bytes no longer match what was saved
  with open(path, 'w') as f:
    json.dump(digest, f)


def test_two_restorers_quarantine_once_and_both_fall_back(tmp_path,
                                                          monkeypatch):
  directory = str(tmp_path / 'checkpoints')
  item = {'w': np.arange(4, dtype=np.float32)}
  writer = checkpoints.RunCheckpointer(directory)
  writer.save(1, {'w': item['w'] + 1})
  writer.save(2, {'w': item['w'] + 2})
  writer.close()
  _corrupt_digest(directory, 2)
  # Both "processes" open the directory, then restore together: each
  # waits for the other before checking a restored step's digest.
  managers = [checkpoints.RunCheckpointer(directory) for _ in range(2)]
  together = threading.Barrier(2, timeout=60)
  digest = checkpoints.tree_sha256

  def lockstep(tree):
    together.wait()
    return digest(tree)
  monkeypatch.setattr(checkpoints, 'tree_sha256', lockstep)
  results = [None, None]

  def restore(i):
    try:
      results[i] = managers[i].restore_latest(item)
    except BaseException as e:  # pylint: disable=broad-except
      results[i] = e
      together.abort()
  threads = [threading.Thread(target=restore, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  for m in managers:
    m.close()
  for r in results:
    assert not isinstance(r, BaseException), repr(r)
    restored, step = r
    assert step == 1
    np.testing.assert_array_equal(restored['w'], item['w'] + 1)
  assert sorted(os.listdir(directory)) == ['1']
  assert len(os.listdir(directory + '_unreadable')) == 1
