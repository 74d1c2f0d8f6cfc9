"""The throughput benchmark's figures: accumulated per timed iteration, summarised at the end.

Per-rank load is measured in-graph every iteration (routed entries each rank's experts computed,
per MoE layer, ``[Lm, R]``); its imbalance (max/mean - 1), averaged over iterations and layers, is
TensorRT-LLM's report metric of the same run. Next to it, the rows each rank computed with the
shared experts' (its own tokens', or what the split gave it when they are balanced). With traffic
recording, the EP exchange's bytes per rank and MoE layer, from each iteration's dispatch rows, for
every transport and dispatch mode.
"""

from __future__ import annotations

import itertools

import numpy as np

from jax_eplb._metrics import load_metrics
from jax_eplb.moe import TRANSPORTS, chunk_sizes
from jax_eplb.moe._dispatch import DISPATCH_ROW_ORDER
from jax_eplb.moe._traffic import traffic_from_rows

MIB = 2 ** 20


class TrafficFigures:
    """The EP exchange of the timed iterations, per phase (decode / mixed): bytes each rank sends per
    MoE layer (dispatch + combine, mean over ranks and the busiest rank) and its receive buffer, for
    every transport and dispatch mode, from the dispatch rows the step recorded (``moe/_traffic.py``).
    Accumulated per iteration (nothing per step is kept)."""

    MODES = tuple(itertools.product(TRANSPORTS[1:], DISPATCH_ROW_ORDER))

    def __init__(self, top_k: int, hidden: int, value_bytes: int, moe_max_num_tokens: int | None):
        self.top_k, self.hidden, self.value_bytes, self.max_tokens = top_k, hidden, value_bytes, moe_max_num_tokens
        self.steps = {"decode": 0, "mixed": 0}
        # phase -> [M modes, 3] sums over iterations of (sent mean, busiest rank's sent, rows sent); buffer max
        self.sums = {phase: np.zeros((len(self.MODES), 3)) for phase in self.steps}
        self.buffers = {phase: np.zeros(len(self.MODES)) for phase in self.steps}

    def add(self, mixed: bool, dispatch_rows: np.ndarray, tokens_per_rank: int) -> None:
        """One iteration's ``[Lm, R, 2, R]`` dispatch rows, its MoE layers' ``tokens_per_rank``."""
        phase = "mixed" if mixed else "decode"
        rows = np.asarray(dispatch_rows)
        chunks = chunk_sizes(tokens_per_rank, rows.shape[1], self.max_tokens)
        for m, (transport, dispatch) in enumerate(self.MODES):
            t = traffic_from_rows(rows[:, :, DISPATCH_ROW_ORDER.index(dispatch)], chunks, self.top_k, self.hidden,
                                  transport, dispatch, self.value_bytes)
            self.sums[phase][m] += (t.sent_bytes.mean(), t.sent_bytes.max(axis=-1).mean(), t.sent_rows.mean())
            self.buffers[phase][m] = max(self.buffers[phase][m], t.receive_buffer_bytes)
        self.steps[phase] += 1

    def summary(self) -> dict:
        """``{phase: {"transport/dispatch": {sent_mib, max_rank_sent_mib, receive_buffer_mib, rows_sent}}}``."""
        out = {}
        for phase, count in self.steps.items():
            if count:
                mean = self.sums[phase] / count
                out[phase] = {f"{transport}/{dispatch}": dict(
                    sent_mib=float(mean[m, 0]) / MIB, max_rank_sent_mib=float(mean[m, 1]) / MIB,
                    receive_buffer_mib=float(self.buffers[phase][m]) / MIB, rows_sent=float(mean[m, 2]))
                    for m, (transport, dispatch) in enumerate(self.MODES)}
        return out


class ThroughputFigures:
    """Step times, per-iteration rows and rank loads of the timed iterations (and their exchange's
    bytes when ``traffic`` is given)."""

    def __init__(self, traffic: TrafficFigures | None = None):
        self.traffic = traffic
        self.prefill_s: list[float] = []  # mixed iterations
        self.decode_s: list[float] = []
        self.rank_loads: list[np.ndarray] = []  # [Lm, R] per iteration: routed entries
        self.rank_rows: list[np.ndarray] = []  # [Lm, R] per iteration: rows computed (+ shared experts')
        self.per_iteration: list[dict] = []

    def add(self, iteration: int, mixed: bool, seconds: float, rank_load: np.ndarray, rows: int, update=None,
            rank_rows: np.ndarray | None = None) -> None:
        """One timed iteration; ``update``: the online balancer's report of it, if any; ``rank_rows``:
        rows computed per rank (routed + shared experts'; default: ``rank_load``)."""
        (self.prefill_s if mixed else self.decode_s).append(seconds)
        self.rank_loads.append(rank_load)
        self.rank_rows.append(rank_load if rank_rows is None else rank_rows)
        row = {"iteration": iteration, "phase": "mixed" if mixed else "decode", "rows": rows,
               "imbalance": float(load_metrics(rank_load[None]).imbalance.mean()),
               "rows_imbalance": float(load_metrics(self.rank_rows[-1][None]).imbalance.mean()),
               "step_ms": 1e3 * seconds}
        if update is not None:
            row.update(slots_moved=update.slots_moved, slots_from_devices=update.slots_from_devices,
                       bytes_moved=update.bytes_moved, plan_ms=1e3 * update.plan_seconds,
                       apply_ms=1e3 * update.apply_seconds, layers_applied=list(update.layers_applied))
        self.per_iteration.append(row)

    def summary(self, wall_s: float, output_tokens: int, requests: int, layer_ids) -> dict:
        per_layer = load_metrics(np.stack(self.rank_loads)).imbalance  # [Lm], averaged over iterations

        def mean_ms(seconds):
            return 1e3 * float(np.mean(seconds)) if seconds else None

        traffic = {"traffic": self.traffic.summary()} if self.traffic is not None else {}
        return {
            "requests": requests, "output_tokens": output_tokens, "iterations": len(self.rank_loads),
            "wall_s": wall_s, "output_tokens_per_s": output_tokens / wall_s if wall_s else float("nan"),
            "requests_per_s": requests / wall_s if wall_s else float("nan"),
            "mean_prefill_step_ms": mean_ms(self.prefill_s), "mean_decode_step_ms": mean_ms(self.decode_s),
            "mean_step_ms": mean_ms(self.prefill_s + self.decode_s),
            "mean_imbalance": float(per_layer.mean()),
            "mean_imbalance_per_layer": {int(l): float(v) for l, v in zip(layer_ids, per_layer)},
            "mean_rows_imbalance": float(load_metrics(np.stack(self.rank_rows)).imbalance.mean()),
            **traffic,
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


TRAFFIC_HEADER = (f"{'phase':<7} {'transport':>10} {'dispatch':>8} {'sent MiB':>9} {'busiest':>8} "
                  f"{'recv buffer MiB':>15} {'rows sent':>9}")


def format_traffic(traffic: dict, label: str = "") -> list[str]:
    """One line per phase and (transport, dispatch) of ``figures["traffic"]`` (``TRAFFIC_HEADER``'s
    columns after ``label``); ragged/token is the real-row minimum."""
    lines = []
    for phase, modes in traffic.items():
        for mode, f in modes.items():
            transport, dispatch = mode.split("/")
            lines.append(f"{label}{phase:<7} {transport:>10} {dispatch:>8} {f['sent_mib']:>9.3f} "
                         f"{f['max_rank_sent_mib']:>8.3f} {f['receive_buffer_mib']:>15.3f} {f['rows_sent']:>9.1f}")
    return lines


def format_figures(figures: dict) -> str:
    rows = [("requests", f"{figures['requests']}"), ("output tokens", f"{figures['output_tokens']}"),
            ("iterations", f"{figures['iterations']}"),
            ("throughput (output tok/s)", f"{figures['output_tokens_per_s']:.1f}"),
            ("throughput (requests/s)", f"{figures['requests_per_s']:.2f}"),
            ("mean step (ms)", f"{figures['mean_step_ms']:.2f}"),
            ("mean prefill (mixed) step (ms)", f"{figures['mean_prefill_step_ms'] or float('nan'):.2f}"),
            ("mean decode step (ms)", f"{figures['mean_decode_step_ms'] or float('nan'):.2f}"),
            ("avg per-rank imbalance (in-graph)", f"{figures['mean_imbalance']:.4f}")]
    if figures.get("mean_rows_imbalance", figures["mean_imbalance"]) != figures["mean_imbalance"]:
        rows.append(("  of rows computed (+ shared experts')", f"{figures['mean_rows_imbalance']:.4f}"))
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
    lines = [title] + [f"{k:<{width}}  {v}" for k, v in rows]
    if "traffic" in figures:
        lines += ["EP exchange per rank and MoE layer (dispatch + combine, sent to other ranks):", TRAFFIC_HEADER,
                  *format_traffic(figures["traffic"])]
    return "\n".join(lines)
