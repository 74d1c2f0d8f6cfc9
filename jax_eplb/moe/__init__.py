"""The expert-parallel MoE block: routers, replica choice, dispatch, the Flax module."""

from jax_eplb.moe._block import (EP_AXIS, RECORD_MODES, EPMoEBlock, ExpertWeights, MoEConfig, MoEOutput,
                                 RouterWeights, chunk_sizes, dense_moe_reference, ep_moe_forward, route,
                                 slot_weights_from_logical, swiglu)
from jax_eplb.moe._dispatch import (GROUPED_MATMULS, TRANSPORTS, DispatchPlan, RaggedOffsets, all_to_all_moe,
                                    dispatch_plan, emulated_ragged_all_to_all, expert_compute, ragged_offsets)
from jax_eplb.moe._replica_choice import POLICIES, load_aware_slots, replica_quotas, round_robin_slots
from jax_eplb.moe._routers import Routing, deepseek_topk, softmax_topk
