r"""Plots runs: quality against round, cumulative upload and simulated time.

  python launch/plot.py runs/x                       # writes runs/x/plot.png
  python launch/plot.py runs/lr0.1 runs/lr0.3 --out lr.png

One figure of up to three panels (`fedjax_eff.plotting.plot_runs`): test
(solid) and held-out (dashed) accuracy, perplexity for language models or
CER for speech, against the round, against the cumulative upload of all
clients (log x) and, where the runs record it, against simulated time.
Several runs are overlaid, each labelled by the config keys in which they
differ. Prints the path written. A RUN without metrics.jsonl ends with one
line and exit status 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from fedjax_eff import plotting  # pylint: disable=g-import-not-at-top


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('runs', nargs='+', metavar='RUN',
                      help='workdirs of launch/train.py')
  parser.add_argument('--out', default=None, metavar='FILE.png',
                      help='default: RUN/plot.png for one run, plot.png '
                      'for several')
  args = parser.parse_args(argv)
  try:
    path, _ = plotting.plot_runs(args.runs, args.out)
  except plotting.RunError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except ImportError as e:
    print(f'error: {e.name or e} is not installed: pip install matplotlib',
          file=sys.stderr)
    sys.exit(2)
  print(path)


if __name__ == '__main__':
  main()
