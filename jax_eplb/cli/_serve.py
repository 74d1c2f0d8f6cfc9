"""``serve`` (trtllm-serve): an OpenAI-compatible server with online EPLB, metrics and a live page."""

from __future__ import annotations

from pathlib import Path

from jax_eplb._errors import EplbInputError
from jax_eplb.cli._bench import add_moe_options, add_weight_dtype_option
from jax_eplb.cli._checks import at_least, require_serve_extra, trtllm_parallel_flags


def add_serve_parser(sub):
    parser = sub.add_parser("serve", help="serve a model over HTTP: OpenAI API, /metrics, /eplb (mirrors trtllm-serve)")
    parser.add_argument("model", help="model config YAML or shipped name (tiny, deepseek_v3_slice); with a Hugging "
                                      "Face --model_path only the served name (e.g. deepseek-ai/DeepSeek-R1)")
    parser.add_argument("--model_path", default=None,
                        help="Hugging Face checkpoint directory (config.json + safetensors; tokenizer.json for text, "
                             "tokenizer_config.json's chat_template for chat) or an orbax checkpoint from "
                             "create-checkpoint (default: seeded random weights)")
    parser.add_argument("--served_model_name", default=None,
                        help="the model name requests give (default: MODEL with a Hugging Face --model_path, else "
                             "the model config's name)")
    parser.add_argument("--seed", type=int, default=0, help="random-weight seed when no --model_path")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--ep_size", type=int, required=True, help="expert-parallel ranks")
    parser.add_argument("--tp_size", type=int, default=None, help="trtllm-serve: must equal --ep_size (attention "
                                                                  "data-parallel, as here)")
    parser.add_argument("--backend", default=None, help="trtllm-serve: pytorch (the only meaning here)")
    parser.add_argument("--max_batch_size", type=int, default=64, help="requests decoded together (batch rows)")
    parser.add_argument("--max_num_tokens", type=int, default=None,
                        help="trtllm-serve's token budget per iteration: sets the prefill chunk to "
                             "max_num_tokens / batch rows (default: --prefill_chunk)")
    parser.add_argument("--prefill_chunk", type=int, default=32,
                        help="prompt tokens a request prefills per iteration (chunked prefill)")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="KV-cache length per request: prompt + generated tokens (default: the model config's; "
                             "Hugging Face models: 2048, at most max_position_embeddings)")
    parser.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=None,
                        help="trtllm-serve: accepted, no effect (the KV cache is --max_seq_len x batch rows)")
    parser.add_argument("--extra_llm_api_options", default=None,
                        help="YAML with moe_max_num_tokens and moe_load_balancer (a static plan, or online with "
                             "layer_updates_per_iter > 0)")
    parser.add_argument("--emulate_devices", type=int, default=None,
                        help="run on N CPU-emulated devices (when the machine has fewer than --ep_size)")
    add_moe_options(parser)
    add_weight_dtype_option(parser)
    parser.add_argument("--eos_id", type=int, default=None,
                        help="end-of-sequence token (default: the checkpoint's eos_token_id; -1: none)")
    parser.add_argument("--max_waiting_steps", type=int, default=8,
                        help="while rows decode, a new request joins the batch at the latest after this many "
                             "iterations, sooner when the waiting requests fill the free rows: a prefill step "
                             "costs the whole batch x chunk however few rows prefill (0: join at once)")
    parser.add_argument("--batch_wait_ms", type=float, default=5.0,
                        help="an idle server starts once no request arrived for this long (at most 10x), so a "
                             "burst prefills together")
    parser.add_argument("--max_queue_size", type=int, default=256,
                        help="requests waiting for a batch row; more get HTTP 503 with Retry-After")
    parser.add_argument("--grace_period", type=float, default=30.0,
                        help="seconds in-flight requests may finish after SIGTERM/SIGINT before they are aborted")
    parser.add_argument("--online_state_interval", type=float, default=None,
                        help="with --online_state: also save it every this many seconds (atomically; default: at "
                             "the graceful exit only)")
    parser.add_argument("--coordinator_address", default=None,
                        help="multi-host: jax.distributed coordinator host:port (Slurm and Open MPI launches are "
                             "detected without it); process 0 serves HTTP, the others follow it in lockstep")
    parser.add_argument("--num_processes", type=int, default=None, help="multi-host: processes in all")
    parser.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    parser.add_argument("--process_timeout", type=float, default=10.0,
                        help="multi-host: a process whose heartbeat stops this long is lost (process 0 then fails "
                             "the requests in flight and exits non-zero; a lost process 0 ends the others)")
    parser.add_argument("--log_level", default=None, help="trtllm-serve: accepted, no effect")
    parser.set_defaults(handler=run_serve)


def _trtllm_serve_flags(args) -> list[str]:
    """Checks trtllm-serve's flags; returns notes about them."""
    notes = trtllm_parallel_flags("trtllm-serve", ("--tp_size", args.tp_size), ("--ep_size", args.ep_size),
                                  args.backend,
                                  ("--kv_cache_free_gpu_memory_fraction", args.kv_cache_free_gpu_memory_fraction))
    return notes + (["--log_level has no effect"] if args.log_level is not None else [])


def run_serve(args) -> int:
    require_serve_extra()
    for flag, minimum in (("ep_size", 1), ("max_batch_size", 1), ("emulate_devices", 1), ("max_num_tokens", 1),
                          ("prefill_chunk", 1), ("max_queue_size", 1), ("port", 0), ("max_waiting_steps", 0),
                          ("batch_wait_ms", 0)):
        at_least(getattr(args, flag), minimum, f"--{flag}")
    if args.port > 65535:
        raise EplbInputError(f"--port must be <= 65535, got {args.port}")
    if args.grace_period < 0:
        raise EplbInputError(f"--grace_period must be >= 0, got {args.grace_period}")
    if args.online_state_interval is not None and (args.online_state is None or args.online_state_interval <= 0):
        raise EplbInputError("--online_state_interval needs --online_state and a positive number of seconds")
    if not 2 <= args.process_timeout <= 60:
        raise EplbInputError(f"--process_timeout must be in [2, 60] seconds (JAX's own heartbeat timeout is 100 s), "
                             f"got {args.process_timeout}")
    notes = _trtllm_serve_flags(args)
    if args.grouped_matmul == "tokamax":
        from jax_eplb.moe import require_tokamax

        require_tokamax()
    import jax_eplb
    from jax_eplb.server import TextCodec, check_port, create_app, deliver_on_loops, run_server
    from jax_eplb.serving import (ThroughputSettings, check_memory_fits, initialize_distributed, process_index_early,
                                  read_serve_inputs)

    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    index = process_index_early()
    lead = index == 0
    log = _log if lead else _follower_log(index)
    if lead:  # process 0 alone binds the port
        check_port(args.host, args.port)
    inputs = read_serve_inputs(args.model, args.ep_size, model_path=args.model_path, seed=args.seed,
                               extra_llm_api_options=args.extra_llm_api_options, max_seq_len=args.max_seq_len,
                               weight_dtype=args.weight_dtype)
    codec = TextCodec.from_directory(args.model_path) if args.model_path and lead else None  # process 0 tokenizes
    eos = inputs.eos_ids | ({codec.eos_id} if codec is not None and codec.eos_id is not None else set())
    eos = frozenset() if args.eos_id == -1 else frozenset({args.eos_id}) if args.eos_id is not None else eos
    settings = ThroughputSettings(
        max_batch_size=args.max_batch_size, replica_policy=args.replica_policy, transport=args.transport,
        dispatch=args.dispatch, grouped_matmul=args.grouped_matmul, shared_expert_balance=args.shared_expert_balance,
        moe_max_num_tokens=inputs.options.moe_max_num_tokens, online_planner=args.online_planner, progress=False)
    chunk = max(1, args.max_num_tokens // args.max_batch_size) if args.max_num_tokens else args.prefill_chunk
    for note in notes + [f"extra option {k!r} has no effect here (ignored)" for k in inputs.options.ignored_keys] \
            + list(inputs.options.notes) + list(getattr(inputs.weights, "notes", ())):
        if lead:
            print(f"note: {note}")
    from jax_eplb.server import ServingEngine
    from jax_eplb.sharding import ep_mesh

    mesh = ep_mesh(args.ep_size, args.emulate_devices)
    check_memory_fits(inputs.config, inputs.options, mesh, args.max_batch_size, "serve")
    engine = ServingEngine(inputs.config, inputs.weights, mesh, settings, plan=inputs.options.load_balancer,
                           recorder=inputs.recorder, online_state=args.online_state, prefill_chunk=chunk,
                           max_queue=args.max_queue_size, eos_ids=eos, max_waiting_steps=args.max_waiting_steps,
                           batch_wait_ms=args.batch_wait_ms, deliver=deliver_on_loops, log=log,
                           online_state_interval=args.online_state_interval, process_timeout_s=args.process_timeout)
    if not lead:
        return _follow(engine, log)
    engine.start()
    hugging_face = args.model_path is not None and (Path(args.model_path) / "config.json").is_file()
    name = args.served_model_name or (args.model if hugging_face else inputs.config.name)
    app = create_app(engine, name, codec, jax_eplb.__version__)
    run_server(app, engine, args.host, args.port, args.grace_period, log=_log)
    return 0


def _log(line: str) -> None:
    print(line, flush=True)


def _follower_log(index: int):
    def log(line: str) -> None:
        print(f"[process {index}] {line}", flush=True)
    return log


def _follow(engine, log) -> int:
    """A process other than process 0: the same iterations as process 0 until it stops. Signals do not
    stop it (process 0 decides, and Slurm signals every task); a lost process 0 ends it in one line."""
    import os
    import signal

    from jax_eplb.server import ProcessLost

    def hold(signum, _frame):
        log(f"{signal.Signals(signum).name}: process 0 decides when to stop; following it (its heartbeat bounds the "
            f"wait)")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, hold)
    log("following process 0")
    try:
        engine.follow()
    except ProcessLost as lost:
        print(f"error: {lost}; exiting", flush=True)
        os._exit(1)  # no orderly jax.distributed shutdown: the coordinator is gone
    log("stopped")
    return 0
