"""Dispatch -> expert compute -> combine, per EP rank inside ``shard_map``.

Axis legend: T local tokens, K top-k, N = T*K entries, H hidden, R ranks, m local slots per
rank; items are a rank's N entries (in token mode only a token's first entry per rank travels).

Two dispatch modes say what travels:

* ``token`` (default; DeepEP's way): a token goes once to each rank that holds any of its k
  slots (as its first entry there), with its k local slots and weights there (m / 0 for entries
  elsewhere); the destination expands it to its entries, runs them, and combines them weighted
  before the return trip, so a token comes back once per rank as well. The source sums what comes
  back (float32).
* ``entry``: every (token, k) entry travels on its own and is weighted at the source.

Two transports move the rows; both dropless (a rank may send every item to one destination):

* ``all_to_all``: fixed capacity; every rank ships ``[R, B, H]`` whatever the routing, B = T
  (token mode) or N (entry mode). Runs everywhere, XLA:CPU included.
* ``ragged``: ``jax.lax.ragged_all_to_all`` ships only the real rows (GPU; XLA:CPU lacks it);
  receive buffer ``[R * B, H]``, send buffer ``min(K, R) * T`` (token) or N (entry) rows.

Buffers per rank and layer (rows of H; ``moe_max_num_tokens`` bounds T per chunk):
all_to_all sends and receives ``R * B`` rows each way; ragged sends the real rows and keeps a
``R * B`` receive buffer. docs/benchmarks.md has the bytes for DeepSeek-V3.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jax_eplb.moe._experts import expert_compute
from jax_eplb.moe._types import DISPATCH_MODES, TRANSPORTS, ExpertFunction


class DispatchPlan(NamedTuple):
    """Entry-mode routing metadata of one rank (pure function of the slot ids).

    destination: ``[N]`` rank of each entry's slot (R for invalid entries).
    position:    ``[N]`` row of the entry in its destination's receive block.
    local_slot:  ``[N]`` slot index on the destination rank (m for invalid entries).
    send_counts: ``[R]`` entries sent to each rank.
    """

    destination: jax.Array
    position: jax.Array
    local_slot: jax.Array
    send_counts: jax.Array


class TokenPlan(NamedTuple):
    """Token-mode routing metadata of one rank. Items are the entries, as in entry mode, but only a
    token's first entry on each rank travels (carrying the token once to that rank).

    destination: ``[N]`` rank of entry (t, k) if it is token t's first entry there, else R (not sent).
    position:    ``[N]`` row of the item in its destination's receive block (< T).
    local_slots: ``[N, K]`` for a travelling entry, the local slot of each of its token's entries on
      that rank (m: elsewhere or invalid).
    send_counts: ``[R]`` tokens sent to each rank.
    entry_counts: ``[R]`` (token, k) entries each rank serves for these tokens.
    """

    destination: jax.Array
    position: jax.Array
    local_slots: jax.Array
    send_counts: jax.Array
    entry_counts: jax.Array


def _positions(destination: jax.Array, num_ranks: int):
    """``[I]`` destinations (R: none) -> each item's row among the items to its rank, and ``[R]`` counts."""
    onehot = (destination[:, None] == jnp.arange(num_ranks)[None, :]).astype(jnp.int32)  # [I, R]
    before = jnp.cumsum(onehot, axis=0) - onehot
    position = jnp.take_along_axis(before, jnp.minimum(destination, num_ranks - 1)[:, None], axis=1)[:, 0]
    return position, onehot.sum(axis=0)


def dispatch_plan(slot_ids: jax.Array, num_ranks: int, slots_per_rank: int) -> DispatchPlan:
    """``[T, K]`` global slot ids (``R*m`` = invalid) -> where every entry goes."""
    flat = slot_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_ranks * slots_per_rank)
    destination = jnp.where(valid, flat // slots_per_rank, num_ranks)
    position, send_counts = _positions(destination, num_ranks)
    return DispatchPlan(destination, position, jnp.where(valid, flat % slots_per_rank, slots_per_rank), send_counts)


def token_plan(slot_ids: jax.Array, num_ranks: int, slots_per_rank: int) -> TokenPlan:
    """``[T, K]`` global slot ids -> which ranks each token goes to, once each."""
    num_tokens, top_k = slot_ids.shape
    valid = (slot_ids >= 0) & (slot_ids < num_ranks * slots_per_rank)
    entry_rank = jnp.where(valid, slot_ids // slots_per_rank, num_ranks)  # [T, K]
    same_rank = valid[:, :, None] & valid[:, None, :] & (entry_rank[:, :, None] == entry_rank[:, None, :])  # [T, K, K]
    first = valid & ~jnp.any(same_rank & jnp.tri(top_k, k=-1, dtype=bool)[None], axis=2)  # no earlier entry there
    destination = jnp.where(first, entry_rank, num_ranks).reshape(-1)
    position, send_counts = _positions(destination, num_ranks)
    local = jnp.where(same_rank, (slot_ids % slots_per_rank)[:, None, :], slots_per_rank)
    entry_counts = jnp.sum(entry_rank.reshape(-1, 1) == jnp.arange(num_ranks)[None], axis=0)
    return TokenPlan(destination, position, local.reshape(num_tokens * top_k, top_k), send_counts, entry_counts)


DISPATCH_ROW_ORDER = ("entry", "token")  # the order of ``dispatch_rows``' first axis


def dispatch_rows(slot_ids: jax.Array, num_ranks: int, slots_per_rank: int) -> jax.Array:
    """``[T, K]`` global slot ids -> ``[2, R]`` rows each dispatch mode sends to each rank (entry mode:
    entries; token mode: tokens): the send counts of both plans (what is not needed is not computed)."""
    return jnp.stack([dispatch_plan(slot_ids, num_ranks, slots_per_rank).send_counts,
                      token_plan(slot_ids, num_ranks, slots_per_rank).send_counts])


class RaggedOffsets(NamedTuple):
    """``ragged_all_to_all`` arguments of one rank, from the all-gathered ``[R, R]`` send counts.

    Dispatch: this rank's items sorted by destination; the block for rank d starts at
    ``send_offsets[d]`` and lands at row ``rank * B`` of d's receive buffer.
    Return: the receive block from source s (rows ``s*B ...``) goes back to
    ``send_offsets`` of s for this rank.
    """

    send_offsets: jax.Array  # [R] where each destination's block starts in my sorted items
    recv_counts: jax.Array  # [R] rows I receive from each source
    return_offsets: jax.Array  # [R] where my results for source s land in s's sorted items


def ragged_offsets(all_send_counts: jax.Array, rank) -> RaggedOffsets:
    """``all_send_counts`` ``[R_src, R_dst]`` -> this rank's offsets (pure)."""
    exclusive = jnp.cumsum(all_send_counts, axis=1) - all_send_counts  # [src, dst] start in src's order
    return RaggedOffsets(exclusive[rank], all_send_counts[:, rank], exclusive[:, rank])


RaggedAllToAll = Callable[..., jax.Array]


class _Route(NamedTuple):
    """What an exchange needs: items' destination/position/counts, the block B and the send rows."""

    destination: jax.Array
    position: jax.Array
    send_counts: jax.Array
    block: int
    send_rows: int


def all_to_all_moe(x: jax.Array, weights: jax.Array, slot_ids: jax.Array, w_gate, w_up, w_down,
                   axis_name: str, *, transport: str = "all_to_all", grouped_matmul: str = "ragged_dot",
                   ragged_all_to_all: RaggedAllToAll | None = None, dispatch: str = "token",
                   function: ExpertFunction = ExpertFunction()):
    """One rank's MoE: x ``[T, H]``, weights/slot_ids ``[T, K]`` -> (``[T, H]`` f32, ``[R]`` entries sent).

    The second output is the number of entries (not rows) this rank sent to each rank (``psum`` it
    for the per-rank load). ``ragged_all_to_all`` overrides the primitive of the ``ragged``
    transport (backends that lack it can pass an emulation).
    """
    if transport not in TRANSPORTS or transport == "auto":
        raise ValueError(f"transport must be one of {TRANSPORTS[1:]} here (resolve 'auto' first), got {transport!r}")
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
    num_tokens, hidden = x.shape
    top_k = slot_ids.shape[1]
    num_ranks, slots_per_rank = jax.lax.axis_size(axis_name), w_gate.shape[0]

    def run(rows, row_slot):
        with jax.named_scope("moe/experts"):
            return expert_compute(rows, row_slot, w_gate, w_up, w_down, grouped_matmul=grouped_matmul,
                                  function=function)

    if transport == "all_to_all":
        exchange = _fixed_capacity_exchange
    else:
        primitive = ragged_all_to_all or jax.lax.ragged_all_to_all
        exchange = lambda *args: _ragged_exchange(*args, primitive)  # noqa: E731
    rows = x[jnp.arange(num_tokens * top_k) // top_k]  # [N, H]: item (t, k) carries token t
    if dispatch == "entry":
        plan = dispatch_plan(slot_ids, num_ranks, slots_per_rank)
        route = _Route(plan.destination, plan.position, plan.send_counts, num_tokens * top_k, num_tokens * top_k)
        mine = exchange(rows, ((plan.local_slot[:, None], slots_per_rank),), route,
                        lambda r, slot: run(r, slot[:, 0]), axis_name)
        weighted, served = mine * weights.astype(jnp.float32).reshape(-1, 1), plan.send_counts
    else:  # weighted and combined on the destination already
        plan = token_plan(slot_ids, num_ranks, slots_per_rank)
        route = _Route(plan.destination, plan.position, plan.send_counts, num_tokens,
                       num_tokens * min(top_k, num_ranks))
        item_weights = jnp.repeat(weights.astype(jnp.float32), top_k, axis=0)  # [N, K]: the token's weights
        payload = ((plan.local_slots, slots_per_rank), (item_weights, 0.0))
        weighted = exchange(rows, payload, route, lambda r, slots, w: _expand_run_combine(run, r, slots, w), axis_name)
        served = plan.entry_counts
    with jax.named_scope("moe/combine"):
        weighted = jnp.where((plan.destination < num_ranks)[:, None], weighted, 0.0)
        return weighted.reshape(num_tokens, top_k, hidden).sum(axis=1), served


def _expand_run_combine(run, rows, slots, weights):
    """Token rows ``[P, H]`` with their ``[P, K]`` local slots and weights -> ``[P, H]`` f32: each row
    expanded to its k entries here, run, weighted and summed (entries elsewhere: slot m, weight 0)."""
    num_rows, top_k = slots.shape
    out = run(jnp.repeat(rows, top_k, axis=0), slots.reshape(-1))  # [P*K, H]
    return (out.reshape(num_rows, top_k, -1) * weights[..., None]).sum(axis=1)


def _fixed_capacity_exchange(rows, payload, route: _Route, experts, axis_name: str):
    """``[I, H]`` rows (+ payload arrays ``[I, ...]`` with fill values) -> the experts' results for
    them ``[I, H]`` f32, through fixed ``[R, B, ...]`` all_to_alls."""
    num_ranks, hidden = route.send_counts.shape[0], rows.shape[1]
    at = (route.destination, route.position)
    with jax.named_scope("moe/dispatch"):
        send = jnp.zeros((num_ranks, route.block, hidden), rows.dtype).at[at].set(rows, mode="drop")
        sends = [jnp.full((num_ranks, route.block) + a.shape[1:], fill, a.dtype).at[at].set(a, mode="drop")
                 for a, fill in payload]
        recv = jax.lax.all_to_all(send, axis_name, 0, 0).reshape(-1, hidden)
        received = [jax.lax.all_to_all(s, axis_name, 0, 0).reshape((-1,) + s.shape[2:]) for s in sends]
    out = experts(recv, *received)
    with jax.named_scope("moe/combine"):
        back = jax.lax.all_to_all(out.reshape(num_ranks, route.block, hidden), axis_name, 0, 0)
        return back[jnp.minimum(route.destination, num_ranks - 1), route.position]  # [I, H]


def _ragged_exchange(rows, payload, route: _Route, experts, axis_name: str, primitive: RaggedAllToAll):
    """Same contract as :func:`_fixed_capacity_exchange`, moving only the real rows."""
    num_ranks, hidden = route.send_counts.shape[0], rows.shape[1]
    rank = jax.lax.axis_index(axis_name)
    with jax.named_scope("moe/dispatch"):
        offsets = ragged_offsets(jax.lax.all_gather(route.send_counts, axis_name), rank)
        sorted_index = jnp.where(route.destination < num_ranks,
                                 offsets.send_offsets[jnp.minimum(route.destination, num_ranks - 1)]
                                 + route.position, route.send_rows)
        my_block = jnp.full((num_ranks,), rank * route.block, jnp.int32)

        def ship(array, fill):
            send = jnp.full((route.send_rows,) + array.shape[1:], fill, array.dtype).at[sorted_index].set(
                array, mode="drop")
            recv = jnp.full((num_ranks * route.block,) + array.shape[1:], fill, array.dtype)
            return primitive(send, recv, offsets.send_offsets, route.send_counts, my_block, offsets.recv_counts,
                             axis_name=axis_name)

        recv = ship(rows, 0)
        received = [ship(a, fill) for a, fill in payload]
    out = experts(recv, *received)
    with jax.named_scope("moe/combine"):
        source_block = jnp.arange(num_ranks, dtype=jnp.int32) * route.block
        back = primitive(out, jnp.zeros((route.send_rows, hidden), jnp.float32), source_block, offsets.recv_counts,
                         offsets.return_offsets, route.send_counts, axis_name=axis_name)
        return back[jnp.minimum(sorted_index, route.send_rows - 1)]  # [I, H]
