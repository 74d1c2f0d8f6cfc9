"""The expert-parallel MoE block (Flax NNX) and its pure forward function.

Axis legend: T tokens, H hidden, F expert FFN, E experts, K top-k, S slots, R ranks
(mesh axis ``ep``), m = S/R local slots, M max replicas.

Expert weights live per slot, ``[S, ...]``, sharded over ``ep``; the assignment table
(``replica_count [E]``, ``expert_slots [E, M]``) is an ordinary device array argument, so a
new placement never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_eplb.moe._dispatch import all_to_all_moe
from jax_eplb.moe._replica_choice import POLICIES, load_aware_slots, round_robin_slots
from jax_eplb.moe._routers import Routing, deepseek_topk, softmax_topk
from jax_eplb_kernels import routing_histogram

EP_AXIS = "ep"


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    expert_ffn_size: int
    num_experts: int
    top_k: int
    router: str = "softmax"  # "softmax" (Mixtral/Qwen3) or "deepseek"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_ffn_size: int | None = None

    def __post_init__(self):
        if self.router not in ("softmax", "deepseek"):
            raise ValueError(f"router must be 'softmax' or 'deepseek', got {self.router!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) > num_experts ({self.num_experts})")
        if self.router == "deepseek" and self.num_experts % self.n_group:
            raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")


class ExpertWeights(NamedTuple):
    """SwiGLU experts: gate, up ``[X, H, F]``; down ``[X, F, H]`` (X = E logical or S slots)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array


class RouterWeights(NamedTuple):
    kernel: jax.Array  # [H, E]
    correction_bias: jax.Array  # [E] (DeepSeek selection bias; zeros otherwise)


def route(config: MoEConfig, router: RouterWeights, x: jax.Array) -> Routing:
    logits = jnp.dot(x.astype(jnp.float32), router.kernel.astype(jnp.float32))  # [T, E]
    if config.router == "deepseek":
        return deepseek_topk(logits, router.correction_bias, config.top_k, config.n_group, config.topk_group,
                             config.routed_scaling_factor)
    return softmax_topk(logits, config.top_k, config.renormalize)


def swiglu(x, gate, up, down):
    """Dense SwiGLU for ``x`` ``[T, H]`` with ``[H, F]``, ``[H, F]``, ``[F, H]`` weights, float32 out."""
    h = jax.nn.silu(jnp.dot(x, gate, preferred_element_type=jnp.float32)) * jnp.dot(
        x, up, preferred_element_type=jnp.float32)
    return jnp.dot(h.astype(x.dtype), down, preferred_element_type=jnp.float32)


def chunk_sizes(local_tokens: int, num_ranks: int, moe_max_num_tokens: int | None) -> list[int]:
    """TensorRT-LLM's chunking: ceil(total / max) chunks, each rank's tokens split near-equally."""
    if not moe_max_num_tokens:
        return [local_tokens]
    chunks = max(1, -(-local_tokens * num_ranks // moe_max_num_tokens))
    return [len(c) for c in np.array_split(np.arange(local_tokens), chunks) if len(c)]


class MoEOutput(NamedTuple):
    """What one MoE layer returns.

    out:       ``[T, H]`` float32 routed-expert output.
    rank_load: ``[R]`` int32 (token, k) entries each rank computed this call (in-graph balance).
    expert_counts: ``[R, E]`` int32 per-rank histogram of routed logical expert ids, or None
               when not recorded (then it is not computed at all).
    slot_counts: ``[R, S]`` int32 per-rank histogram of the chosen slots, or None.
    expert_totals: ``[E]`` int32 expert histogram summed over ranks in-graph (online balancing),
               or None.
    """

    out: jax.Array
    rank_load: jax.Array
    expert_counts: jax.Array | None
    slot_counts: jax.Array | None
    expert_totals: jax.Array | None = None


RECORD_MODES = ("expert", "slot", "expert_total")


def ep_moe_forward(config: MoEConfig, mesh, router: RouterWeights, slot_experts: ExpertWeights, x: jax.Array,
                   replica_count: jax.Array, expert_slots: jax.Array, *, token_mask: jax.Array | None = None,
                   replica_policy: str = "round_robin", moe_max_num_tokens: int | None = None,
                   record: tuple[str, ...] = (), transport: str = "all_to_all", grouped_matmul: str = "auto",
                   kernel_implementation: str = "auto", ragged_all_to_all=None) -> MoEOutput:
    """Routed experts for tokens ``x`` ``[T, H]`` sharded over ``ep`` (see MoEOutput).

    Args:
      replica_count: ``[E]``; expert_slots: ``[E, M]`` (the layer's assignment table).
      token_mask: optional ``[T]`` bool; False tokens (padding, finished requests) route nowhere,
        output zeros and are not counted.
      record: which histograms to compute: ``"expert"`` (per-rank logical expert ids),
        ``"slot"`` (per-rank slot ids), ``"expert_total"`` (expert ids summed over ranks).
      transport: ``all_to_all`` (fixed capacity, any backend) or ``ragged`` (GPU).
      grouped_matmul: ``ragged_dot``, ``padded`` or ``auto`` (padded on CPU, ragged_dot elsewhere).
      kernel_implementation: routing kernels' choice; ``auto`` picks by the mesh's platform.
      ragged_all_to_all: replaces ``jax.lax.ragged_all_to_all`` (tests emulate it on CPU).
    """
    if replica_policy not in POLICIES:
        raise ValueError(f"replica_policy must be one of {POLICIES}, got {replica_policy!r}")
    record = (record,) if isinstance(record, str) else tuple(record or ())
    if not set(record) <= set(RECORD_MODES):
        raise ValueError(f"record must hold some of {RECORD_MODES}, got {record!r}")
    num_ranks = mesh.shape[EP_AXIS]
    num_slots = slot_experts.gate.shape[0]
    if x.shape[0] % num_ranks:
        raise ValueError(f"{x.shape[0]} tokens do not split over ep={num_ranks} ranks; pad the batch")
    if token_mask is None:
        token_mask = jnp.ones((x.shape[0],), bool)
    sizes = chunk_sizes(x.shape[0] // num_ranks, num_ranks, moe_max_num_tokens)
    platform = mesh.devices.flat[0].platform
    if grouped_matmul == "auto":
        grouped_matmul = "padded" if platform == "cpu" else "ragged_dot"
    if kernel_implementation == "auto" and platform != "gpu":
        kernel_implementation = "xla"

    def body(x_local, mask_local, kernel, bias, w_gate, w_up, w_down, replica_count, expert_slots):
        rank = jax.lax.axis_index(EP_AXIS)
        outs = []
        rank_load = jnp.zeros((num_ranks,), jnp.int32)
        want_experts = "expert" in record or "expert_total" in record
        expert_counts = jnp.zeros((config.num_experts if want_experts else 0,), jnp.int32)
        slot_counts = jnp.zeros((num_slots if "slot" in record else 0,), jnp.int32)
        start = 0
        for size in sizes:  # static chunking
            xc, mc = x_local[start:start + size], mask_local[start:start + size]
            start += size
            routing = route(config, RouterWeights(kernel, bias), xc)
            expert_ids = jnp.where(mc[:, None], routing.expert_ids, -1)
            if replica_policy == "round_robin":
                chosen = round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank,
                                           kernel_implementation, with_histogram="slot" in record)
            else:
                chosen = load_aware_slots(expert_ids, replica_count, expert_slots, num_slots, rank, EP_AXIS,
                                          kernel_implementation)
            slots = chosen.slot_ids
            if want_experts:
                expert_counts += routing_histogram(expert_ids, config.num_experts, implementation=kernel_implementation)
            if "slot" in record:
                slot_counts += chosen.slot_counts  # fused with the replica choice
            out, sent = all_to_all_moe(xc, routing.weights, slots, w_gate, w_up, w_down, EP_AXIS, transport=transport,
                                       grouped_matmul=grouped_matmul, ragged_all_to_all=ragged_all_to_all)
            outs.append(out)
            rank_load = rank_load + sent
        totals = jax.lax.psum(expert_counts, EP_AXIS) if "expert_total" in record else expert_counts[:0]
        return (jnp.concatenate(outs, axis=0), jax.lax.psum(rank_load, EP_AXIS), expert_counts[None],
                slot_counts[None], totals)

    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(EP_AXIS), P(EP_AXIS), P(), P(), P(EP_AXIS), P(EP_AXIS), P(EP_AXIS), P(), P()),
        out_specs=(P(EP_AXIS), P(), P(EP_AXIS), P(EP_AXIS), P()),
        check_vma=False)
    out, rank_load, expert_counts, slot_counts, totals = fn(
        x, token_mask, router.kernel, router.correction_bias, slot_experts.gate, slot_experts.up, slot_experts.down,
        replica_count, expert_slots)
    return MoEOutput(out, rank_load, expert_counts if "expert" in record else None,
                     slot_counts if "slot" in record else None, totals if "expert_total" in record else None)


def slot_weights_from_logical(logical: ExpertWeights, slot_to_expert, mesh) -> ExpertWeights:
    """Lays host/logical experts into slots, sharded over ``ep`` on the slot axis.

    ``slot_to_expert`` ``[S]`` takes experts ``[E, ...]`` -> ``[S, ...]``; ``[L, S]`` takes
    stacked layers ``[L, E, ...]`` -> ``[L, S, ...]``. Each device's shard is gathered from the
    host copy for its own slots only: no device ever holds all experts.
    """
    index = np.asarray(slot_to_expert)
    layered = index.ndim == 2
    sharding = NamedSharding(mesh, P(None, EP_AXIS) if layered else P(EP_AXIS))
    layer = np.arange(index.shape[0])[:, None]

    def lay(w):
        host = np.asarray(w)

        def shard(idx):
            return host[layer[idx[0]], index[idx[0], idx[1]]] if layered else host[index[idx[0]]]

        return jax.make_array_from_callback(index.shape + host.shape[index.ndim:], sharding, shard)

    return ExpertWeights(*(lay(w) for w in logical))


class EPMoEBlock(nnx.Module):
    """Router + routed experts (per slot, sharded over ``ep``) + optional shared experts."""

    def __init__(self, config: MoEConfig, mesh, slot_to_expert, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 replica_policy: str = "round_robin", moe_max_num_tokens: int | None = None,
                 record: tuple[str, ...] = (), transport: str = "all_to_all"):
        self.config, self.mesh = config, mesh
        self.forward_options = dict(replica_policy=replica_policy, moe_max_num_tokens=moe_max_num_tokens,
                                    record=record, transport=transport)
        c = config
        init = jax.nn.initializers.normal(0.02)
        self.router_kernel = nnx.Param(init(rngs.params(), (c.hidden_size, c.num_experts), jnp.float32))
        self.correction_bias = nnx.Param(jnp.zeros((c.num_experts,), jnp.float32))
        logical = ExpertWeights(
            init(rngs.params(), (c.num_experts, c.hidden_size, c.expert_ffn_size), dtype),
            init(rngs.params(), (c.num_experts, c.hidden_size, c.expert_ffn_size), dtype),
            init(rngs.params(), (c.num_experts, c.expert_ffn_size, c.hidden_size), dtype))
        slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
        self.w_gate, self.w_up, self.w_down = (nnx.Param(w) for w in slots)
        if c.num_shared_experts:
            f = (c.shared_ffn_size or c.expert_ffn_size) * c.num_shared_experts
            self.shared = nnx.Param(ExpertWeights(init(rngs.params(), (c.hidden_size, f), dtype),
                                                  init(rngs.params(), (c.hidden_size, f), dtype),
                                                  init(rngs.params(), (f, c.hidden_size), dtype)))
        else:
            self.shared = None

    def load_experts(self, logical: ExpertWeights, slot_to_expert) -> None:
        """Replaces the slot weights from logical experts under a (new) placement."""
        for param, value in zip((self.w_gate, self.w_up, self.w_down),
                                slot_weights_from_logical(logical, slot_to_expert, self.mesh)):
            param.set_value(value)

    def __call__(self, x, replica_count, expert_slots, token_mask=None) -> MoEOutput:
        """``x`` ``[T, H]`` -> MoEOutput with ``out`` ``[T, H]`` in x.dtype (shared experts added)."""
        result = ep_moe_forward(
            self.config, self.mesh, RouterWeights(self.router_kernel.get_value(), self.correction_bias.get_value()),
            ExpertWeights(self.w_gate.get_value(), self.w_up.get_value(), self.w_down.get_value()), x,
            replica_count, expert_slots, token_mask=token_mask, **self.forward_options)
        out = result.out
        if self.shared is not None:
            out = out + swiglu(x, *self.shared.get_value())
        return result._replace(out=out.astype(x.dtype))


def dense_moe_reference(config: MoEConfig, router: RouterWeights, logical: ExpertWeights, x, shared=None):
    """Single-device dense MoE in float32: a loop over logical experts (the test oracle)."""
    x = x.astype(jnp.float32)
    routing = route(config, router, x)
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(config.num_experts):
        weight = jnp.sum(jnp.where(routing.expert_ids == e, routing.weights, 0.0), axis=1)  # [T]
        out = out + weight[:, None] * swiglu(x, *(w[e].astype(jnp.float32) for w in logical))
    if shared is not None:
        out = out + swiglu(x, *(w.astype(jnp.float32) for w in shared))
    return out
