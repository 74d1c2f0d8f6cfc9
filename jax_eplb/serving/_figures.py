"""The throughput benchmark's figures: accumulated per timed iteration, summarised at the end.

Per-rank load is measured in-graph every iteration (entries each rank's experts computed, per
MoE layer, ``[Lm, R]``); its imbalance (max/mean - 1), averaged over iterations and layers, is
TensorRT-LLM's report metric of the same run.
"""

from __future__ import annotations

import numpy as np

from jax_eplb._metrics import load_metrics


class ThroughputFigures:
    """Step times, per-iteration rows and rank loads of the timed iterations."""

    def __init__(self):
        self.prefill_s: list[float] = []  # mixed iterations
        self.decode_s: list[float] = []
        self.rank_loads: list[np.ndarray] = []  # [Lm, R] per iteration
        self.per_iteration: list[dict] = []

    def add(self, iteration: int, mixed: bool, seconds: float, rank_load: np.ndarray, rows: int, update=None) -> None:
        """One timed iteration; ``update``: the online balancer's report of it, if any."""
        (self.prefill_s if mixed else self.decode_s).append(seconds)
        self.rank_loads.append(rank_load)
        row = {"iteration": iteration, "phase": "mixed" if mixed else "decode", "rows": rows,
               "imbalance": float(load_metrics(rank_load[None]).imbalance.mean()), "step_ms": 1e3 * seconds}
        if update is not None:
            row.update(slots_moved=update.slots_moved, slots_from_devices=update.slots_from_devices,
                       bytes_moved=update.bytes_moved, plan_ms=1e3 * update.plan_seconds,
                       apply_ms=1e3 * update.apply_seconds, layers_applied=list(update.layers_applied))
        self.per_iteration.append(row)

    def summary(self, wall_s: float, output_tokens: int, requests: int, layer_ids) -> dict:
        per_layer = load_metrics(np.stack(self.rank_loads)).imbalance  # [Lm], averaged over iterations

        def mean_ms(seconds):
            return 1e3 * float(np.mean(seconds)) if seconds else None

        return {
            "requests": requests, "output_tokens": output_tokens, "iterations": len(self.rank_loads),
            "wall_s": wall_s, "output_tokens_per_s": output_tokens / wall_s if wall_s else float("nan"),
            "requests_per_s": requests / wall_s if wall_s else float("nan"),
            "mean_prefill_step_ms": mean_ms(self.prefill_s), "mean_decode_step_ms": mean_ms(self.decode_s),
            "mean_step_ms": mean_ms(self.prefill_s + self.decode_s),
            "mean_imbalance": float(per_layer.mean()),
            "mean_imbalance_per_layer": {int(l): float(v) for l, v in zip(layer_ids, per_layer)},
        }


def online_summary(reports, layer_updates_per_iter: int, planner: str) -> dict:
    """The online balancer's figures from its per-iteration ``UpdateReport``s."""
    updates = [r for r in reports if r.layers_applied]
    return dict(
        load_balancer=f"online, k={layer_updates_per_iter}, {planner}",
        layer_updates=sum(len(r.layers_applied) for r in updates),
        slots_moved=sum(r.slots_moved for r in updates), bytes_moved=sum(r.bytes_moved for r in updates),
        slots_from_devices=sum(r.slots_from_devices for r in updates),
        mean_plan_ms_per_update=1e3 * float(np.mean([r.plan_seconds for r in updates])) if updates else 0.0,
        mean_apply_ms_per_iteration=1e3 * float(np.mean([r.apply_seconds for r in reports])) if reports else 0.0)


def format_figures(figures: dict) -> str:
    rows = [("requests", f"{figures['requests']}"), ("output tokens", f"{figures['output_tokens']}"),
            ("iterations", f"{figures['iterations']}"),
            ("throughput (output tok/s)", f"{figures['output_tokens_per_s']:.1f}"),
            ("throughput (requests/s)", f"{figures['requests_per_s']:.2f}"),
            ("mean step (ms)", f"{figures['mean_step_ms']:.2f}"),
            ("mean prefill (mixed) step (ms)", f"{figures['mean_prefill_step_ms'] or float('nan'):.2f}"),
            ("mean decode step (ms)", f"{figures['mean_decode_step_ms'] or float('nan'):.2f}"),
            ("avg per-rank imbalance (in-graph)", f"{figures['mean_imbalance']:.4f}")]
    if "slots_moved" in figures:
        rows += [("layer updates", f"{figures['layer_updates']}"),
                 ("slots moved (total)", f"{figures['slots_moved']}"),
                 ("  of which copied on device (not from host)", f"{figures['slots_from_devices']}"),
                 ("bytes moved (total)", f"{figures['bytes_moved'] / 2**20:.1f} MiB"),
                 ("planner ms per layer update (host thread)", f"{figures['mean_plan_ms_per_update']:.2f}"),
                 ("rebalance ms per iteration (in step loop)", f"{figures['mean_apply_ms_per_iteration']:.2f}")]
    title = (f"=== {figures['model']} ep={figures['ep']} slots={figures['num_slots']} "
             f"({figures['load_balancer']}, {figures['replica_policy']}, {figures['platform']}) ===")
    width = max(len(k) for k, _ in rows)
    return "\n".join([title] + [f"{k:<{width}}  {v}" for k, v in rows])
