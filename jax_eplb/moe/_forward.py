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
from jax_eplb.moe._fp8 import BlockFp8, dequantize
from jax_eplb.moe._matmul_choice import ExpertShapes, resolve_grouped_matmul
from jax_eplb.moe._mlp import swiglu
from jax_eplb.moe._replica_choice import load_aware_slots, round_robin_slots
from jax_eplb.moe._routers import route
from jax_eplb.moe._transport import resolve_transport
from jax_eplb.moe._types import ExpertWeights, MoEConfig, MoEOptions, MoEOutput, RouterWeights
from jax_eplb.sharding import EP_AXIS, num_ranks as mesh_ranks, platform
from jax_eplb_kernels import on_platform, routing_histogram


def chunk_sizes(local_tokens: int, num_ranks: int, moe_max_num_tokens: int | None) -> list[int]:
    """TensorRT-LLM's chunking: ceil(total / max) chunks, each rank's tokens split near-equally."""
    if not moe_max_num_tokens:
        return [local_tokens]
    chunks = max(1, -(-local_tokens * num_ranks // moe_max_num_tokens))
    return [len(c) for c in np.array_split(np.arange(local_tokens), chunks) if len(c)]


def ep_moe_forward(config: MoEConfig, mesh, router: RouterWeights, slot_experts: ExpertWeights, x: jax.Array,
                   replica_count: jax.Array, expert_slots: jax.Array, *, token_mask: jax.Array | None = None,
                   options: MoEOptions = MoEOptions(), shared: ExpertWeights | None = None) -> MoEOutput:
    """Routed experts (and ``shared`` ones) for tokens ``x`` ``[T, H]`` sharded over ``ep`` (see MoEOutput).

    Args:
      slot_experts: ``[S, ...]`` sharded over ``ep``.
      replica_count: ``[E]``; expert_slots: ``[E, M]`` (the layer's assignment table).
      token_mask: optional ``[T]`` bool; False tokens (padding, finished requests) route nowhere,
        output zeros and are not counted.
      shared: the shared experts together (gate, up ``[H, Fs]``; down ``[Fs, H]``), replicated; added
        to ``out``. Balanced (``options.shared_expert_balance``): each token's shared row is computed
        on the rank the split gives it, as ``ceil(Fs / F)`` more entries of one more local slot group
        per rank (the shared FFN cut into expert-width pieces, the last zero-padded).
    """
    ranks = mesh_ranks(mesh)
    if x.shape[0] % ranks:
        raise ValueError(f"{x.shape[0]} tokens do not split over ep={ranks} ranks; pad the batch")
    if token_mask is None:
        token_mask = jnp.ones((x.shape[0],), bool)
    on = platform(mesh)
    sizes = chunk_sizes(x.shape[0] // ranks, ranks, options.moe_max_num_tokens)
    num_slots, hidden, ffn = slot_experts.gate.shape  # hidden: H + 1 where the weights carry bias rows
    compute_dtype = x.dtype if isinstance(slot_experts.gate, BlockFp8) else slot_experts.gate.dtype
    # what auto measures at: one rank's biggest chunk
    shapes = ExpertShapes(rows=max(sizes) * config.top_k, hidden=hidden - int(config.expert_bias), ffn=ffn,
                          local_slots=num_slots // ranks, dtype=str(compute_dtype))
    options = dataclasses.replace(resolve_transport(options, mesh, shapes, config.top_k),
                                  grouped_matmul=resolve_grouped_matmul(options.grouped_matmul, on, shapes,
                                                                        mesh.devices.flat[0]))
    balance = shared is not None and shared_balance_on(options, ranks)
    pieces = shared_pieces(shared, ffn) if balance else ()
    body = functools.partial(_rank_moe, config, options, sizes)
    logit_bias = router.logit_bias if router.logit_bias is not None else jnp.zeros((config.num_experts,), jnp.float32)
    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(EP_AXIS), P(EP_AXIS), P(), P(), P(), P(EP_AXIS), P(), P())
        + (P(),) * len(pieces),
        out_specs=(P(EP_AXIS), P(), P(), P(EP_AXIS), P(EP_AXIS), P(), P(EP_AXIS)),
        check_vma=False)
    with on_platform(on):  # the routing kernels' 'auto' decides by the mesh's platform
        out, rank_load, shared_rows, expert_counts, slot_counts, totals, rows = fn(
            x, token_mask, router.kernel, router.correction_bias, logit_bias, slot_experts, replica_count, expert_slots,
            *pieces)
    rank_rows = rank_load + shared_rows  # balanced: the shared pieces each rank computed
    if shared is not None and not balance:
        out = out + jnp.where(token_mask[:, None], swiglu(x, *shared), 0.0)
        own = token_mask.reshape(ranks, -1).sum(axis=1, dtype=jnp.int32)  # [R] each rank's own tokens
        rank_rows = rank_load + own * -(-shared.gate.shape[1] // ffn)
    record = options.record
    return MoEOutput(out, rank_load, expert_counts if "expert" in record else None,
                     slot_counts if "slot" in record else None, totals if "expert_total" in record else None,
                     rows if "traffic" in record else None, rank_rows)


def shared_balance_on(options: MoEOptions, num_ranks: int) -> bool:
    """Whether a layer with shared experts balances their rows (``MoEOptions.shared_expert_balance``)."""
    if options.shared_expert_balance == "auto":
        return options.replica_policy == "load_aware" and num_ranks > 1
    return options.shared_expert_balance == "on"


def shared_pieces(shared: ExpertWeights, ffn: int) -> ExpertWeights:
    """The shared FFN ``[H, Fs]`` / ``[Fs, H]`` as ``ceil(Fs / F)`` expert-width pieces ``[n, H, F]`` /
    ``[n, F, H]`` (zero-padded: a zero gate and up column and down row add nothing to SwiGLU)."""
    width = shared.gate.shape[1]
    count = -(-width // ffn)
    pad = count * ffn - width
    gate, up = (jnp.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], count, ffn).transpose(1, 0, 2)
                for w in (shared.gate, shared.up))
    down = jnp.pad(shared.down, ((0, pad), (0, 0))).reshape(count, ffn, -1)
    return ExpertWeights(gate, up, down)


def _rank_moe(config: MoEConfig, options: MoEOptions, sizes: list[int], x_local, mask_local, kernel, bias,
              logit_bias, slot_experts, replica_count, expert_slots, *shared):
    """One rank's share (inside shard_map): its ``[T/R, H]`` tokens in static chunks; ``slot_experts``
    its local slots ``[m, ...]`` (FP8 ``BlockFp8`` dequantized here, once per layer, right before
    the matmuls); ``shared``: the shared FFN's pieces (balanced shared experts: one more local slot
    group per piece)."""
    w_gate, w_up, w_down = (dequantize(w, x_local.dtype) for w in slot_experts)
    rank = jax.lax.axis_index(EP_AXIS)
    num_ranks = jax.lax.axis_size(EP_AXIS)
    local_slots = w_gate.shape[0]
    num_slots = local_slots * num_ranks
    pieces = shared[0].shape[0] if shared else 0
    if shared:  # the shared pieces become local slots local_slots .. local_slots + pieces - 1 on every rank
        w_gate, w_up, w_down = (jnp.concatenate([w, s.astype(w.dtype)]) for w, s in zip((w_gate, w_up, w_down), shared))
    record, impl = options.record, options.kernel_implementation
    want_experts = "expert" in record or "expert_total" in record
    outs = []
    rank_load = jnp.zeros((num_ranks,), jnp.int32)
    shared_rows = jnp.zeros((num_ranks,), jnp.int32)
    expert_counts = jnp.zeros((config.num_experts if want_experts else 0,), jnp.int32)
    slot_counts = jnp.zeros((num_slots if "slot" in record else 0,), jnp.int32)
    rows = jnp.zeros((2 if "traffic" in record else 0, num_ranks), jnp.int32)  # [entry/token, R_dst]
    start = 0
    for size in sizes:
        xc, mc = x_local[start:start + size], mask_local[start:start + size]
        start += size
        routing = route(config, RouterWeights(kernel, bias, logit_bias if config.router_logit_bias else None), xc)
        expert_ids = jnp.where(mc[:, None], routing.expert_ids, -1)
        if options.replica_policy == "round_robin":
            chosen = round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank, impl,
                                       with_histogram="slot" in record)
        elif shared:
            chosen, shared_routing = load_aware_slots(expert_ids, replica_count, expert_slots, num_slots, rank,
                                                      EP_AXIS, impl, shared_mask=mc, rows_per_token=pieces)
        else:
            chosen = load_aware_slots(expert_ids, replica_count, expert_slots, num_slots, rank, EP_AXIS, impl)
        slot_ids, weights = chosen.slot_ids, routing.weights
        if shared:
            slot_ids, weights = _with_shared_entries(slot_ids, weights, shared_routing.shared_rank, local_slots,
                                                     pieces, num_ranks)
        if want_experts:
            expert_counts += routing_histogram(expert_ids, config.num_experts, implementation=impl)
        if "slot" in record:
            slot_counts += chosen.slot_counts  # fused with the replica choice
        if "traffic" in record:
            rows += dispatch_rows(slot_ids, num_ranks, w_gate.shape[0])
        out, sent = all_to_all_moe(xc, weights, slot_ids, w_gate, w_up, w_down, EP_AXIS,
                                   transport=options.transport, grouped_matmul=options.grouped_matmul,
                                   ragged_all_to_all=options.ragged_exchange, dispatch=options.dispatch,
                                   function=config.expert_function)
        outs.append(out)
        rank_load = rank_load + sent
        if shared:  # sent counts the shared pieces too: keep them apart
            shared_rows = shared_rows + shared_routing.shared_counts * pieces
    totals = jax.lax.psum(expert_counts, EP_AXIS) if "expert_total" in record else expert_counts[:0]
    shared_rows = jax.lax.psum(shared_rows, EP_AXIS)
    return (jnp.concatenate(outs, axis=0), jax.lax.psum(rank_load, EP_AXIS) - shared_rows, shared_rows,
            expert_counts[None], slot_counts[None], totals, rows[None])


def _with_shared_entries(slot_ids, weights, shared_rank, local_slots: int, pieces: int, num_ranks: int):
    """``[T, K]`` routed slots (numbered ``rank * m + local``) and weights -> ``[T, K + n]`` in the
    numbering with n shared pieces per rank (``rank * (m + n) + local``), each token's n shared
    entries (weight 1) on ``shared_rank`` ``[T]`` (R: none)."""
    width = local_slots + pieces
    routed = jnp.where(slot_ids < num_ranks * local_slots,
                       slot_ids // local_slots * width + slot_ids % local_slots, num_ranks * width)
    own = jnp.where((shared_rank < num_ranks)[:, None],
                    shared_rank[:, None] * width + local_slots + jnp.arange(pieces)[None], num_ranks * width)
    return (jnp.concatenate([routed, own], axis=1).astype(jnp.int32),
            jnp.concatenate([weights, jnp.ones((weights.shape[0], pieces), weights.dtype)], axis=1))
