"""Serving: requests -> in-flight batches -> the model's steps -> statistics and figures.

datasets (``_dataset``), ``--extra_llm_api_options`` (``_options``), the command line's edge that
reads files and environment into objects (``_inputs``), in-flight batching (``_batcher``),
``EXPERT_STATISTIC_*`` recording (``_recorder``), the throughput runner (``_throughput``) and its
figures (``_figures``), processes and hosts (``_devices``), and the whole workflow (``_workflow``).
"""

from jax_eplb.serving._batcher import InFlightBatcher, StepInputs
from jax_eplb.serving._dataset import (Request, load_dataset, prepare_dataset, token_norm_dist,
                                       write_text_dataset)
from jax_eplb.serving._devices import initialize_distributed, process_index_early, to_host
from jax_eplb.serving._figures import TRAFFIC_HEADER, format_figures, format_traffic
from jax_eplb.serving._inputs import (BenchInputs, ServeInputs, check_memory_fits, model_source, read_bench_inputs,
                                     read_serve_inputs)
from jax_eplb.serving._options import ExtraOptions, load_extra_options
from jax_eplb.serving._recorder import DEFAULT_PATH, PATH_VARIABLE, RANGE_VARIABLE, StatisticsRecorder
from jax_eplb.serving._throughput import (ThroughputResult, ThroughputSettings, check_serving, placement_tables,
                                          prepare_serving, run_throughput)

__all__ = [
    "Request", "load_dataset", "prepare_dataset", "token_norm_dist", "write_text_dataset",
    "ExtraOptions", "load_extra_options",
    "BenchInputs", "model_source", "read_bench_inputs", "ServeInputs", "read_serve_inputs", "check_memory_fits",
    "InFlightBatcher", "StepInputs", "StatisticsRecorder", "RANGE_VARIABLE", "PATH_VARIABLE", "DEFAULT_PATH",
    "ThroughputSettings", "ThroughputResult", "run_throughput", "placement_tables", "format_figures",
    "check_serving", "prepare_serving",
    "format_traffic", "TRAFFIC_HEADER",
    "initialize_distributed", "process_index_early", "to_host",
]
