"""jax_eplb: expert-parallel load balancing for JAX MoE inference.

The public surface, grouped by the data flow:
statistics -> plan -> assignment tables -> (MoE block) -> statistics.
"""

# Statistics: one in-memory type, TensorRT-LLM / SGLang / NumPy formats.
from jax_eplb._stats import (ExpertLoadStats, load_numpy, load_sglang_json, load_statistics,
                             load_trtllm_dump, save_trtllm_dump)
# Metrics and the load report.
from jax_eplb._metrics import LoadMetrics, load_metrics, project_onto_plan, rank_loads_from_counts
from jax_eplb._report import LoadReport, load_report
# Planning.
from jax_eplb._replication import LowerBound, greedy_replication, lower_bound, trtllm_replication
from jax_eplb._baseline_planners import DeepSeekPlan, deepseek_plan, deepseek_rebalance, trtllm_plan
from jax_eplb._balanced_planner import balanced_plan
from jax_eplb._planner import ALGORITHMS, PlacementPlan, plan_placement
from jax_eplb._migration import align_to_previous, slots_moved
# Plans as files and as device-ready tables.
from jax_eplb._plan_config import MoeLoadBalancerConfig, plan_config_from_slots
from jax_eplb._assignment import AssignmentTables, build_assignment_tables, default_slot_to_expert
from jax_eplb._errors import EplbInputError

__version__ = "0.1.0"
