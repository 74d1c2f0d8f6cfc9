"""The whole offline EPLB workflow on a model (``jax-eplb demo``), as a user runs it by hand:

1. ``prepare-dataset``; ``bench ... throughput`` at EP8 with statistics recording on;
2. ``report`` the recorded statistics;
3. ``generate`` a plan (e.g. 80 slots on 8 ranks);
4. rerun with ``moe_load_balancer: plan.yaml``, recording again (slot ids, as TensorRT-LLM);
5. ``report`` again; check the generated tokens are identical; save a heatmap PNG.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from jax_eplb._atomic import atomic_write_text
from jax_eplb._heatmap import save_heatmap
from jax_eplb._metrics import rank_loads_from_counts
from jax_eplb._plan_config import plan_config_from_slots
from jax_eplb._planner import plan_placement
from jax_eplb._report import load_report
from jax_eplb._stats import load_trtllm_dump
from jax_eplb.serving._dataset import prepare_dataset
from jax_eplb.serving._recorder import PATH_VARIABLE, RANGE_VARIABLE
from jax_eplb.serving._throughput import ThroughputSettings, format_figures, run_throughput


@dataclasses.dataclass(frozen=True)
class WorkflowSettings:
    model: str = "tiny"
    ep: int = 8
    num_slots: int = 80
    num_requests: int = 256
    input_len: int = 32
    output_len: int = 24
    max_batch_size: int = 128
    iter_range: str = "0-1000"  # record every iteration of these short runs
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


def run_model_workflow(output_dir, settings: WorkflowSettings = WorkflowSettings(),
                       log: Callable[[str], None] = print) -> dict:
    s, out = settings, Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from jax_eplb.model import load_model_config

    config = load_model_config(s.model)
    dataset = prepare_dataset(out / "dataset.jsonl", num_requests=s.num_requests, input_mean=s.input_len,
                              output_mean=s.output_len, vocab_size=config.vocab_size, seed=s.seed)
    base = dict(model=s.model, dataset=str(dataset), ep=s.ep, max_batch_size=s.max_batch_size,
                emulate_devices=s.emulate_devices, seed=s.seed, progress=s.progress)

    def bench(tag: str, extra: str | None, replica_policy: str = s.replica_policy):
        stats_dir = out / f"expert_statistic_{tag}"
        if stats_dir.exists():
            for f in stats_dir.iterdir():  # this demo's own previous output
                f.unlink()
        env = {RANGE_VARIABLE: s.iter_range, PATH_VARIABLE: str(stats_dir)}
        result = run_throughput(ThroughputSettings(**base, extra_llm_api_options=extra, replica_policy=replica_policy,
                                                   output_tokens=str(out / f"tokens_{tag}.jsonl"),
                                                   report_json=str(out / f"bench_{tag}.json")), env, log)
        log(format_figures(result.figures))
        return result, load_trtllm_dump(stats_dir)

    log(f"[1/5] EP{s.ep} without EPLB, recording expert statistics ({RANGE_VARIABLE}={s.iter_range})")
    plain, stats_plain = bench("no_eplb", None)
    report_plain = load_report(stats_plain, ep_size=s.ep)
    log("[2/5] " + report_plain.to_table("Load statistics without EPLB (recorded):"))

    plan = plan_placement(stats_plain.total(), s.num_slots, s.ep, s.algorithm)
    plan_path = out / "moe_load_balancer.yaml"
    plan_config_from_slots(plan.slot_to_expert, stats_plain.layer_ids).to_yaml(plan_path)
    extra_path = out / "extra_llm_api_options.yaml"
    atomic_write_text(extra_path, yaml.safe_dump({"moe_load_balancer": str(plan_path.absolute())}))
    log(f"[3/5] {s.algorithm} plan: {s.num_slots} slots on {s.ep} ranks -> {plan_path}")

    log(f"[4/5] EP{s.ep} with the plan, recording slot statistics")
    balanced, stats_balanced = bench("eplb", str(extra_path))
    report_balanced = load_report(stats_balanced, ep_size=s.ep)
    log("[5/5] " + report_balanced.to_table("Load statistics with the EPLB plan (recorded):"))

    before = report_plain.columns["imbalance-ratio"][-1]
    after = report_balanced.columns["imbalance-ratio"][-1]
    identical = plain.tokens == balanced.tokens
    heatmap = out / "load_heatmap.png"
    save_heatmap(heatmap, _rank_load_share(stats_plain, s.ep), _rank_load_share(stats_balanced, s.ep),
                 stats_plain.layer_ids, after_title=f"with EPLB ({s.num_slots} slots)")
    log(f"average imbalance {before:.3f} -> {after:.3f} ({before / max(after, 1e-12):.1f}x lower); "
        f"in-graph {plain.figures['mean_imbalance']:.3f} -> {balanced.figures['mean_imbalance']:.3f}; "
        f"generated tokens identical: {identical}; heatmap -> {heatmap}")
    summary = {"imbalance_before": float(before), "imbalance_after": float(after), "tokens_identical": identical,
            "in_graph_before": plain.figures["mean_imbalance"], "in_graph_after": balanced.figures["mean_imbalance"],
               "plan_path": str(plan_path), "heatmap": str(heatmap)}
    if s.compare_load_aware and s.replica_policy != "load_aware":
        log("[extra] the same plan with load_aware replica choice (ours; TensorRT-LLM uses round_robin)")
        aware, stats_aware = bench("eplb_load_aware", str(extra_path), "load_aware")
        aware_after = load_report(stats_aware, ep_size=s.ep).columns["imbalance-ratio"][-1]
        summary.update(imbalance_after_load_aware=float(aware_after),
                       tokens_identical=identical and aware.tokens == plain.tokens)
        log(f"average imbalance with the plan: round_robin {after:.3f}, load_aware {aware_after:.3f} "
            f"({before / max(aware_after, 1e-12):.1f}x lower than without EPLB); generated tokens identical: "
            f"{summary['tokens_identical']}")
    return summary
