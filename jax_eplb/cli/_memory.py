"""``memory``: device memory per device of a model at a geometry, from its config alone (no weights)."""

from __future__ import annotations

import json

from jax_eplb._errors import EplbInputError
from jax_eplb.cli._bench import add_weight_dtype_option
from jax_eplb.cli._checks import at_least


def add_memory_parser(sub):
    parser = sub.add_parser("memory", help="device memory per device: routed experts, replicated weights, KV cache, "
                                           "the dequantizing transient (from the config alone, no weights)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_path", default=None, help="a Hugging Face checkpoint directory (its config.json)")
    source.add_argument("--hf_config", default=None,
                        help="a Hugging Face config.json, or the name of a shipped one (deepseek_v3, kimi_k2, glm4_5, "
                             "gpt_oss_120b, qwen3_30b_a3b, mixtral_8x7b), as create-checkpoint")
    source.add_argument("--model", default=None, help="a model config YAML or shipped name (tiny, deepseek_v3_slice)")
    parser.add_argument("--ep_size", type=int, required=True, help="expert-parallel ranks")
    parser.add_argument("--num_slots", type=int, default=None, help="expert slots per MoE layer (default: one per "
                                                                     "expert)")
    add_weight_dtype_option(parser)
    parser.add_argument("--max_batch_size", type=int, default=256,
                        help="batch rows over all ranks (each device caches ceil(rows / ep_size))")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="KV-cache length per row (default: the model config's; Hugging Face configs: "
                             "max_position_embeddings, at most 4096)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    parser.set_defaults(handler=run_memory)


def run_memory(args) -> int:
    import dataclasses

    from jax_eplb.model import device_memory, format_memory, load_model_config

    for flag, minimum in (("ep_size", 1), ("num_slots", 1), ("max_batch_size", 1), ("max_seq_len", 1)):
        at_least(getattr(args, flag), minimum, f"--{flag}")
    if args.model is not None:
        if args.weight_dtype != "auto":
            raise EplbInputError(f"--weight_dtype {args.weight_dtype} goes with Hugging Face configs (--model_path, "
                                 f"--hf_config)")
        config = load_model_config(args.model)
        if args.max_seq_len is not None:
            config = dataclasses.replace(config, max_seq_len=args.max_seq_len)
    else:
        import jax_eplb_configs
        from jax_eplb.hf import hf_model_config

        path = args.model_path
        if path is None:
            try:
                path = jax_eplb_configs.hf_config_path(args.hf_config)
            except FileNotFoundError as err:
                raise EplbInputError(f"--hf_config: {err}") from None
        config, _, _ = hf_model_config(path, max_seq_len=args.max_seq_len, weight_dtype=args.weight_dtype)
    memory = device_memory(config, ep_size=args.ep_size, num_slots=args.num_slots, max_batch_size=args.max_batch_size)
    num_slots = args.num_slots or config.num_experts
    weights = "FP8 e4m3 in {}x{} blocks".format(*config.fp8_block) if config.fp8_block else config.dtype
    if args.format == "json":
        print(json.dumps({"model": config.name, "ep_size": args.ep_size, "num_slots": num_slots,
                          "weight_dtype": args.weight_dtype, "linear_weights": weights, "compute_dtype": config.dtype,
                          "max_batch_size": args.max_batch_size, "max_seq_len": config.max_seq_len,
                          **memory._asdict()}, indent=2))
        return 0
    print(format_memory(memory, f"{config.name}: ep {args.ep_size}, {num_slots} slots, linear weights {weights}, "
                                f"compute {config.dtype}; {args.max_batch_size} batch rows x {config.max_seq_len} "
                                f"positions"))
    return 0
