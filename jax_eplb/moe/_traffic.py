"""What the EP exchange moves per MoE layer, from the slot ids each rank routes to (host-side, for
benchmarks and capacity planning; the row counts come from the dispatch plans the layer uses).

Per rank and layer, for each transport and dispatch mode (``moe/_dispatch.py``):
* sent: rows this rank sends to other ranks on the dispatch trip (hidden-size activations plus
  the routing payload) and result rows it sends back on the combine trip (float32); its own
  block never leaves the device and is not counted.
* receive buffer: the dispatch receive buffer, ``R * B`` rows (B = T tokens or N = T*K entries).
* real rows: the rows that carry data, i.e. what ``ragged`` sends.

Axis legend: R ranks, T tokens per rank (per MoE chunk), K top-k, H hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb.moe._dispatch import dispatch_plan, token_plan

RESULT_BYTES = 4  # the combine trip carries float32 results
SLOT_BYTES, WEIGHT_BYTES = 4, 4  # int32 local slot per entry; float32 weight per entry (token mode)


class Traffic(NamedTuple):
    """One (transport, dispatch) configuration; ``[R]`` arrays are per rank."""

    sent_bytes: np.ndarray  # [R] dispatch + combine bytes each rank sends to other ranks
    real_rows: np.ndarray  # [R] rows with data each rank sends to other ranks (dispatch trip)
    receive_buffer_bytes: int  # dispatch receive buffer per rank (activations + payload)


def rows_to_ranks(slot_ids: np.ndarray, slots_per_rank: int, dispatch: str) -> np.ndarray:
    """``[R, T, K]`` global slot ids of each rank's entries (out of range: none) -> ``[R_src, R_dst]``
    rows each rank sends to each rank: the send counts of the dispatch plans themselves."""
    plan = token_plan if dispatch == "token" else dispatch_plan
    counts = jax.vmap(lambda ids: plan(ids, slot_ids.shape[0], slots_per_rank).send_counts)(jnp.asarray(slot_ids))
    return np.asarray(counts)


def layer_traffic(slot_ids: np.ndarray, slots_per_rank: int, hidden: int, transport: str, dispatch: str,
                  value_bytes: int = 2) -> Traffic:
    """Bytes one MoE layer moves for ``[R, T, K]`` slot ids (one chunk), activations of ``value_bytes``."""
    num_ranks, num_tokens, top_k = slot_ids.shape
    rows = rows_to_ranks(slot_ids, slots_per_rank, dispatch)  # [src, dst]
    others = ~np.eye(num_ranks, dtype=bool)
    payload = top_k * (SLOT_BYTES + WEIGHT_BYTES) if dispatch == "token" else SLOT_BYTES
    block = num_tokens if dispatch == "token" else num_tokens * top_k
    real_out = (rows * others).sum(axis=1)  # [src]: dispatch rows to other ranks
    real_back = (rows * others).sum(axis=0)  # [dst]: result rows it returns to other ranks
    if transport == "all_to_all":
        out_rows = back_rows = np.full(num_ranks, (num_ranks - 1) * block)
    else:
        out_rows, back_rows = real_out, real_back
    sent = out_rows * (hidden * value_bytes + payload) + back_rows * hidden * RESULT_BYTES
    return Traffic(sent, real_out, num_ranks * block * (hidden * value_bytes + payload))
