"""The expert-parallel MoE block (Flax NNX): router, slot-indexed experts sharded over ``ep``, the
layer's assignment tables, optional shared experts.

Axis legend: T tokens, H hidden, F expert FFN, E experts, S slots, M max replicas, L layers
(when blocks are stacked for ``lax.scan``: every variable gains a leading ``[L]`` axis).

Expert weights are ``SlotParam``s ``[S, ...]`` (slot s holds a copy of expert
``slot_to_expert[s]``), sharded on the slot axis: rank r holds slots ``[r*S/R, (r+1)*S/R)``. With
``weight_block`` they are FP8 e4m3 and each has a scale ``SlotParam`` ``w_*_scale``
``[S, ceil(in/b0), ceil(out/b1)]`` sharded alike; ``slot_experts()`` hands them on as ``BlockFp8``
pairs and the forward dequantizes a rank's slots of one layer right before the grouped matmul. The
tables are ``PlacementTable`` variables (replicated, not parameters) read by the forward as
ordinary arrays, so a new plan changes values, never shapes: nothing recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_eplb._assignment import AssignmentTables
from jax_eplb.moe._fp8 import FP8_DTYPE, BlockFp8, scale_shape
from jax_eplb.moe._forward import ep_moe_forward
from jax_eplb.moe._mlp import MLP
from jax_eplb.moe._slots import slot_weights_from_logical
from jax_eplb.moe._types import ExpertWeights, MoEConfig, MoEOptions, MoEOutput, RouterWeights
from jax_eplb.sharding import over_ranks, replicated

_INIT = jax.nn.initializers.normal(0.02)


class SlotParam(nnx.Param):
    """A slot-indexed expert parameter ``[S, ...]`` (``[L, S, ...]`` stacked), sharded over ``ep``."""


class PlacementTable(nnx.Variable):
    """An assignment table of the block (``slot_to_expert``, ``replica_count``, ``expert_slots``):
    device-resident and replicated, not a parameter."""


class EPMoEBlock(nnx.Module):
    """Router + routed experts per slot (sharded over ``ep``) + optional shared experts.

    Args:
      tables: this layer's placement (``AssignmentTables.layer(i)``: ``slot_to_expert [S]``,
        ``replica_count [E]``, ``expert_slots [E, M]``); its shapes are fixed for the block's life.
      options: how the layer runs (replica policy, transport, recorded histograms, ...).
    Random initialisation draws logical experts ``[E, ...]`` and lays them into the slots (replicas
    of an expert are equal); real weights come from a checkpoint (``jax_eplb.model``).
    """

    def __init__(self, config: MoEConfig, mesh, tables: AssignmentTables, *, options: MoEOptions = MoEOptions(),
                 dtype=jnp.float32, weight_block: tuple[int, int] | None = None, rngs: nnx.Rngs):
        c = config
        self.config, self.mesh, self.options = config, mesh, options
        self.weight_block = None if weight_block is None else tuple(weight_block)
        self.router_kernel = nnx.Param(_INIT(rngs.params(), (c.hidden_size, c.num_experts), jnp.float32))
        self.correction_bias = nnx.Param(jnp.zeros((c.num_experts,), jnp.float32))
        if c.router_logit_bias:
            self.router_bias = nnx.Param(jnp.zeros((c.num_experts,), jnp.float32))
        shapes = c.expert_shapes
        slots = jnp.asarray(tables.slot_to_expert)
        stored = dtype if weight_block is None else FP8_DTYPE
        self.w_gate, self.w_up, self.w_down = (
            SlotParam(jax.device_put(_INIT(rngs.params(), (c.num_experts,) + shape, jnp.float32)[slots].astype(stored),
                                     over_ranks(mesh)))
            for shape in shapes)
        if weight_block is not None:
            self.w_gate_scale, self.w_up_scale, self.w_down_scale = (
                SlotParam(jax.device_put(jnp.ones((len(slots),) + scale_shape(shape, weight_block), jnp.float32),
                                         over_ranks(mesh)))
                for shape in shapes)
        self.shared = MLP(c.hidden_size, c.shared_width, dtype=dtype, weight_block=weight_block,
                          rngs=rngs) if c.num_shared_experts else None
        self.slot_to_expert, self.replica_count, self.expert_slots = (
            PlacementTable(jax.device_put(jnp.asarray(t, jnp.int32), replicated(mesh))) for t in tables)

    # ------------------------------------------------------------------ forward

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> MoEOutput:
        """``x`` ``[T, H]`` -> MoEOutput with ``out`` ``[T, H]`` in x.dtype (shared experts added)."""
        shared = None if self.shared is None else ExpertWeights(*self.shared.weights())
        result = ep_moe_forward(self.config, self.mesh, self.router(), self.slot_experts(), x,
                                self.replica_count.get_value(), self.expert_slots.get_value(),
                                token_mask=token_mask, options=self.options, shared=shared)
        return result._replace(out=result.out.astype(x.dtype))

    def router(self) -> RouterWeights:
        logit_bias = self.router_bias.get_value() if self.config.router_logit_bias else None
        return RouterWeights(self.router_kernel.get_value(), self.correction_bias.get_value(), logit_bias)

    # ------------------------------------------------------------------ placement

    def _slot_params(self) -> ExpertWeights:
        """gate, up, down: the values' ``SlotParam``, or (values, scale) ``SlotParam``s under FP8."""
        values = (self.w_gate, self.w_up, self.w_down)
        if self.weight_block is None:
            return ExpertWeights(*values)
        return ExpertWeights(*zip(values, (self.w_gate_scale, self.w_up_scale, self.w_down_scale)))

    def slot_experts(self) -> ExpertWeights:
        """The slot weights ``[S, ...]`` (``[L, S, ...]`` stacked): arrays, or ``BlockFp8`` under FP8."""
        if self.weight_block is None:
            return ExpertWeights(*(p.get_value() for p in self._slot_params()))
        return ExpertWeights(*(BlockFp8(v.get_value(), s.get_value(), self.weight_block)
                               for v, s in self._slot_params()))

    def set_slot_experts(self, experts: ExpertWeights) -> None:
        """Replaces the slot weights (the structure of ``slot_experts()``: ``BlockFp8`` under FP8)."""
        for params, value in zip(self._slot_params(), experts):
            if self.weight_block is None:
                pairs = [(params, value)]
            elif isinstance(value, BlockFp8) and value.block == self.weight_block:
                pairs = [(params[0], value.values), (params[1], value.scale_inv)]
            else:
                raise ValueError(f"FP8 slot weights in {self.weight_block} blocks expected, got "
                                 f"{type(value).__name__} {getattr(value, 'block', '')}")
            for param, array in pairs:
                if array.shape != param.get_value().shape or (
                        self.weight_block is not None and array.dtype != param.get_value().dtype):
                    raise ValueError(f"slot weights {array.dtype}{list(array.shape)} for a block of "
                                     f"{param.get_value().dtype}{list(param.get_value().shape)}")
                param.set_value(array)

    def tables(self) -> AssignmentTables:
        return AssignmentTables(*(np.asarray(t.get_value()) for t in
                                  (self.slot_to_expert, self.replica_count, self.expert_slots)))

    def set_tables(self, tables: AssignmentTables) -> None:
        """Swaps the assignment tables (same shapes: nothing recompiles). The caller moves the slot
        weights (``set_slot_experts``, or ``set_placement`` from logical experts)."""
        for var, value in zip((self.slot_to_expert, self.replica_count, self.expert_slots), tables):
            if np.shape(value) != var.get_value().shape:
                raise ValueError(f"table of shape {np.shape(value)} for a block whose table is "
                                 f"{var.get_value().shape} (a new plan must keep slots, experts and width)")
            var.set_value(jax.device_put(jnp.asarray(value, jnp.int32), replicated(self.mesh)))

    def set_placement(self, tables: AssignmentTables, logical) -> None:
        """Re-lays the experts from host ``logical`` (``[E, ...]``; stacked: an ``ExpertSource`` or
        ``[L, E, ...]``) under ``tables``."""
        self.set_slot_experts(slot_weights_from_logical(logical, tables.slot_to_expert, self.mesh))
        self.set_tables(tables)
