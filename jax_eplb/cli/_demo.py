"""``demo``: the whole workflow on the embedded default model (or synthetic statistics)."""

from __future__ import annotations

import sys

from jax_eplb.cli._checks import output_folder


def add_demo_parser(sub):
    parser = sub.add_parser("demo", help="run the whole EPLB workflow on the embedded default model")
    parser.add_argument("--output_dir", default="demo_output", help="where dataset, statistics, plan and heatmap go")
    parser.add_argument("--model", default="tiny", help="model config YAML or shipped name")
    parser.add_argument("--ep", type=int, default=8, help="expert-parallel ranks")
    parser.add_argument("--num_slots", type=int, default=80, help="total expert slots of the plan")
    parser.add_argument("--emulate_devices", type=int, default=8,
                        help="CPU-emulated devices (0: use the machine's accelerators)")
    parser.add_argument("--replica_policy", choices=("round_robin", "load_aware"), default="round_robin",
                        help="which replica of an expert a token uses")
    parser.add_argument("--seed", type=int, default=0, help="random-weight and dataset seed")
    parser.add_argument("--synthetic", action="store_true",
                        help="planner-only demo on synthetic statistics (no model is run)")
    parser.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    output_folder(args.output_dir, "--output_dir")
    if args.synthetic:
        from jax_eplb._synthetic_demo import DemoSettings, run_synthetic_demo

        run_synthetic_demo(args.output_dir, DemoSettings(seed=args.seed))
        return 0
    from jax_eplb.serving._workflow import WorkflowSettings, run_model_workflow

    summary = run_model_workflow(args.output_dir, WorkflowSettings(
        model=args.model, ep=args.ep, num_slots=args.num_slots, emulate_devices=args.emulate_devices or None,
        replica_policy=args.replica_policy, seed=args.seed, progress=sys.stderr.isatty()))
    return 0 if summary["tokens_identical"] else 1
