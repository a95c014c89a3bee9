"""The same grid as `configs/lm/stdlib.py` on TFF's Stack Overflow (the
real target of Ro et al. and Reddi et al.), for users who have the files.

Download once (we never download): into DIR put
`stackoverflow.sqlite.lzma` and `stackoverflow.word_count.tar.bz2` from
https://storage.googleapis.com/tff-datasets-public/ (or TFF's older h5
files; see fedjax_eff/data/stackoverflow.py). Then

  python launch/train.py \\
      --config=configs/lm/stackoverflow.py:transformer,fedadam,partial,q8 \\
      --workdir=runs/so_tf --config.data.data_dir=DIR

The 10,000 most frequent words (+ pad/bos/eos/oov = 10,004 ids), 20-token
sentences, at most 1,000 per user; `data.num_clients` training users (the
first by id; TFF has 342,477) and `data.heldout_clients` users of the
held-out and test splits for evaluation.
"""

from fedjax_eff.experiment.defaults import sibling_config


def get_config(spec: str = 'transformer,fedadam'):
  c = sibling_config(__file__, 'stdlib', spec)
  c.data.source = 'stackoverflow'
  c.data.vocab_size = 10_000  # words; ids 4.. (TFF's convention)
  c.data.num_clients = 10_000
  c.data.heldout_clients = 1_000
  return c
