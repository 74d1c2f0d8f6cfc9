"""The whole offline EPLB workflow on a model (``jax-eplb demo``), as a user runs it by hand:

1. ``prepare-dataset``; ``bench ... throughput`` at EP8 with statistics recording on;
2. ``report`` the recorded statistics;
3. ``generate`` a plan (e.g. 80 slots on 8 ranks);
4. rerun with ``moe_load_balancer: plan.yaml``, recording again (slot ids, as TensorRT-LLM);
5. ``report`` again; check the generated tokens are identical; save a heatmap PNG.

Files written under the output folder are the workflow's products (dataset, statistics, plan,
options file, tokens, figures, heatmap); the runs themselves get objects, not files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from jax_eplb._assignment import check_slot_geometry
from jax_eplb._atomic import atomic_write_text
from jax_eplb._heatmap import save_heatmap
from jax_eplb._metrics import rank_loads_from_counts
from jax_eplb._plan_config import plan_config_from_slots
from jax_eplb._report import load_report
from jax_eplb._trtllm_dump import load_trtllm_dump
from jax_eplb.planning import plan_placement
from jax_eplb.serving._dataset import load_dataset, prepare_dataset
from jax_eplb.serving._figures import format_figures
from jax_eplb.serving._inputs import model_source
from jax_eplb.serving._recorder import RANGE_VARIABLE, StatisticsRecorder
from jax_eplb.serving._throughput import ThroughputSettings, run_throughput
from jax_eplb.sharding import ep_mesh


@dataclasses.dataclass(frozen=True)
class WorkflowSettings:
    model: str = "tiny"
    ep: int = 8
    num_slots: int = 80
    num_requests: int = 256
    input_len: int = 32
    output_len: int = 24
    max_batch_size: int = 128
    iter_range: tuple[int, int] = (0, 1000)  # record every iteration of these short runs
    replica_policy: str = "round_robin"
    compare_load_aware: bool = True  # one more run with the plan and our load_aware replica choice
    emulate_devices: int | None = 8
    algorithm: str = "balanced"
    seed: int = 0
    progress: bool = True


def _rank_load_share(stats, ep: int) -> np.ndarray:
    """``[L, R]`` window-summed rank load / mean."""
    loads = rank_loads_from_counts(stats.total(), ep)
    return loads / loads.mean(axis=1, keepdims=True)


class _Bench:
    """One ``bench ... throughput`` run of the workflow, recording its statistics under ``out``."""

    def __init__(self, s: WorkflowSettings, out: Path, log):
        self.s, self.out, self.log = s, out, log
        self.config, self.weights = model_source(s.model, seed=s.seed)
        self.mesh = ep_mesh(s.ep, s.emulate_devices)
        self.requests = ()

    def write_dataset(self) -> None:
        s = self.s
        dataset = prepare_dataset(self.out / "dataset.jsonl", num_requests=s.num_requests, input_mean=s.input_len,
                                  output_mean=s.output_len, vocab_size=self.config.vocab_size, seed=s.seed)
        self.requests = load_dataset(dataset, self.config.vocab_size, self.config.max_seq_len)

    def __call__(self, tag: str, plan=None, replica_policy: str | None = None):
        stats_dir = self.out / f"expert_statistic_{tag}"
        recorder = StatisticsRecorder(stats_dir, *self.s.iter_range, self.config.moe_layer_ids, self.config.top_k)
        settings = ThroughputSettings(max_batch_size=self.s.max_batch_size, progress=self.s.progress,
                                      replica_policy=replica_policy or self.s.replica_policy)
        result = run_throughput(self.config, self.weights, self.requests, self.mesh, settings, plan=plan,
                                recorder=recorder, log=self.log)
        result.write(str(self.out / f"tokens_{tag}.jsonl"), str(self.out / f"bench_{tag}.json"))
        self.log(format_figures(result.figures))
        return result, load_trtllm_dump(stats_dir)


def run_model_workflow(output_dir, settings: WorkflowSettings = WorkflowSettings(),
                       log: Callable[[str], None] = print) -> dict:
    s, out = settings, Path(output_dir)
    bench = _Bench(s, out, log)
    check_slot_geometry(bench.config.num_experts, s.num_slots, s.ep)  # before the first run, not after it
    out.mkdir(parents=True, exist_ok=True)
    bench.write_dataset()
    window = f"{RANGE_VARIABLE}={s.iter_range[0]}-{s.iter_range[1]}"
    log(f"[1/5] EP{s.ep} without EPLB, recording expert statistics ({window})")
    plain, stats_plain = bench("no_eplb")
    report_plain = load_report(stats_plain, ep_size=s.ep)
    log("[2/5] " + report_plain.to_table("Load statistics without EPLB (recorded):"))

    plan = plan_config_from_slots(plan_placement(stats_plain.total(), s.num_slots, s.ep, s.algorithm).slot_to_expert,
                                  stats_plain.layer_ids)
    plan_path = out / "moe_load_balancer.yaml"
    plan.to_yaml(plan_path)  # what a user passes by hand: extra_llm_api_options.yaml points at it
    atomic_write_text(out / "extra_llm_api_options.yaml",
                      yaml.safe_dump({"moe_load_balancer": str(plan_path.absolute())}))
    log(f"[3/5] {s.algorithm} plan: {s.num_slots} slots on {s.ep} ranks -> {plan_path}")

    log(f"[4/5] EP{s.ep} with the plan, recording slot statistics")
    balanced, stats_balanced = bench("eplb", plan)
    report_balanced = load_report(stats_balanced, ep_size=s.ep)
    log("[5/5] " + report_balanced.to_table("Load statistics with the EPLB plan (recorded):"))
    summary = _summarise(s, out, plain, balanced, report_plain, report_balanced, stats_plain, stats_balanced, log)
    if s.compare_load_aware and s.replica_policy != "load_aware":
        log("[extra] the same plan with load_aware replica choice (ours; TensorRT-LLM uses round_robin)")
        aware, stats_aware = bench("eplb_load_aware", plan, "load_aware")
        aware_after = load_report(stats_aware, ep_size=s.ep).columns["imbalance-ratio"][-1]
        summary.update(imbalance_after_load_aware=float(aware_after),
                       tokens_identical=summary["tokens_identical"] and aware.tokens == plain.tokens)
        rows = (balanced.figures["mean_rows_imbalance"], aware.figures["mean_rows_imbalance"])
        summary.update(rows_imbalance_round_robin=rows[0], rows_imbalance_load_aware=rows[1])
        log(f"average imbalance with the plan: round_robin {summary['imbalance_after']:.3f}, load_aware "
            f"{aware_after:.3f} ({summary['imbalance_before'] / max(aware_after, 1e-12):.1f}x lower than without "
            f"EPLB); of rows computed with the shared experts' (in-graph): {rows[0]:.3f} -> {rows[1]:.3f}; "
            f"generated tokens identical: {summary['tokens_identical']}")
    return summary


def _summarise(s, out, plain, balanced, report_plain, report_balanced, stats_plain, stats_balanced, log) -> dict:
    before = report_plain.columns["imbalance-ratio"][-1]
    after = report_balanced.columns["imbalance-ratio"][-1]
    identical = plain.tokens == balanced.tokens
    heatmap = out / "load_heatmap.png"
    save_heatmap(heatmap, _rank_load_share(stats_plain, s.ep), _rank_load_share(stats_balanced, s.ep),
                 stats_plain.layer_ids, (before, after), after_title=f"with EPLB ({s.num_slots} slots)")
    log(f"average imbalance {before:.3f} -> {after:.3f} ({before / max(after, 1e-12):.1f}x lower); "
        f"in-graph {plain.figures['mean_imbalance']:.3f} -> {balanced.figures['mean_imbalance']:.3f}; "
        f"generated tokens identical: {identical}; heatmap -> {heatmap}")
    return {"imbalance_before": float(before), "imbalance_after": float(after), "tokens_identical": identical,
            "in_graph_before": plain.figures["mean_imbalance"], "in_graph_after": balanced.figures["mean_imbalance"],
            "plan_path": str(out / "moe_load_balancer.yaml"), "heatmap": str(heatmap)}
