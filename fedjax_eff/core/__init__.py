"""The round function, its slow twin, tasks, server optimizers, techniques."""

from fedjax_eff.core.round import (ClientOutput, RoundFns, RoundMetrics,
                                   ServerState, build_client_update,
                                   CLIENTS_AXIS, REPLICAS_AXIS, build_round,
                                   default_chunk_size)
from fedjax_eff.core import autotune
from fedjax_eff.core.reference import build_reference_round
from fedjax_eff.core.server_optimizers import make_optimizer, scale_by_reddi
from fedjax_eff.core.task import (Task, batch_sums, classification, ctc,
                                  next_token)
from fedjax_eff.core.technique import Technique, chain, identity, tree_bits
