"""Differential privacy and secure aggregation.

  dp_fedavg   client-level DP-FedAvg / banded DP-FTRL as a technique:
              clipping, noise on the sum (jax-privacy's privatizers),
              adaptive clipping
  accounting  epsilon at delta for a run (dp-accounting: RDP, PLD), the
              noise multiplier for a target
  secagg      secure aggregation as a codec technique: rotation, integer
              grid, modular sum, the distributed discrete Gaussian
  setup       the run's privacy from `config.privacy`
"""
