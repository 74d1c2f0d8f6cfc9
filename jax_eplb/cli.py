"""``jax-eplb`` command line: thin wrappers over the Python API.

Subcommands mirror TensorRT-LLM's scripts and flags (``report`` = report_load_statistics.py,
``generate`` = generate_eplb_config.py, ``bench ... throughput`` = trtllm-bench,
``prepare-dataset`` = prepare_dataset.py); ``demo`` runs the whole workflow.
"""

from __future__ import annotations

import argparse
import sys
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


def add_demo_parser(sub):
    parser = sub.add_parser("demo", help="run the whole EPLB workflow on the embedded default model")
    parser.add_argument("--output_dir", default="demo_output", help="where dataset, statistics, plan and heatmap go")
    parser.add_argument("--model", default="tiny", help="model config YAML or shipped name (default: tiny)")
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--num_slots", type=int, default=80)
    parser.add_argument("--emulate_devices", type=int, default=8,
                        help="CPU-emulated devices (default 8; 0: use the machine's accelerators)")
    parser.add_argument("--replica_policy", choices=("round_robin", "load_aware"), default="round_robin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true",
                        help="planner-only demo on synthetic statistics (no model is run)")
    parser.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    if args.synthetic:
        from jax_eplb._synthetic_demo import DemoSettings, run_synthetic_demo

        run_synthetic_demo(args.output_dir, DemoSettings(seed=args.seed))
        return 0
    from jax_eplb.serving._workflow import WorkflowSettings, run_model_workflow

    summary = run_model_workflow(args.output_dir, WorkflowSettings(
        model=args.model, ep=args.ep, num_slots=args.num_slots, emulate_devices=args.emulate_devices or None,
        replica_policy=args.replica_policy, seed=args.seed, progress=sys.stderr.isatty()))
    return 0 if summary["tokens_identical"] else 1


def add_bench_parser(sub):
    parser = sub.add_parser("bench", help="run a model over a dataset (mirrors trtllm-bench)")
    parser.add_argument("--model", required=True, help="model config YAML or shipped name (tiny, deepseek_v3_slice)")
    parser.add_argument("--model_path", default=None,
                        help="orbax checkpoint directory (default: seeded random weights)")
    parser.add_argument("--seed", type=int, default=0, help="random-weight seed when no --model_path")
    parser.add_argument("--coordinator_address", default=None, help="multi-host: jax.distributed coordinator host:port")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    modes = parser.add_subparsers(dest="mode", required=True)
    thr = modes.add_parser("throughput", help="greedy generation throughput with per-rank load")
    thr.add_argument("--ep", type=int, required=True, help="expert-parallel ranks")
    thr.add_argument("--dataset", required=True, help="JSON lines: task_id, input_ids or prompt, output_tokens")
    thr.add_argument("--extra_llm_api_options", default=None,
                     help="YAML with moe_max_num_tokens and moe_load_balancer (path or mapping)")
    thr.add_argument("--warmup", type=int, default=0, help="requests run first, untimed")
    thr.add_argument("--eos_id", type=int, default=-1, help="stop a request at this token (-1: never)")
    thr.add_argument("--max_batch_size", type=int, default=256)
    thr.add_argument("--emulate_devices", type=int, default=None,
                     help="run on N CPU-emulated devices (when the machine has fewer than --ep)")
    thr.add_argument("--replica_policy", choices=("round_robin", "load_aware"), default="round_robin")
    thr.add_argument("--transport", choices=("all_to_all", "ragged"), default="all_to_all",
                     help="MoE dispatch: fixed-capacity all_to_all (any backend) or ragged_all_to_all (GPU)")
    thr.add_argument("--prefill_chunk", type=int, default=None,
                     help="chunked prefill: prompt tokens a request prefills per iteration (default: whole prompts)")
    thr.add_argument("--enable_chunked_prefill", action="store_true",
                     help="TensorRT-LLM's flag: chunked prefill with --max_num_tokens per iteration, split evenly "
                          "over the batch rows (steps here are [batch, chunk])")
    thr.add_argument("--max_num_tokens", type=int, default=None,
                     help="with --enable_chunked_prefill: token budget per iteration")
    thr.add_argument("--grouped_matmul", choices=("auto", "ragged_dot", "padded", "pallas"), default="auto",
                     help="expert compute: XLA ragged_dot, tile-padded XLA batched matmul, or the Pallas tile-grouped "
                          "kernel (GPU); auto: padded on CPU, ragged_dot on GPU")
    thr.add_argument("--online_planner", choices=("migration_aware", "trtllm"), default="migration_aware",
                     help="online mode (layer_updates_per_iter > 0): our migration-aware balanced planner, or "
                          "TensorRT-LLM's greedy re-planned from scratch")
    thr.add_argument("--online_state", default=None,
                     help="online mode: restore decayed statistics and placement from this directory if it "
                          "exists, save them there at exit (a restarted server keeps its placement)")
    thr.add_argument("--output_tokens", default=None, help="write the generated ids per task (JSON lines)")
    thr.add_argument("--report_json", default=None, help="write all figures as JSON")
    thr.add_argument("--no_progress", action="store_true")
    parser.set_defaults(handler=run_bench)


def prefill_chunk(args) -> int | None:
    """--prefill_chunk, or TensorRT-LLM's --enable_chunked_prefill --max_num_tokens (budget / batch rows)."""
    if not args.enable_chunked_prefill:
        if args.max_num_tokens is not None:
            print("note: --max_num_tokens only sets the chunk size with --enable_chunked_prefill here (ignored)",
                  file=sys.stderr)
        return args.prefill_chunk
    if args.max_num_tokens is None:
        raise EplbInputError("--enable_chunked_prefill needs --max_num_tokens (the token budget per iteration)")
    if args.prefill_chunk is not None:
        raise EplbInputError("give either --prefill_chunk or --enable_chunked_prefill --max_num_tokens, not both")
    return max(1, args.max_num_tokens // args.max_batch_size)


def run_bench(args) -> int:
    from jax_eplb.serving import ThroughputSettings, format_figures, initialize_distributed, read_bench_inputs, \
        run_throughput
    from jax_eplb.sharding import ep_mesh

    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    inputs = read_bench_inputs(args.model, args.dataset, args.ep, model_path=args.model_path, seed=args.seed,
                               extra_llm_api_options=args.extra_llm_api_options)
    settings = ThroughputSettings(
        max_batch_size=args.max_batch_size, warmup=args.warmup, eos_id=args.eos_id,
        replica_policy=args.replica_policy, transport=args.transport, grouped_matmul=args.grouped_matmul,
        prefill_chunk=prefill_chunk(args), moe_max_num_tokens=inputs.options.moe_max_num_tokens,
        online_planner=args.online_planner, progress=not args.no_progress)
    for key in inputs.options.ignored_keys:
        print(f"note: extra option {key!r} has no effect here (ignored)")
    mesh = ep_mesh(args.ep, args.emulate_devices)
    result = run_throughput(inputs.config, inputs.weights, inputs.requests, mesh, settings,
                            plan=inputs.options.load_balancer, recorder=inputs.recorder,
                            online_state=args.online_state)
    result.write(args.output_tokens, args.report_json)
    print(format_figures(result.figures))
    return 0


def add_prepare_dataset_parser(sub):
    parser = sub.add_parser("prepare-dataset", help="write a synthetic trtllm-bench dataset (token-norm-dist)")
    parser.add_argument("--output", required=True, help="JSON lines file to write")
    parser.add_argument("--vocab_size", type=int, default=None, help="token id range (default: --model's vocab)")
    parser.add_argument("--model", default="tiny", help="model config whose vocabulary the ids use")
    parser.add_argument("--seed", type=int, default=0)
    dist = parser.add_subparsers(dest="distribution", required=True)
    norm = dist.add_parser("token-norm-dist", help="normally distributed input/output lengths")
    norm.add_argument("--num-requests", "--num_requests", dest="num_requests", type=int, required=True)
    norm.add_argument("--input-mean", "--input_mean", dest="input_mean", type=int, required=True)
    norm.add_argument("--output-mean", "--output_mean", dest="output_mean", type=int, required=True)
    norm.add_argument("--input-stdev", "--input_stdev", dest="input_stdev", type=float, default=0.0)
    norm.add_argument("--output-stdev", "--output_stdev", dest="output_stdev", type=float, default=0.0)
    parser.set_defaults(handler=run_prepare_dataset)


def run_prepare_dataset(args) -> int:
    from jax_eplb.model import load_model_config
    from jax_eplb.serving import prepare_dataset

    vocab = args.vocab_size or load_model_config(args.model).vocab_size
    path = prepare_dataset(args.output, num_requests=args.num_requests, input_mean=args.input_mean,
                           output_mean=args.output_mean, input_stdev=args.input_stdev,
                           output_stdev=args.output_stdev, vocab_size=vocab, seed=args.seed)
    print(f"wrote {args.num_requests} requests -> {path}")
    return 0


def add_checkpoint_parser(sub):
    parser = sub.add_parser("create-checkpoint", help="write a seeded random orbax checkpoint for a model config")
    parser.add_argument("--model", required=True, help="model config YAML or shipped name")
    parser.add_argument("--output", required=True, help="new checkpoint directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run_create_checkpoint)


def run_create_checkpoint(args) -> int:
    from jax_eplb.model import create_random_checkpoint, load_model_config

    config = load_model_config(args.model)
    path = create_random_checkpoint(args.output, config, args.seed)
    print(f"wrote {config.name} checkpoint (seed {args.seed}) -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-eplb", description="Expert-parallel load balancing for JAX MoE models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_parser(sub)
    add_generate_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_prepare_dataset_parser(sub)
    add_checkpoint_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except EplbInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
