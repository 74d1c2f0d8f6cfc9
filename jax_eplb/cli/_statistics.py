"""``report`` (report_load_statistics.py) and ``generate`` (generate_eplb_config.py)."""

from __future__ import annotations

import time

from jax_eplb._errors import EplbInputError


def _add_window_flags(parser):
    parser.add_argument("--expert_statistic_path", required=True,
                        help="TensorRT-LLM statistics directory, SGLang logical_count .json, or .npy/.npz")
    parser.add_argument("--iter_start", type=int, default=None, help="first iteration used (default: first recorded)")
    parser.add_argument("--iter_stop", type=int, default=None, help="iteration after the last used (default: all)")


def add_report_parser(sub):
    parser = sub.add_parser("report", help="per-layer load statistics (report_load_statistics.py)")
    _add_window_flags(parser)
    parser.add_argument("--per_expert", action="store_true", help="statistics over experts/slots, not ranks")
    parser.add_argument("--projection_eplb_config_path", default=None,
                        help="report the loads as they would be under this YAML plan")
    parser.add_argument("--ep_size", type=int, default=None, help="ranks (default: number of rank files)")
    parser.add_argument("--lower_bound", action="store_true",
                        help="add the best achievable imbalance for --num_slots")
    parser.add_argument("--num_slots", type=int, default=None,
                        help="slots for --lower_bound (default: the projection plan's, else experts)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(handler=run_report)


def run_report(args) -> int:
    from jax_eplb._plan_config import MoeLoadBalancerConfig
    from jax_eplb._report import load_report
    from jax_eplb._stats import load_statistics

    stats = load_statistics(args.expert_statistic_path, ep_size=args.ep_size).window(args.iter_start, args.iter_stop)
    projection = None
    if args.projection_eplb_config_path:
        projection = MoeLoadBalancerConfig.from_yaml(args.projection_eplb_config_path)
    num_slots = None
    if args.lower_bound:
        num_slots = args.num_slots or (projection.resolved_num_slots(stats.num_experts) if projection
                                       else stats.num_experts)
    report = load_report(stats, ep_size=args.ep_size, per_expert=args.per_expert,
                         projection=projection, lower_bound_slots=num_slots)
    print(report.to_json() if args.format == "json" else report.to_table())
    return 0


def add_generate_parser(sub):
    parser = sub.add_parser("generate", help="write a placement plan YAML (generate_eplb_config.py)")
    _add_window_flags(parser)
    parser.add_argument("--output_path", required=True, help="YAML plan to write (atomically)")
    parser.add_argument("--ep_size", type=int, default=None, help="ranks after rebalancing (default: recorded)")
    parser.add_argument("--num_slots", type=int, default=None, help="total slots (default: number of experts)")
    parser.add_argument("--layer_updates_per_iter", type=int, default=0,
                        help="0: static plan; k > 0: online, k layers re-placed per iteration")
    parser.add_argument("--num_experts_per_token", type=int, default=None,
                        help="accepted for compatibility; read from the statistics")
    parser.add_argument("--algorithm", choices=("balanced", "trtllm", "deepseek"), default="balanced")
    parser.add_argument("--num_groups", type=int, default=1, help="expert groups (deepseek hierarchical)")
    parser.add_argument("--num_nodes", type=int, default=1, help="nodes (deepseek hierarchical)")
    parser.add_argument("--previous_config", default=None,
                        help="plan in force: keep experts in place where that costs no balance")
    parser.add_argument("--migration_tolerance", type=float, default=0.0,
                        help="with --previous_config: accept this relative rise of max rank load to move fewer slots")
    parser.set_defaults(handler=run_generate)


def run_generate(args) -> int:
    from jax_eplb._plan_config import MoeLoadBalancerConfig, plan_config_from_slots
    from jax_eplb.planning import lower_bound, plan_placement
    from jax_eplb._stats import load_statistics

    stats = load_statistics(args.expert_statistic_path).window(args.iter_start, args.iter_stop)
    ep_size = args.ep_size or stats.ep_size or 1
    num_slots = args.num_slots or stats.num_experts
    if args.layer_updates_per_iter < 0:
        raise EplbInputError(f"--layer_updates_per_iter must be >= 0, got {args.layer_updates_per_iter}")
    previous = None
    if args.previous_config:
        previous = MoeLoadBalancerConfig.from_yaml(args.previous_config).slot_to_expert(
            stats.layer_ids, stats.num_experts, ep_size)
    load = stats.total()
    start = time.perf_counter()
    plan = plan_placement(load, num_slots, ep_size, args.algorithm, num_groups=args.num_groups,
                          num_nodes=args.num_nodes, previous=previous,
                          migration_tolerance=args.migration_tolerance)
    elapsed = time.perf_counter() - start
    plan_config_from_slots(plan.slot_to_expert, stats.layer_ids, args.layer_updates_per_iter).to_yaml(args.output_path)
    bound = lower_bound(load, num_slots, ep_size).imbalance
    print(f"{args.algorithm} plan: {stats.num_layers} layers, {stats.num_experts} experts -> {num_slots} slots "
          f"on {ep_size} ranks, planned in {elapsed * 1e3:.1f} ms")
    print(f"imbalance over the window's total load: mean {plan.imbalance.mean():.4f}, worst "
          f"{plan.imbalance.max():.4f} (lower bound mean {bound.mean():.4f}); "
          f"replicas sharing a rank with a copy of themselves: {int(plan.duplicates.sum())}")
    if plan.slots_moved is not None:
        print(f"slots moved from {args.previous_config}: {int(plan.slots_moved.sum())} of "
              f"{plan.slot_to_expert.size} ({plan.slots_moved.mean():.1f} per layer)")
    print(f"wrote {args.output_path}")
    return 0
