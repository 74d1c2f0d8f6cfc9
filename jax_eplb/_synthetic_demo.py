"""The offline EPLB workflow on synthetic statistics alone (no model): ``jax-eplb demo --synthetic``.

record (synthetic TensorRT-LLM dump) -> report -> generate plan -> report the held-out
iterations under the plan -> heatmap of per-layer, per-rank load before and after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jax_eplb._heatmap import save_heatmap
from jax_eplb._metrics import project_onto_plan, rank_loads_from_counts
from jax_eplb._plan_config import MoeLoadBalancerConfig, plan_config_from_slots
from jax_eplb.planning import plan_placement
from jax_eplb._report import load_report
from jax_eplb._trtllm_dump import load_trtllm_dump, save_trtllm_dump
from jax_eplb._synthetic import synthetic_rank_counts


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    num_experts: int = 64
    top_k: int = 6
    first_moe_layer: int = 1
    num_moe_layers: int = 8
    ep_size: int = 8
    num_slots: int = 80
    tokens_per_rank: int = 256
    iter_start: int = 50
    num_iters: int = 20  # first half plans, second half is held out
    seed: int = 0


def run_synthetic_demo(output_dir: str | Path, settings: DemoSettings = DemoSettings(), log=print) -> dict:
    out = Path(output_dir)
    s = settings
    layer_ids = list(range(s.first_moe_layer, s.first_moe_layer + s.num_moe_layers))
    stats_dir = out / "expert_statistic"
    counts = synthetic_rank_counts(s.ep_size, s.num_iters, s.num_moe_layers, s.num_experts,
                                   s.tokens_per_rank, s.top_k, s.seed)
    save_trtllm_dump(stats_dir, counts, layer_ids, s.iter_start, s.top_k)
    stats = load_trtllm_dump(stats_dir)
    half = s.iter_start + s.num_iters // 2
    window, held_out = stats.window(s.iter_start, half), stats.window(half, stats.iter_stop)
    log(f"[1/3] recorded {s.num_iters} iterations x {s.num_moe_layers} layers at EP{s.ep_size} -> {stats_dir}")
    before = load_report(held_out, ep_size=s.ep_size)
    log(before.to_table("Load statistics without EPLB (held-out iterations):"))

    plan = plan_placement(window.total(), s.num_slots, s.ep_size)
    plan_path = out / "moe_load_balancer.yaml"
    plan_config_from_slots(plan.slot_to_expert, layer_ids).to_yaml(plan_path)
    log(f"[2/3] planned {s.num_slots} slots on {s.ep_size} ranks from iterations "
        f"[{s.iter_start}, {half}) -> {plan_path}")

    config = MoeLoadBalancerConfig.from_yaml(plan_path)
    after = load_report(held_out, ep_size=s.ep_size, projection=config)
    log(after.to_table("Load statistics with the plan (held-out iterations):"))
    slot_to_expert = config.slot_to_expert(layer_ids, s.num_experts, s.ep_size)
    total_before = rank_loads_from_counts(held_out.total(), s.ep_size)
    total_after = rank_loads_from_counts(project_onto_plan(held_out.total()[None], slot_to_expert)[0], s.ep_size)
    heatmap = out / "load_heatmap.png"
    imbalance_before = before.columns["imbalance-ratio"][-1]
    imbalance_after = after.columns["imbalance-ratio"][-1]
    save_heatmap(heatmap, total_before / total_before.mean(1, keepdims=True),
                 total_after / total_after.mean(1, keepdims=True), layer_ids, (imbalance_before, imbalance_after))
    log(f"[3/3] average imbalance {imbalance_before:.3f} -> {imbalance_after:.3f} "
        f"({imbalance_before / max(imbalance_after, 1e-12):.1f}x lower); heatmap -> {heatmap}")
    return {"imbalance_before": float(imbalance_before), "imbalance_after": float(imbalance_after),
            "plan_path": str(plan_path), "heatmap": str(heatmap)}
