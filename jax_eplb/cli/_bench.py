"""``bench ... throughput`` (trtllm-bench) and ``prepare-dataset`` (prepare_dataset.py)."""

from __future__ import annotations

import sys

from jax_eplb._errors import EplbInputError
from jax_eplb.cli._checks import at_least, output_file, trtllm_parallel_flags


def add_bench_parser(sub):
    parser = sub.add_parser("bench", help="run a model over a dataset (mirrors trtllm-bench)")
    parser.add_argument("--model", required=True,
                        help="model config YAML or shipped name (tiny, deepseek_v3_slice); with a Hugging Face "
                             "--model_path only a label (e.g. deepseek-ai/DeepSeek-R1)")
    parser.add_argument("--model_path", default=None,
                        help="Hugging Face checkpoint directory (config.json + safetensors: deepseek_v3, kimi_k2, "
                             "glm4_moe, gpt_oss, qwen3_moe, mixtral) or an orbax checkpoint from create-checkpoint "
                             "(default: seeded random weights)")
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
    thr.add_argument("--max_batch_size", type=int, default=256, help="requests decoded together")
    thr.add_argument("--max_seq_len", type=int, default=None,
                     help="KV-cache length (default: the model config's; Hugging Face models: the dataset's longest "
                          "request)")
    thr.add_argument("--emulate_devices", type=int, default=None,
                     help="run on N CPU-emulated devices (when the machine has fewer than --ep)")
    add_moe_options(thr)
    add_weight_dtype_option(thr)
    thr.add_argument("--prefill_chunk", type=int, default=None,
                     help="chunked prefill: prompt tokens a request prefills per iteration (default: whole prompts)")
    thr.add_argument("--enable_chunked_prefill", action="store_true",
                     help="TensorRT-LLM's flag: chunked prefill with --max_num_tokens per iteration, split evenly "
                          "over the batch rows (steps here are [batch, chunk])")
    thr.add_argument("--max_num_tokens", type=int, default=None,
                     help="with --enable_chunked_prefill: token budget per iteration")
    thr.add_argument("--online_lockstep", action="store_true",
                     help="online mode: apply each plan exactly one iteration after it started, waiting for the "
                          "planner if it is slower (multi-process runs always do): figures that do not depend on "
                          "how fast the host plans")
    thr.add_argument("--output_tokens", default=None, help="write the generated ids per task (JSON lines)")
    thr.add_argument("--report_json", default=None, help="write all figures as JSON")
    thr.add_argument("--report_traffic", action="store_true",
                     help="record each step's dispatch rows and report the bytes each rank sends per MoE layer for "
                          "every transport and dispatch mode")
    thr.add_argument("--no_progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    _add_trtllm_bench_flags(thr)
    parser.set_defaults(handler=run_bench)


WEIGHT_DTYPES = ("auto", "fp8", "bf16", "float32")


def add_weight_dtype_option(parser) -> None:
    parser.add_argument("--weight_dtype", choices=WEIGHT_DTYPES, default="auto",
                        help="Hugging Face checkpoints: auto keeps weights as stored (an FP8 checkpoint's linear "
                             "weights stay FP8 on the devices, dequantized in the step per layer); fp8 the same, "
                             "refusing checkpoints without FP8; bf16 / float32 dequantize while loading")


def add_moe_options(parser) -> None:
    """How the MoE layers run and how the online balancer plans: shared by ``bench throughput`` and ``serve``."""
    parser.add_argument("--replica_policy", choices=("round_robin", "load_aware"), default="round_robin",
                        help="which replica of an expert a token uses: TensorRT-LLM's round_robin, or ours by load")
    parser.add_argument("--shared_expert_balance", choices=("auto", "on", "off"), default="auto",
                        help="models with shared experts: their rows join the load-aware split (a rank computes part "
                             "of another's shared rows, riding along with tokens it receives anyway); auto: on with "
                             "--replica_policy load_aware on more than one rank")
    parser.add_argument("--transport", choices=("auto", "all_to_all", "ragged"), default="auto",
                        help="MoE exchange: fixed-capacity all_to_all (any backend), ragged_all_to_all (GPU; real "
                             "rows only), or auto: on a single-process GPU mesh the faster correct one, timed once at "
                             "the model's shapes; else all_to_all")
    parser.add_argument("--dispatch", choices=("token", "entry"), default="token",
                        help="token: each token once per destination rank, its entries combined there; entry: every "
                             "(token, k) entry on its own")
    parser.add_argument("--grouped_matmul", choices=("auto", "ragged_dot", "padded", "pallas", "tokamax"),
                        default="auto",
                        help="expert compute: XLA ragged_dot, tile-padded XLA batched matmul, our Pallas "
                             "tile-grouped kernel (Triton; GPU), or tokamax.ragged_dot (the gpu extra: pip install "
                             "'jax-eplb[gpu]'); auto: padded on CPU, on a GPU the fastest close one of ragged_dot, "
                             "tokamax (if installed) and, on JAX < 0.11, pallas, timed once at the model's shapes")
    parser.add_argument("--online_planner", choices=("migration_aware", "flow", "trtllm"), default="migration_aware",
                        help="online mode (layer_updates_per_iter > 0): our migration-aware balanced planner, the "
                             "flow planner (per-iteration load; with --replica_policy load_aware), or TensorRT-LLM's "
                             "greedy re-planned from scratch")
    parser.add_argument("--online_state", default=None,
                        help="online mode: restore decayed statistics and placement from this directory if it "
                             "exists, save them there at exit (a restarted server keeps its placement)")


def _add_trtllm_bench_flags(thr) -> None:
    """trtllm-bench flags of the EPLB workflow, so its command lines run unchanged."""
    thr.add_argument("--tp", type=int, default=None, help="trtllm-bench: must equal --ep (attention DP, as here)")
    thr.add_argument("--backend", default=None, help="trtllm-bench: pytorch (the only meaning here)")
    thr.add_argument("--kv_cache_free_gpu_mem_fraction", type=float, default=None,
                     help="trtllm-bench: accepted, no effect (the KV cache is sized by --max_seq_len and the batch)")


def _trtllm_bench_flags(args) -> list[str]:
    """Checks trtllm-bench's flags; returns notes about them."""
    return trtllm_parallel_flags("trtllm-bench", ("--tp", args.tp), ("--ep", args.ep), args.backend,
                                 ("--kv_cache_free_gpu_mem_fraction", args.kv_cache_free_gpu_mem_fraction))


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
    from jax_eplb.serving import ThroughputSettings, check_memory_fits, format_figures, initialize_distributed, \
        read_bench_inputs, run_throughput
    from jax_eplb.sharding import ep_mesh

    for flag, minimum in (("ep", 1), ("max_batch_size", 1), ("warmup", 0), ("emulate_devices", 1),
                          ("max_num_tokens", 1)):
        at_least(getattr(args, flag), minimum, f"--{flag}")
    notes = _trtllm_bench_flags(args)
    if args.grouped_matmul == "tokamax":
        from jax_eplb.moe import require_tokamax

        require_tokamax()
    output_file(args.output_tokens, "--output_tokens")
    output_file(args.report_json, "--report_json")
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    inputs = read_bench_inputs(args.model, args.dataset, args.ep, model_path=args.model_path, seed=args.seed,
                               extra_llm_api_options=args.extra_llm_api_options, max_seq_len=args.max_seq_len,
                               weight_dtype=args.weight_dtype)
    settings = ThroughputSettings(
        max_batch_size=args.max_batch_size, warmup=args.warmup, eos_id=args.eos_id,
        replica_policy=args.replica_policy, transport=args.transport, dispatch=args.dispatch,
        grouped_matmul=args.grouped_matmul, shared_expert_balance=args.shared_expert_balance,
        prefill_chunk=prefill_chunk(args), moe_max_num_tokens=inputs.options.moe_max_num_tokens,
        online_planner=args.online_planner, online_lockstep=args.online_lockstep, traffic=args.report_traffic,
        progress=not args.no_progress and sys.stderr.isatty())
    for note in notes:
        print(f"note: {note}")
    for key in inputs.options.ignored_keys:
        print(f"note: extra option {key!r} has no effect here (ignored)")
    for note in inputs.options.notes:
        print(f"note: {note}")
    for note in getattr(inputs.weights, "notes", ()):
        print(f"note: {note}")
    mesh = ep_mesh(args.ep, args.emulate_devices)
    check_memory_fits(inputs.config, inputs.options, mesh, args.max_batch_size, "bench")
    result = run_throughput(inputs.config, inputs.weights, inputs.requests, mesh, settings,
                            plan=inputs.options.load_balancer, recorder=inputs.recorder,
                            online_state=args.online_state)
    result.write(args.output_tokens, args.report_json)
    print(format_figures(result.figures))
    return 0


def add_prepare_dataset_parser(sub):
    parser = sub.add_parser("prepare-dataset", help="write a trtllm-bench dataset (synthetic ids or real text)")
    parser.add_argument("--output", required=True, help="JSON lines file to write")
    parser.add_argument("--vocab_size", type=int, default=None, help="token id range (default: --model's vocab)")
    parser.add_argument("--model", default="tiny", help="model config whose vocabulary the ids use")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer.json (or a Hugging Face checkpoint directory holding one), for 'text'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic ids")
    dist = parser.add_subparsers(dest="distribution", required=True)
    norm = dist.add_parser("token-norm-dist", help="normally distributed input/output lengths")
    norm.add_argument("--num-requests", "--num_requests", dest="num_requests", type=int, required=True)
    norm.add_argument("--input-mean", "--input_mean", dest="input_mean", type=int, required=True)
    norm.add_argument("--output-mean", "--output_mean", dest="output_mean", type=int, required=True)
    norm.add_argument("--input-stdev", "--input_stdev", dest="input_stdev", type=float, default=0.0,
                      help="input length standard deviation")
    norm.add_argument("--output-stdev", "--output_stdev", dest="output_stdev", type=float, default=0.0,
                      help="output length standard deviation")
    text = dist.add_parser("text", help="one request per non-empty line of a text file, tokenized with --tokenizer")
    text.add_argument("--file", required=True, help="text file, one prompt per line")
    text.add_argument("--output-tokens", "--output_tokens", dest="output_tokens", type=int, required=True)
    parser.set_defaults(handler=run_prepare_dataset)


def run_prepare_dataset(args) -> int:
    from jax_eplb.serving import prepare_dataset, write_text_dataset

    output_file(args.output, "--output")
    at_least(args.vocab_size, 1, "--vocab_size")

    if args.distribution == "text":
        if not args.tokenizer:
            raise EplbInputError("prepare-dataset text needs --tokenizer (a tokenizer.json or a checkpoint directory)")
        path, count = write_text_dataset(args.output, args.file, args.tokenizer, args.output_tokens)
        print(f"wrote {count} requests -> {path}")
        return 0
    from jax_eplb.model import load_model_config

    vocab = args.vocab_size if args.vocab_size is not None else load_model_config(args.model).vocab_size
    path = prepare_dataset(args.output, num_requests=args.num_requests, input_mean=args.input_mean,
                           output_mean=args.output_mean, input_stdev=args.input_stdev,
                           output_stdev=args.output_stdev, vocab_size=vocab, seed=args.seed)
    print(f"wrote {args.num_requests} requests -> {path}")
    return 0
