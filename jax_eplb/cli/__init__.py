"""``jax-eplb`` command line: thin wrappers over the Python API.

Subcommands mirror TensorRT-LLM's scripts and flags (``report`` = report_load_statistics.py,
``generate`` = generate_eplb_config.py, ``bench ... throughput`` = trtllm-bench,
``prepare-dataset`` = prepare_dataset.py, ``serve`` = trtllm-serve); ``demo`` runs the whole workflow;
``create-checkpoint`` writes random checkpoints. Input errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import copy
import sys

from jax_eplb._errors import EplbInputError
from jax_eplb.cli._bench import add_bench_parser, add_prepare_dataset_parser, prefill_chunk
from jax_eplb.cli._checkpoint import add_checkpoint_parser
from jax_eplb.cli._demo import add_demo_parser
from jax_eplb.cli._memory import add_memory_parser
from jax_eplb.cli._serve import add_serve_parser
from jax_eplb.cli._statistics import add_generate_parser, add_report_parser

__all__ = ["main", "build_parser", "prefill_chunk", "HelpWithDefaults"]


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, where it has one the help does not state already (the
    description is printed as written). Used by every subcommand and the scripts."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or (isinstance(default, (list, tuple)) and not default) or "default" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _format_action(self, action):
        if not action.help and action.option_strings and self._get_help_string(action):
            action = copy.copy(action)  # an option without help still shows its default
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class _OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line (which flag, what is wrong) and exit 2, as every other input error.
    Every (sub)command's ``--help`` shows the options' defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="jax-eplb", description="Expert-parallel load balancing for JAX MoE models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_parser(sub)
    add_generate_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_prepare_dataset_parser(sub)
    add_checkpoint_parser(sub)
    add_serve_parser(sub)
    add_memory_parser(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error (already printed on one line)
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.handler(args)
    except EplbInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

