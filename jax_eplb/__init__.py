"""jax_eplb: expert-parallel load balancing for JAX MoE inference.

The public surface, grouped by the data flow
statistics -> plan -> assignment tables -> (MoE block: ``jax_eplb.moe``; model: ``jax_eplb.model``;
serving: ``jax_eplb.serving``; online balancing: ``jax_eplb.online``) -> statistics.
"""

# Statistics: one in-memory type, TensorRT-LLM / SGLang / NumPy formats.
from jax_eplb._stats import ExpertLoadStats
from jax_eplb._stat_files import load_numpy, load_sglang_json, load_statistics
from jax_eplb._trtllm_dump import load_trtllm_dump, save_trtllm_dump
# Metrics of loads and plans, and the load report.
from jax_eplb._metrics import (LoadMetrics, duplicate_count, load_metrics, project_onto_plan, rank_loads,
                               rank_loads_from_counts, replica_sizes)
from jax_eplb._report import LoadReport, load_report
# Planning.
from jax_eplb.planning import (ALGORITHMS, DeepSeekPlan, LowerBound, PlacementPlan, align_to_previous, balanced_plan,
                               deepseek_plan, deepseek_rebalance, greedy_replication, lower_bound, mask_failed_ranks,
                               plan_placement, slots_moved, trtllm_plan, trtllm_replication)
# Plans as files and as device-ready tables.
from jax_eplb._plan_config import MoeLoadBalancerConfig, plan_config_from_slots
from jax_eplb._assignment import UNUSED_SLOT, AssignmentTables, build_assignment_tables, default_slot_to_expert
from jax_eplb._errors import EplbInputError

__version__ = "0.1.0"

__all__ = [
    "ExpertLoadStats", "load_statistics", "load_trtllm_dump", "save_trtllm_dump", "load_sglang_json", "load_numpy",
    "LoadMetrics", "load_metrics", "rank_loads_from_counts", "project_onto_plan", "replica_sizes", "rank_loads",
    "duplicate_count", "LoadReport", "load_report",
    "ALGORITHMS", "PlacementPlan", "plan_placement", "balanced_plan", "trtllm_plan", "deepseek_plan",
    "deepseek_rebalance", "DeepSeekPlan", "align_to_previous", "slots_moved", "LowerBound", "lower_bound",
    "greedy_replication", "trtllm_replication", "mask_failed_ranks",
    "MoeLoadBalancerConfig", "plan_config_from_slots",
    "AssignmentTables", "build_assignment_tables", "default_slot_to_expert", "UNUSED_SLOT",
    "EplbInputError",
]
