"""The experiment loop, checkpoints and metric writers."""

from fedjax_eff.experiment.train import (Experiment, params_sha256,
                                         train_and_evaluate)
