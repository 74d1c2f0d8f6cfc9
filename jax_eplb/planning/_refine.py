"""Local search on a placement: pairwise replica swaps between ranks, vectorised over layers.

Each step, per layer, takes one source rank - a rank holding two replicas of one expert if
there is one, else the heaviest rank - and applies the best swap of one of its replicas with a
replica on another rank. Replica counts never change. Axis legend: B rows (layers), R ranks,
m slots per rank, E experts, S = R*m slots.
"""

from __future__ import annotations

import numpy as np



def refine_by_swaps(load: np.ndarray, slot_to_expert: np.ndarray, ep_size: int,
                    max_steps: int = 2000, movable: np.ndarray | None = None) -> np.ndarray:
    """Improves ``[B, S]`` plans; the max rank load of each row never increases.

    Duplicates (two replicas of one expert on one rank) are swapped away first where that does
    not raise the row's max rank load; then the heaviest rank is relieved while some swap
    lowers it without lifting its partner to its old load. ``movable`` ``[B, S]`` (default all):
    only these slots take part in swaps (the others keep their expert).
    """
    load = np.asarray(load, dtype=np.float64)
    bins = np.array(slot_to_expert, dtype=np.int64).reshape(slot_to_expert.shape[0], ep_size, -1)
    num_rows, num_ranks, per_rank = bins.shape
    movable = np.ones(bins.shape, bool) if movable is None else np.asarray(movable, bool).reshape(bins.shape)
    if num_ranks == 1:
        return bins.reshape(num_rows, -1)
    count = np.zeros(load.shape, np.int64)
    np.add.at(count, (np.arange(num_rows)[:, None], bins.reshape(num_rows, -1)), 1)
    size_of = load / np.maximum(count, 1)  # [B, E]
    tol = 1e-9 * np.maximum(load.sum(axis=1), 1.0) / num_ranks  # [B]
    active = np.ones(num_rows, bool)
    may_fix = np.ones(num_rows, bool)
    for _ in range(max_steps):
        rows = np.nonzero(active)[0]
        if rows.size == 0:
            break
        src, best, found, fixing = _best_swaps(bins[rows], size_of[rows], may_fix[rows], tol[rows], movable[rows])
        # Rows with no move: a fixing row falls back to relieving the heaviest rank, else stops.
        may_fix[rows[~found & fixing]] = False
        active[rows[~found & ~fixing]] = False
        hit = np.nonzero(found)[0]
        if hit.size:
            a, t = np.divmod(best[hit], num_ranks * per_rank)
            r_t, j_t = np.divmod(t, per_rank)
            row, r_s = rows[hit], src[hit]
            moved_src = bins[row, r_s, a].copy()
            bins[row, r_s, a] = bins[row, r_t, j_t]
            bins[row, r_t, j_t] = moved_src
    return bins.reshape(num_rows, -1)


def _best_swaps(b: np.ndarray, size_of: np.ndarray, may_fix: np.ndarray, tol: np.ndarray, movable: np.ndarray):
    """For ``[A, R, m]`` rank bins: the source rank of each row, its best swap (flat index
    ``[A]`` into ``[m, R*m]``), whether one was found, and whether the row is fixing duplicates."""
    rows, num_ranks, per_rank = b.shape
    cur = np.arange(rows)
    earlier = np.tril(np.ones((per_rank, per_rank), bool), k=-1)  # [m, m], j' < j
    target_rank = np.repeat(np.arange(num_ranks), per_rank)  # [R*m]
    size = np.take_along_axis(size_of, b.reshape(rows, -1), axis=1).reshape(b.shape)
    rank_load = size.sum(axis=2)  # [A, R]
    dup_item = ((b[..., :, None] == b[..., None, :]) & earlier).any(axis=3)  # [A, R, m]
    dup_rank = dup_item.any(axis=2)  # [A, R]
    fixing = dup_rank.any(axis=1) & may_fix  # [A]
    src = np.where(fixing, np.argmax(dup_rank, axis=1), np.argmax(rank_load, axis=1))
    src_items, src_size, src_load = b[cur, src], size[cur, src], rank_load[cur, src]  # [A, m]...
    src_ok = np.where(fixing[:, None], dup_item[cur, src], True) & movable[cur, src]  # [A, m]
    tgt_items = b.reshape(rows, -1)  # [A, R*m]
    tgt_size = size.reshape(rows, -1)
    tgt_load = rank_load[:, target_rank]
    new_src = src_load[:, None, None] - src_size[:, :, None] + tgt_size[:, None, :]  # [A, m, R*m]
    new_tgt = tgt_load[:, None, :] - tgt_size[:, None, :] + src_size[:, :, None]
    objective = np.maximum(new_src, new_tgt)
    tgt_in_src = (src_items[:, :, None] == tgt_items[:, None, :]).any(axis=1)  # [A, R*m]
    src_in_rank = (src_items[:, :, None, None] == b[:, None, :, :]).any(axis=3)  # [A, m, R]
    valid = ((target_rank[None, None, :] != src[:, None, None])
             & src_ok[:, :, None]
             & movable.reshape(rows, -1)[:, None, :]
             & ~tgt_in_src[:, None, :]
             & ~src_in_rank[:, :, target_rank])
    limit = np.where(fixing, rank_load.max(axis=1) + tol, src_load - tol)
    valid &= objective <= limit[:, None, None]
    objective = np.where(valid, objective, np.inf).reshape(rows, -1)
    best = np.argmin(objective, axis=1)
    return src, best, np.isfinite(objective[cur, best]), fixing
