"""benchmarks/fedyolo_scale.py: --quick end to end on a tiny Fashion-MNIST
written here (IDX files in tmp: no download, no Debian package needed; a
tiny backbone pretrained, full and head-only fine-tuning; the multi-task run is
left out for time, its property is tests/test_modules.py's), and the
verdict, headline, table and plot on made-up figures of two sizes (nothing
trained)."""

import json

import pytest

from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _load():
  return helpers.load_benchmark('fedyolo_scale')


bench = _load()


def _tiny_fashion(directory):
  helpers.tiny_fashion_mnist(directory, n_train=300)


def test_quick_run_writes_the_headline_and_resumes(tmp_path):
  data = tmp_path / 'fashion'
  data.mkdir()
  _tiny_fashion(str(data))
  argv = ['--quick', '--data_dir', str(data), '--workdir',
          str(tmp_path / 'work'), '--sizes', 'small', '--arms', 'full,head',
          '--rounds', '1', '--pretrain_steps', '2', '--alphas', '0.1',
          '--clients', '6', '--heldout', '2', '--no_multitask',
          '--compile_cache', 'none']
  out = bench.main(argv)
  with open(tmp_path / 'work' / 'fedyolo_scale_quick.json') as f:
    saved = json.load(f)
  head = saved['headline']
  assert head == json.loads(json.dumps(out['headline']))
  assert head['complete'] and not saved['missing']
  assert head['backbone_params']['small'] > 0
  acc, gaps = head['accuracy']['small'], head['gap_to_full']['small']
  assert set(acc) == {'full', 'head'} and set(gaps) == {'head'}
  for a in acc.values():
    assert 0.0 <= a['mean'] <= 1.0 and a['sd'] is None  # one seed
  assert gaps['head']['mean'] == pytest.approx(
      acc['full']['mean'] - acc['head']['mean'], abs=2e-4)
  main = saved['main']['small']
  assert main['upload_kB']['head'] < main['upload_kB']['full']
  assert head['verdict'].startswith('The claim')
  assert (tmp_path / 'work' / 'fedyolo_scale_quick.md').exists()
  # Every run is stored: the same command again trains nothing.
  again = bench.main(argv)
  assert again['headline'] == out['headline'] and again['processes'] == 2


def _made_up(gaps_small, gaps_large):
  """The figures main() assembles, for two sizes (3 seeds)."""
  full = [0.90, 0.91, 0.92]
  main = {}
  for size, gaps in (('small', gaps_small), ('large', gaps_large)):
    accs = {'full': full, **{a: [f - g[i] for i, f in enumerate(full)]
                             for a, g in gaps.items()}}
    main[size] = {
        'accuracy': {a: bench.summarize(v) for a, v in accs.items()},
        'gap': {a: bench.gap(full, v) for a, v in accs.items()
                if a != 'full'},
        'lr': {a: dict(lr=1e-2, lr_at_grid_edge=a == 'full') for a in accs},
        'upload_kB': {a: 10.0 for a in accs}}
  return main


def test_verdict_headline_table_and_plot(tmp_path):
  shrinking = {'lora': [.05, .06, .04], 'adapter': [.08, .07, .09],
               'prompt': [.10, .12, .11], 'head': [.2, .2, .21]}
  under = {'lora': [.01, .012, .008], 'adapter': [.015, .01, .012],
           'prompt': [.018, .012, .015], 'head': [.15, .16, .15]}
  main = _made_up(shrinking, under)
  v = bench.judge(main, ['small', 'large'])
  assert v['summary'].startswith('The claim holds here')
  assert v['per_arm']['lora']['trend'] == 'shrinks'
  assert 'lora +5.0 -> +1.0 points: shrinks' in v['summary']
  assert not v['per_arm']['head']['under_2_points']
  # Gaps that stay: part of the claim at most; larger gaps: not at all.
  assert bench.judge(_made_up(under, under), ['small', 'large'])[
      'summary'].startswith('The claim holds only in part')
  assert bench.judge(_made_up(under, shrinking), ['small', 'large'])[
      'summary'].startswith('The claim does not hold')
  assert v['per_arm']['lora']['gap_largest'] == pytest.approx(0.01)

  out = {'complete': True, 'sizes': ['small', 'large'], 'main': main,
         'rounds': 30, 'clients': 100, 'heldout': 10, 'seeds': [0, 1, 2],
         'extra_seeds': [0, 1], 'alpha_main': 0.1, 'steps_main': 4,
         'backbones': {s: dict(arch=dict(bench.SIZES[s]), params=p,
                               steps=1500, test_accuracy=0.9)
                       for s, p in (('small', 1e5), ('large', 8e5))},
         'extra': {s: {'alpha1/S16': dict(
             arm='lora', full=bench.summarize([.9, .91]),
             module=bench.summarize([.89, .9]),
             gap=bench.gap([.9, .91], [.89, .9]))} for s in ('small',
                                                             'large')},
         'multitask': {'small': {k: dict(
             task0_after_task0=.9, task0_after_task1=.9 - d,
             task1_after_task1=.8, task0_drop=d,
             task0_program_unchanged=d == 0) for k, d in (('lora', 0.0),
                                                          ('full', .2))}},
         'verdict': v, 'missing': [],
         'machine': dict(processor='x', cpus=1, backend='cpu', jax='0',
                         flax='0', optax='0', python='3'),
         'git_head': 'abc', 'command': 'python benchmarks/fedyolo_scale.py',
         'seconds': 60.0, 'processes': 1,
         'plot': 'benchmarks/results/fedyolo_scale.png'}
  head = bench.headline(out)
  assert set(head['gap_to_full']['large']) == set(shrinking)
  assert head['gap_to_full']['large']['lora']['sd'] == pytest.approx(
      0.002, abs=1e-4)
  assert head['other_cells_gap']['large']['alpha1/S16']['arm'] == 'lora'
  assert head['multitask']['small']['full']['task0_drop'] == 0.2
  json.dumps(head)
  md = bench.markdown(out)
  assert md.startswith('## FedYolo at two backbone sizes')
  assert '| large | lora | 0.01 | 0.900 ± 0.011 | +1.0 ± 0.2 | 10.0 |' in md
  assert '| large | full | 0.01 (edge) | 0.910 ± 0.010 |  | 10.0 |' in md
  assert '| small | alpha1/S16 | lora | 0.905 | 0.895 | +1.0 ± 0.0 |' in md
  assert ('| small | shared full fine-tuning | 0.900 | 0.700 | +20.0 | 0.800 '
          '| False |') in md
  assert 'Verdict: The claim holds here' in md
  bench.plot(out, str(tmp_path / 'p.png'))
  pytest.importorskip('matplotlib')
  assert (tmp_path / 'p.png').stat().st_size > 1000
