"""The load report: per-layer rows plus an ``average`` row, as a table or JSON."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

from jax_eplb._metrics import load_metrics, project_onto_plan, rank_loads_from_counts
from jax_eplb._plan_config import MoeLoadBalancerConfig
from jax_eplb.planning import lower_bound
from jax_eplb._stats import ExpertLoadStats


class LoadReport(NamedTuple):
    """row_names: layer ids then 'average'; columns: name -> ``[L + 1]`` values."""

    row_names: list
    columns: dict

    def to_table(self, title: str = "Load statistics:") -> str:
        """pandas-style table, as TensorRT-LLM's script prints it (6 decimals, trailing zeros that
        every value of a column has trimmed, as pandas does)."""
        names = [str(n) for n in self.row_names]
        index_width = max(len(n) for n in names)
        cells = {c: _pandas_column(vals) for c, vals in self.columns.items()}
        widths = {c: max(len(c), *(len(x) for x in cells[c])) for c in cells}
        header = " " * index_width + "".join(f"  {c:>{widths[c]}}" for c in cells)
        lines = [title, header]
        for i, name in enumerate(names):
            lines.append(f"{name:<{index_width}}" + "".join(f"  {cells[c][i]:>{widths[c]}}" for c in cells))
        return "\n".join(lines)

    def to_json(self) -> str:
        rows = {str(n): {c: float(v[i]) for c, v in self.columns.items()} for i, n in enumerate(self.row_names)}
        return json.dumps(rows, indent=2)


def _pandas_column(values) -> list[str]:
    texts = [f"{v:.6f}" for v in values]
    trim = min(len(t) - len(t.rstrip("0")) for t in texts)
    trim = min(trim, 5)  # keep one decimal, as pandas prints 220.0
    return [t[:len(t) - trim] if trim else t for t in texts]


def load_report(stats: ExpertLoadStats, ep_size: int | None = None, per_expert: bool = False,
                projection: MoeLoadBalancerConfig | None = None,
                lower_bound_slots: int | None = None) -> LoadReport:
    """Per-layer mean / std / imbalance-ratio of rank (or per-expert) loads.

    Args:
      ep_size: ranks; default: the number of ranks that recorded ``stats``.
      projection: report loads as they would be under this plan (each expert's count split
        evenly over its replicas).
      lower_bound_slots: adds the best achievable imbalance with this many slots.
    """
    ep_size = int(ep_size or stats.ep_size or 1)
    counts = stats.counts  # [I, L, E]
    if projection is not None:
        slot_to_expert = projection.slot_to_expert(stats.layer_ids, stats.num_experts, ep_size)
        counts = project_onto_plan(counts, slot_to_expert)
    loads = counts if per_expert else rank_loads_from_counts(counts, ep_size)
    metrics = load_metrics(loads, float32=True)  # TensorRT-LLM's arithmetic
    columns = {"mean": metrics.mean, "std": metrics.std, "imbalance-ratio": metrics.imbalance}
    if lower_bound_slots is not None:
        flat = stats.counts.reshape(-1, stats.num_experts)  # [I*L, E]
        bound = lower_bound(flat, lower_bound_slots, ep_size).imbalance
        columns["lower-bound"] = bound.reshape(stats.num_iters, stats.num_layers).mean(axis=0)
    columns = {c: np.append(v, v.mean()) for c, v in columns.items()}
    return LoadReport(list(stats.layer_ids) + ["average"], columns)
