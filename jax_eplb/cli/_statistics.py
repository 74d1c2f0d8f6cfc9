"""``report`` (report_load_statistics.py) and ``generate`` (generate_eplb_config.py)."""

from __future__ import annotations

import sys
import time

import numpy as np

from jax_eplb._assignment import check_slot_geometry
from jax_eplb._errors import EplbInputError
from jax_eplb.cli._checks import at_least, output_file


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
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="a table (report_load_statistics.py's) or JSON per layer")
    parser.set_defaults(handler=run_report)


def run_report(args) -> int:
    from jax_eplb._report import load_report

    at_least(args.ep_size, 1, "--ep_size")
    at_least(args.num_slots, 1, "--num_slots")
    if args.num_slots is not None and not args.lower_bound:
        raise EplbInputError("--num_slots sets the slots of --lower_bound: give --lower_bound too")
    projection, ep_size = None, args.ep_size
    if args.projection_eplb_config_path:
        projection, ep_size = _projection(args.projection_eplb_config_path, args.ep_size)
    stats = _statistics(args, ep_size=None if projection is not None else args.ep_size)
    if projection is None:
        ep_size = _recorded_ranks(stats, args.ep_size, args.per_expert)
        if stats.num_experts % ep_size:  # the layout without a plan: one slot per expert
            raise EplbInputError(f"--ep_size {ep_size}: {stats.num_experts} experts (one slot each without a plan) "
                                 f"do not split over {ep_size} ranks")
    else:
        ep_size = ep_size or stats.ep_size
        num_slots = projection.resolved_num_slots(stats.num_experts)
        if ep_size is None or num_slots % ep_size:
            raise EplbInputError(f"{args.projection_eplb_config_path}: {num_slots} slots do not split over "
                                 f"{ep_size or 'unknown'} ranks; give the plan's ep_size (a key of the projection "
                                 f"config, or --ep_size)")
    num_slots = None
    if args.lower_bound:
        num_slots = args.num_slots or (projection.resolved_num_slots(stats.num_experts) if projection
                                       else stats.num_experts)
        try:
            check_slot_geometry(stats.num_experts, num_slots, ep_size)
        except EplbInputError as error:
            raise EplbInputError(f"--lower_bound: {error}") from None
    report = load_report(stats, ep_size=ep_size, per_expert=args.per_expert,
                         projection=projection, lower_bound_slots=num_slots)
    print(report.to_json() if args.format == "json" else report.to_table())
    return 0


def _statistics(args, ep_size=None):
    from jax_eplb._stat_files import load_statistics

    stats = load_statistics(args.expert_statistic_path, ep_size=ep_size).window(args.iter_start, args.iter_stop)
    if stats.partial:
        print(f"note: {args.expert_statistic_path} is from an interrupted run (meta_info.json: partial)",
              file=sys.stderr)
    return stats


def _recorded_ranks(stats, ep_size: int | None, per_expert: bool) -> int:
    """The rank split of recorded statistics: the recording's (TensorRT-LLM dumps); SGLang's
    ``logical_count`` carries none, so ``--ep_size`` must say it."""
    if ep_size is None and stats.ep_size is None and not per_expert:
        raise EplbInputError("these statistics carry no rank split (SGLang logical_count, NumPy): give --ep_size")
    return ep_size or stats.ep_size or 1


def _projection(path, ep_size: int | None):
    """TensorRT-LLM's projection config: a plan plus its ``ep_size``."""
    from jax_eplb._plan_config import MoeLoadBalancerConfig
    from jax_eplb._yaml import load_yaml

    raw = load_yaml(path, "projection config")
    if not isinstance(raw, dict):
        raise EplbInputError(f"{path}: expected a mapping with num_slots, ep_size, initial_global_assignments")
    raw = dict(raw)
    planned = raw.pop("ep_size", None)
    if planned is not None and (not isinstance(planned, int) or isinstance(planned, bool) or planned < 1):
        raise EplbInputError(f"{path}: ep_size must be a positive integer, got {planned!r}")
    if planned is not None and ep_size is not None and planned != ep_size:
        raise EplbInputError(f"{path} says ep_size {planned} but --ep_size is {ep_size}")
    return MoeLoadBalancerConfig.from_dict(raw, str(path)), planned or ep_size


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
    parser.add_argument("--algorithm", choices=("balanced", "flow", "trtllm", "deepseek"), default="balanced",
                        help="balanced: for the window's total; flow: for each iteration's load under load_aware "
                             "(uses the recorded iterations, or the noise model)")
    parser.add_argument("--decode_tokens_per_rank", type=int, default=256,
                        help="flow, with fewer than 8 recorded iterations (e.g. SGLang totals): the noise model's "
                             "tokens per rank per iteration")
    parser.add_argument("--num_groups", type=int, default=1, help="expert groups (deepseek hierarchical)")
    parser.add_argument("--num_nodes", type=int, default=1, help="nodes (deepseek hierarchical)")
    parser.add_argument("--previous_config", default=None,
                        help="plan in force: keep experts in place where that costs no balance")
    parser.add_argument("--migration_tolerance", type=float, default=0.0,
                        help="with --previous_config: accept this relative rise of max rank load to move fewer slots")
    parser.add_argument("--failed_ranks", type=int, nargs="+", default=(), metavar="RANK",
                        help="ranks that serve nothing: plan onto the others (their slots get -1)")
    parser.add_argument("--mask_only", action="store_true",
                        help="with --previous_config and --failed_ranks: TensorRT-LLM's mask-only reconfiguration "
                             "(drop the failed ranks' slots; nothing else moves)")
    parser.set_defaults(handler=run_generate)


def run_generate(args) -> int:
    from jax_eplb._plan_config import MoeLoadBalancerConfig, plan_config_from_slots
    from jax_eplb.planning import PlacementPlan, lower_bound, mask_failed_ranks, plan_placement

    for flag, minimum in (("ep_size", 1), ("num_slots", 1), ("num_groups", 1), ("num_nodes", 1),
                          ("layer_updates_per_iter", 0), ("decode_tokens_per_rank", 1)):
        at_least(getattr(args, flag), minimum, f"--{flag}")
    if args.failed_ranks and args.layer_updates_per_iter:
        raise EplbInputError("--failed_ranks makes a static plan (online updates would fill the failed ranks' "
                             "slots); use --layer_updates_per_iter 0")
    if args.migration_tolerance < 0:
        raise EplbInputError(f"--migration_tolerance must be >= 0, got {args.migration_tolerance}")
    output_file(args.output_path, "--output_path")
    stats = _statistics(args)
    ep_size = args.ep_size or _recorded_ranks(stats, None, False)
    num_slots = args.num_slots or stats.num_experts
    previous = None
    if args.previous_config:
        previous = MoeLoadBalancerConfig.from_yaml(args.previous_config).slot_to_expert(
            stats.layer_ids, stats.num_experts, ep_size)
    load = stats.total()
    start = time.perf_counter()
    if args.mask_only:
        if previous is None or not args.failed_ranks:
            raise EplbInputError("--mask_only needs --previous_config (the plan in force) and --failed_ranks")
        plan = PlacementPlan.of(mask_failed_ranks(previous, ep_size, args.failed_ranks), load, ep_size, previous)
    else:
        plan = plan_placement(load, num_slots, ep_size, args.algorithm, num_groups=args.num_groups,
                              num_nodes=args.num_nodes, previous=previous,
                              migration_tolerance=args.migration_tolerance, failed_ranks=args.failed_ranks,
                              samples=(samples := _flow_samples(args, stats, ep_size)))
    elapsed = time.perf_counter() - start
    if args.algorithm == "flow" and not args.mask_only:
        from jax_eplb.planning import per_iteration_imbalance

        print(f"per-iteration imbalance on those iterations under load_aware: mean "
              f"{per_iteration_imbalance(plan.slot_to_expert, samples, ep_size).mean():.4f}")
    plan_config_from_slots(plan.slot_to_expert, stats.layer_ids, args.layer_updates_per_iter).to_yaml(args.output_path)
    num_slots = plan.slot_to_expert.shape[1]
    serving = ep_size - len(args.failed_ranks)
    bound = lower_bound(load, num_slots // ep_size * serving, serving).imbalance
    _print_plan(args, stats, plan, bound, num_slots, ep_size, elapsed)
    return 0


def _flow_samples(args, stats, ep_size: int):
    """``flow``: up to 16 recorded iterations (evenly spaced) when there are at least 8, else the
    noise model's iterations around the window's total. None for the other algorithms."""
    from jax_eplb.planning import sample_iterations

    if args.algorithm != "flow":
        return None
    if stats.num_iters >= 8:
        picked = np.unique(np.linspace(0, stats.num_iters - 1, 16).round().astype(int))
        print(f"flow: planning for {picked.size} of the {stats.num_iters} recorded iterations")
        return stats.counts[picked]
    top_k = stats.num_experts_per_token or args.num_experts_per_token or 8
    serving = ep_size - len(args.failed_ranks)
    print(f"flow: {stats.num_iters} recorded iteration(s): planning for the noise model's iterations "
          f"({args.decode_tokens_per_rank} tokens per rank x top-{top_k} on {serving} ranks)")
    return sample_iterations(stats.total(), serving * args.decode_tokens_per_rank * top_k)


def _print_plan(args, stats, plan, bound, num_slots: int, ep_size: int, elapsed: float) -> None:
    failed = f" ({sorted(args.failed_ranks)} failed: their slots -1)" if args.failed_ranks else ""
    name = "mask-only" if args.mask_only else args.algorithm
    print(f"{name} plan: {stats.num_layers} layers, {stats.num_experts} experts -> {num_slots} slots "
          f"on {ep_size} ranks{failed}, planned in {elapsed * 1e3:.1f} ms")
    print(f"imbalance over the window's total load: mean {plan.imbalance.mean():.4f}, worst "
          f"{plan.imbalance.max():.4f} (lower bound mean {bound.mean():.4f}); "
          f"replicas sharing a rank with a copy of themselves: {int(plan.duplicates.sum())}")
    if plan.slots_moved is not None:
        print(f"slots moved from {args.previous_config}: {int(plan.slots_moved.sum())} of "
              f"{plan.slot_to_expert.size} ({plan.slots_moved.mean():.1f} per layer)")
    print(f"wrote {args.output_path}")
