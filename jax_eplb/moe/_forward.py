"""The pure EP MoE forward: route -> replica choice -> dispatch / experts / combine, in ``shard_map``.

Axis legend: T tokens, H hidden, E experts, K top-k, S slots, R ranks (mesh axis ``ep``),
m = S/R local slots, M max replicas.

Expert weights live per slot, ``[S, ...]``, sharded over ``ep``; the assignment table
(``replica_count [E]``, ``expert_slots [E, M]``) is an ordinary device array argument, so a new
placement never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_eplb.moe._dispatch import all_to_all_moe, dispatch_rows
from jax_eplb.moe._matmul_choice import ExpertShapes, resolve_grouped_matmul
from jax_eplb.moe._replica_choice import load_aware_slots, round_robin_slots
from jax_eplb.moe._routers import route
from jax_eplb.moe._transport import resolve_transport
from jax_eplb.moe._types import ExpertWeights, MoEConfig, MoEOptions, MoEOutput, RouterWeights
from jax_eplb.sharding import EP_AXIS, num_ranks as mesh_ranks, platform
from jax_eplb_kernels import routing_histogram


def chunk_sizes(local_tokens: int, num_ranks: int, moe_max_num_tokens: int | None) -> list[int]:
    """TensorRT-LLM's chunking: ceil(total / max) chunks, each rank's tokens split near-equally."""
    if not moe_max_num_tokens:
        return [local_tokens]
    chunks = max(1, -(-local_tokens * num_ranks // moe_max_num_tokens))
    return [len(c) for c in np.array_split(np.arange(local_tokens), chunks) if len(c)]


def ep_moe_forward(config: MoEConfig, mesh, router: RouterWeights, slot_experts: ExpertWeights, x: jax.Array,
                   replica_count: jax.Array, expert_slots: jax.Array, *, token_mask: jax.Array | None = None,
                   options: MoEOptions = MoEOptions()) -> MoEOutput:
    """Routed experts for tokens ``x`` ``[T, H]`` sharded over ``ep`` (see MoEOutput).

    Args:
      slot_experts: ``[S, ...]`` sharded over ``ep``.
      replica_count: ``[E]``; expert_slots: ``[E, M]`` (the layer's assignment table).
      token_mask: optional ``[T]`` bool; False tokens (padding, finished requests) route nowhere,
        output zeros and are not counted.
    """
    ranks = mesh_ranks(mesh)
    if x.shape[0] % ranks:
        raise ValueError(f"{x.shape[0]} tokens do not split over ep={ranks} ranks; pad the batch")
    if token_mask is None:
        token_mask = jnp.ones((x.shape[0],), bool)
    on = platform(mesh)
    kernels = "xla" if options.kernel_implementation == "auto" and on != "gpu" else options.kernel_implementation
    sizes = chunk_sizes(x.shape[0] // ranks, ranks, options.moe_max_num_tokens)
    num_slots, hidden, ffn = slot_experts.gate.shape
    shapes = ExpertShapes(rows=max(sizes) * config.top_k, hidden=hidden, ffn=ffn, local_slots=num_slots // ranks,
                          dtype=str(slot_experts.gate.dtype))  # what auto measures at: one rank's biggest chunk
    options = dataclasses.replace(resolve_transport(options, mesh, shapes, config.top_k),
                                  kernel_implementation=kernels,
                                  grouped_matmul=resolve_grouped_matmul(options.grouped_matmul, on, shapes))
    body = functools.partial(_rank_moe, config, options, sizes)
    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(EP_AXIS), P(EP_AXIS), P(), P(), P(EP_AXIS), P(EP_AXIS), P(EP_AXIS), P(), P()),
        out_specs=(P(EP_AXIS), P(), P(EP_AXIS), P(EP_AXIS), P(), P(EP_AXIS)),
        check_vma=False)
    out, rank_load, expert_counts, slot_counts, totals, rows = fn(
        x, token_mask, router.kernel, router.correction_bias, *slot_experts, replica_count, expert_slots)
    record = options.record
    return MoEOutput(out, rank_load, expert_counts if "expert" in record else None,
                     slot_counts if "slot" in record else None, totals if "expert_total" in record else None,
                     rows if "traffic" in record else None)


def _rank_moe(config: MoEConfig, options: MoEOptions, sizes: list[int], x_local, mask_local, kernel, bias,
              w_gate, w_up, w_down, replica_count, expert_slots):
    """One rank's share (inside shard_map): its ``[T/R, H]`` tokens in static chunks."""
    rank = jax.lax.axis_index(EP_AXIS)
    num_ranks = jax.lax.axis_size(EP_AXIS)
    num_slots = w_gate.shape[0] * num_ranks
    record, impl = options.record, options.kernel_implementation
    want_experts = "expert" in record or "expert_total" in record
    outs = []
    rank_load = jnp.zeros((num_ranks,), jnp.int32)
    expert_counts = jnp.zeros((config.num_experts if want_experts else 0,), jnp.int32)
    slot_counts = jnp.zeros((num_slots if "slot" in record else 0,), jnp.int32)
    rows = jnp.zeros((2 if "traffic" in record else 0, num_ranks), jnp.int32)  # [entry/token, R_dst]
    start = 0
    for size in sizes:
        xc, mc = x_local[start:start + size], mask_local[start:start + size]
        start += size
        routing = route(config, RouterWeights(kernel, bias), xc)
        expert_ids = jnp.where(mc[:, None], routing.expert_ids, -1)
        if options.replica_policy == "round_robin":
            chosen = round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank, impl,
                                       with_histogram="slot" in record)
        else:
            chosen = load_aware_slots(expert_ids, replica_count, expert_slots, num_slots, rank, EP_AXIS, impl)
        if want_experts:
            expert_counts += routing_histogram(expert_ids, config.num_experts, implementation=impl)
        if "slot" in record:
            slot_counts += chosen.slot_counts  # fused with the replica choice
        if "traffic" in record:
            rows += dispatch_rows(chosen.slot_ids, num_ranks, w_gate.shape[0])
        out, sent = all_to_all_moe(xc, routing.weights, chosen.slot_ids, w_gate, w_up, w_down, EP_AXIS,
                                   transport=options.transport, grouped_matmul=options.grouped_matmul,
                                   ragged_all_to_all=options.ragged_exchange, dispatch=options.dispatch)
        outs.append(out)
        rank_load = rank_load + sent
    totals = jax.lax.psum(expert_counts, EP_AXIS) if "expert_total" in record else expert_counts[:0]
    return (jnp.concatenate(outs, axis=0), jax.lax.psum(rank_load, EP_AXIS), expert_counts[None],
            slot_counts[None], totals, rows[None])
