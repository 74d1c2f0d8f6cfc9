"""Serving-side tools: datasets, extra options, devices, statistics recording, the throughput runner."""

from jax_eplb.serving._dataset import Request, load_dataset, prepare_dataset
from jax_eplb.serving._devices import emulate_cpu_devices, ep_mesh, initialize_distributed, to_host
from jax_eplb.serving._options import ExtraOptions, load_extra_options
from jax_eplb.serving._recorder import DEFAULT_PATH, PATH_VARIABLE, RANGE_VARIABLE, StatisticsRecorder
from jax_eplb.serving._throughput import ThroughputResult, ThroughputSettings, format_figures, run_throughput
