"""Devices: profiles, availability and simulated time of a client population.

`profiles`: what each client's device can do (throughput, bandwidths, memory,
class) and when it is online; a parametric population and availability
models. `traces`: FedScale's and FLASH's device and availability traces.
`timing`: seconds per client from the compiled program's measured cost
(never an estimate of it), memory tiers, and the synchronous round with
over-selection, deadlines and failures. NumPy only.
"""

from fedjax_eff.devices.profiles import AlwaysAvailable
from fedjax_eff.devices.profiles import Availability
from fedjax_eff.devices.profiles import client_normals
from fedjax_eff.devices.profiles import client_uniforms
from fedjax_eff.devices.profiles import DEFAULT_CLASSES
from fedjax_eff.devices.profiles import DeviceClass
from fedjax_eff.devices.profiles import DeviceProfiles
from fedjax_eff.devices.profiles import diurnal
from fedjax_eff.devices.profiles import DiurnalAvailability
from fedjax_eff.devices.profiles import parametric
from fedjax_eff.devices.profiles import TraceAvailability
from fedjax_eff.devices.profiles import uniform
from fedjax_eff.devices.timing import client_seconds
from fedjax_eff.devices.timing import draw_failures
from fedjax_eff.devices.timing import fits_in_memory
from fedjax_eff.devices.timing import offline_before_finish
from fedjax_eff.devices.timing import plan_round
from fedjax_eff.devices.timing import RoundPlan
from fedjax_eff.devices.timing import tier_by_memory
from fedjax_eff.devices.traces import load_availability
from fedjax_eff.devices.traces import load_fedscale_behaviour
from fedjax_eff.devices.traces import load_fedscale_capacity
from fedjax_eff.devices.traces import load_flash_availability
from fedjax_eff.devices.traces import profiles_from_fedscale
