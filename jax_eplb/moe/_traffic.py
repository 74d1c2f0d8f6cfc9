"""What the EP exchange moves per MoE layer, from the rows each rank's dispatch sends to each rank
(host-side, for benchmarks and capacity planning; the row counts are the dispatch plans' send
counts: ``moe/_dispatch.py`` ``dispatch_rows``, recorded in the step with ``record=("traffic",)``).

Per rank and layer, for each transport and dispatch mode (``moe/_dispatch.py``):
* sent: rows this rank sends to other ranks on the dispatch trip (hidden-size activations plus
  the routing payload) and result rows it sends back on the combine trip (float32); its own
  block never leaves the device and is not counted.
* receive buffer: the dispatch receive buffer, ``R * B`` rows (B = T tokens or N = T*K entries
  of the largest ``moe_max_num_tokens`` chunk).
* real rows: the rows that carry data, i.e. what ``ragged`` sends.

Axis legend: R ranks, T tokens per rank (per MoE chunk), K top-k, H hidden.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb.moe._dispatch import DISPATCH_ROW_ORDER, dispatch_rows

RESULT_BYTES = 4  # the combine trip carries float32 results
SLOT_BYTES, WEIGHT_BYTES = 4, 4  # int32 local slot per entry; float32 weight per entry (token mode)


class Traffic(NamedTuple):
    """One (transport, dispatch) configuration; ``[..., R]`` arrays are per rank."""

    sent_bytes: np.ndarray  # [..., R] dispatch + combine bytes each rank sends to other ranks
    real_rows: np.ndarray  # [..., R] rows with data each rank sends to other ranks (dispatch trip)
    sent_rows: np.ndarray  # [..., R] rows the transport ships to other ranks (dispatch trip)
    receive_buffer_bytes: int  # dispatch receive buffer per rank (activations + payload)


def rows_to_ranks(slot_ids: np.ndarray, slots_per_rank: int, dispatch: str) -> np.ndarray:
    """``[R, T, K]`` global slot ids of each rank's entries (out of range: none) -> ``[R_src, R_dst]``
    rows each rank sends to each rank: the send counts of the dispatch plans themselves."""
    counts = jax.vmap(lambda ids: dispatch_rows(ids, slot_ids.shape[0], slots_per_rank))(jnp.asarray(slot_ids))
    return np.asarray(counts)[:, DISPATCH_ROW_ORDER.index(dispatch)]


def traffic_from_rows(rows: np.ndarray, chunk_tokens: Sequence[int], top_k: int, hidden: int, transport: str,
                      dispatch: str, value_bytes: int = 2) -> Traffic:
    """Bytes one MoE layer moves given ``[..., R_src, R_dst]`` dispatch rows (summed over the layer's
    chunks of ``chunk_tokens`` tokens per rank each), activations of ``value_bytes``."""
    rows = np.asarray(rows)
    num_ranks = rows.shape[-1]
    others = ~np.eye(num_ranks, dtype=bool)
    payload = top_k * (SLOT_BYTES + WEIGHT_BYTES) if dispatch == "token" else SLOT_BYTES
    blocks = [t if dispatch == "token" else t * top_k for t in chunk_tokens]
    real_out = (rows * others).sum(axis=-1)  # [..., src]: dispatch rows to other ranks
    real_back = (rows * others).sum(axis=-2)  # [..., dst]: result rows it returns to other ranks
    if transport == "all_to_all":
        out_rows = back_rows = np.full(real_out.shape, (num_ranks - 1) * sum(blocks))
    else:
        out_rows, back_rows = real_out, real_back
    sent = out_rows * (hidden * value_bytes + payload) + back_rows * hidden * RESULT_BYTES
    return Traffic(sent, real_out, out_rows, num_ranks * max(blocks) * (hidden * value_bytes + payload))


def layer_traffic(slot_ids: np.ndarray, slots_per_rank: int, hidden: int, transport: str, dispatch: str,
                  value_bytes: int = 2) -> Traffic:
    """Bytes one MoE layer moves for ``[R, T, K]`` slot ids (one chunk), activations of ``value_bytes``."""
    _, num_tokens, top_k = slot_ids.shape
    rows = rows_to_ranks(slot_ids, slots_per_rank, dispatch)
    return traffic_from_rows(rows, [num_tokens], top_k, hidden, transport, dispatch, value_bytes)
