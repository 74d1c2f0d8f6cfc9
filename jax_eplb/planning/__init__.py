"""Planning: ``[L, E]`` expert loads -> a placement ``slot_to_expert [L, S]``.

``plan_placement`` is the entry point; the modules behind it, in the order a plan is made:
replica counts (``_replication``), packing replicas onto ranks (``_packing``), TensorRT-LLM's and
DeepSeek's planners reproduced exactly (``_baselines``), our balanced planner (``_balanced``)
with its swap refinement (``_refine``), migration-aware re-planning (``_migration``), plans
around failed ranks (``_failed_ranks``), and the flow planner (``_flow``) with its model of the
runtime's load-aware split (``_split``).
"""

from jax_eplb.planning._api import ALGORITHMS, PlacementPlan, plan_placement
from jax_eplb.planning._balanced import balanced_plan
from jax_eplb.planning._baselines import DeepSeekPlan, deepseek_plan, deepseek_rebalance, trtllm_plan
from jax_eplb.planning._failed_ranks import mask_failed_ranks, serving_ranks
from jax_eplb.planning._flow import flow_plan, linked_plans, sample_iterations
from jax_eplb.planning._split import SPLIT_PASSES, per_iteration_imbalance, split_rank_loads
from jax_eplb.planning._migration import align_to_previous, slots_moved
from jax_eplb.planning._replication import LowerBound, greedy_replication, lower_bound, trtllm_replication

__all__ = [
    "ALGORITHMS", "PlacementPlan", "plan_placement",
    "balanced_plan", "trtllm_plan", "deepseek_plan", "deepseek_rebalance", "DeepSeekPlan",
    "align_to_previous", "slots_moved", "mask_failed_ranks", "serving_ranks",
    "flow_plan", "linked_plans", "sample_iterations", "split_rank_loads", "per_iteration_imbalance",
    "SPLIT_PASSES",
    "LowerBound", "lower_bound", "greedy_replication", "trtllm_replication",
]
