"""The expert-parallel MoE layer, in the order a token flows through it:

routers (``_routers``: hidden -> expert ids and weights) -> replica choice (``_replica_choice``:
expert -> slot, with the batch's load-aware split from ``_split``) -> dispatch / combine
(``_dispatch``: tokens or entries over all_to_all or ragged_all_to_all; ``_transport`` picks one
for ``auto``) -> expert
compute (``_experts``: grouped SwiGLU) -> the pure forward in ``shard_map`` (``_forward``) -> the
Flax NNX block with slot-sharded parameters and its assignment tables (``_block``).
"""

from jax_eplb.moe._block import EPMoEBlock, PlacementTable, SlotParam
from jax_eplb.moe._dispatch import (DispatchPlan, RaggedOffsets, TokenPlan, all_to_all_moe, dispatch_plan,
                                    ragged_offsets, token_plan)
from jax_eplb.moe._experts import expert_compute
from jax_eplb.moe._matmul_choice import ExpertShapes, resolve_grouped_matmul
from jax_eplb.moe._tokamax import require_tokamax, tokamax_unavailable
from jax_eplb.moe._fp8 import (FP8_DTYPE, BlockFp8, Fp8Weight, dequantize, linear_weight, scale_shape,
                               weight_value)
from jax_eplb.moe._forward import chunk_sizes, ep_moe_forward, shared_balance_on, shared_pieces
from jax_eplb.moe._mlp import MLP, swiglu
from jax_eplb.moe._replica_choice import SharedRouting, load_aware_slots, round_robin_slots
from jax_eplb.moe._split import SplitShares, balanced_shares, replica_quotas, replica_shares
from jax_eplb.moe._slots import ExpertSource, HostExperts, as_expert_source, slot_weights_from_logical
from jax_eplb.moe._routers import Routing, deepseek_topk, route, softmax_topk, topk_softmax
from jax_eplb.moe._transport import resolve_transport
from jax_eplb.moe._types import (DISPATCH_MODES, GROUPED_MATMULS, POLICIES, RECORD_MODES, SHARED_BALANCE, TRANSPORTS,
                                 ExpertFunction, ExpertWeights,
                                 MoEConfig, MoEOptions, MoEOutput, RouterWeights)

__all__ = [
    # the block and its configuration
    "EPMoEBlock", "MoEConfig", "MoEOptions", "MoEOutput", "SlotParam", "PlacementTable",
    "POLICIES", "RECORD_MODES", "TRANSPORTS", "DISPATCH_MODES", "GROUPED_MATMULS", "SHARED_BALANCE",
    # weights
    "ExpertWeights", "RouterWeights", "MLP", "swiglu",
    "BlockFp8", "Fp8Weight", "FP8_DTYPE", "dequantize", "linear_weight", "weight_value", "scale_shape",
    "ExpertSource", "HostExperts", "as_expert_source", "slot_weights_from_logical",
    # the pure pieces, in flow order
    "Routing", "route", "softmax_topk", "deepseek_topk", "topk_softmax", "ExpertFunction",
    "round_robin_slots", "load_aware_slots", "SharedRouting", "replica_quotas", "replica_shares",
    "balanced_shares", "SplitShares",
    "DispatchPlan", "dispatch_plan", "TokenPlan", "token_plan", "RaggedOffsets", "ragged_offsets",
    "resolve_transport", "all_to_all_moe", "expert_compute", "ExpertShapes", "resolve_grouped_matmul",
    "require_tokamax", "tokamax_unavailable",
    "chunk_sizes", "ep_moe_forward", "shared_balance_on", "shared_pieces",
]
