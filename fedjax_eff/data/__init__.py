"""Federated datasets, partitions, sources and cohort packing."""

from fedjax_eff.data.cohort import Cohort, CohortSampler, pack
from fedjax_eff.data.federated import FederatedData
