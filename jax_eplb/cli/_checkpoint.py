"""``create-checkpoint``: seeded random weights, as an orbax checkpoint of a model config or in the
Hugging Face layout of a real architecture (``--hf_config``)."""

from __future__ import annotations

from jax_eplb._errors import EplbInputError
from jax_eplb._random_checkpoint_marker import check_random_checkpoint_target
from jax_eplb.cli._checks import output_folder


def add_checkpoint_parser(sub):
    parser = sub.add_parser("create-checkpoint",
                            help="write a seeded random checkpoint (orbax, or Hugging Face layout)")
    parser.add_argument("--model", default=None, help="model config YAML or shipped name (orbax checkpoint)")
    parser.add_argument("--hf_config", default=None,
                        help="a Hugging Face config.json, or a shipped one's name (deepseek_v3, kimi_k2, glm4_5, "
                             "gpt_oss_120b, qwen3_30b_a3b, mixtral_8x7b): write safetensors in that architecture's "
                             "layout")
    parser.add_argument("--num_layers", type=int, default=None, help="with --hf_config: fewer decoder layers")
    parser.add_argument("--num_experts", type=int, default=None, help="with --hf_config: fewer routed experts")
    parser.add_argument("--vocab_size", type=int, default=None, help="with --hf_config: a smaller vocabulary")
    parser.add_argument("--fp8", action="store_true", help="with --hf_config: FP8 linear weights, 128x128 block scales")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="with --hf_config: dtype of the unquantized tensors")
    parser.add_argument("--output", required=True,
                        help="checkpoint directory to write: new, empty, or one create-checkpoint wrote before "
                             "(replaced whole, atomically); any other existing path is refused")
    parser.add_argument("--seed", type=int, default=0, help="random-weight seed")
    parser.set_defaults(handler=run_create_checkpoint)


def run_create_checkpoint(args) -> int:
    if (args.model is None) == (args.hf_config is None):
        raise EplbInputError("give --model (orbax checkpoint of a model config) or --hf_config (Hugging Face layout)")
    for flag in ("num_layers", "num_experts", "vocab_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EplbInputError(f"--{flag} must be >= 1, got {value}")
    check_random_checkpoint_target(args.output)
    output_folder(args.output, "--output")
    if args.hf_config is not None:
        from jax_eplb.hf import create_hf_checkpoint

        create_hf_checkpoint(args.hf_config, args.output, num_layers=args.num_layers, num_experts=args.num_experts,
                             vocab_size=args.vocab_size, fp8=args.fp8, seed=args.seed, dtype=args.dtype)
        return 0
    if args.fp8 or any(getattr(args, f) is not None for f in ("num_layers", "num_experts", "vocab_size")):
        raise EplbInputError("--num_layers, --num_experts, --vocab_size and --fp8 go with --hf_config")
    from jax_eplb.model import create_random_checkpoint, load_model_config

    config = load_model_config(args.model)
    path = create_random_checkpoint(args.output, config, args.seed)
    print(f"wrote {config.name} checkpoint (seed {args.seed}) -> {path}")
    return 0
