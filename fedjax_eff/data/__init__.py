"""Federated datasets, partitions, sources and cohort packing."""

from fedjax_eff.data.cohort import (Cohort, CohortSampler, IndexedCohort,
                                     ResidentData, pack, pack_index)
from fedjax_eff.data.federated import FederatedData
from fedjax_eff.data import partitions, sources
from fedjax_eff.data.registry import DataBundle, default_config
from fedjax_eff.data.registry import load as load_data
from fedjax_eff.data.sources import DatasetNotPreparedError
