"""fedjax_eff: cross-device federated learning of big models on small devices,
simulated as one jit-compiled, vmapped round per cohort."""

__version__ = '0.1.0'
