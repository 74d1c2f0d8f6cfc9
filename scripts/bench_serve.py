#!/usr/bin/env python
"""The server under load next to the benchmark: ``jax-eplb serve`` vs ``jax-eplb bench throughput``.

For each configuration (no EPLB; online EPLB, ``layer_updates_per_iter`` 1) the same requests
(token-norm-dist, greedy, EOS ignored) run, one after the other:

* ``jax-eplb bench ... throughput`` (the same batch size and prefill chunk): its output tokens/s;
* the serving engine alone (``jax_eplb.server.ServingEngine`` in this process, no HTTP): every
  request submitted at once - what the server's engine costs over the benchmark's loop;
* ``jax-eplb serve`` on loopback, loaded twice by an asyncio httpx client in this process:
  "burst": every request sent at once, whole answers (the queue stays full, as the benchmark's
  dataset); "stream": ``--clients`` concurrent streaming clients taking the requests in order
  (each sends its next request when its last one ended). Output tokens/s and requests/s from the
  first request sent to the last token received; time to first token and inter-token latency
  (p50 / p99) as the streaming clients see them; the CPU seconds the client itself used (on a
  machine with few cores it competes with the server).

Every row also gives its mixed (prefill) and decode steps with their mean step time (the
benchmark's report; the engine's and the server's ``jax_eplb_iteration_seconds`` histogram over
that load) and the in-graph imbalance (the benchmark's mean; the engine's and server's ``/eplb``
window after the load). "vs bench" is tokens/s over the benchmark's (the goal: >= 0.90 at the same
batch size); the generated tokens of the engine, the server (both loads) and the benchmark must be
identical. ``--max_waiting_steps 0 --batch_wait_ms 0`` turns the engine's prefill batching off.
``--processes 1 2`` also runs the server across two local processes (loads ``burst/2p``,
``stream/2p``): the cost of handing each iteration's operations over to the other process.

  python scripts/bench_serve.py [--model tiny] [--ep 8] [--requests 256] [--clients 64]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from jax_eplb.cli import HelpWithDefaults  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bench(args, folder: Path, dataset: Path, extra: list[str], label: str) -> tuple[dict, dict, dict]:
    """The benchmark's figures, its tokens and {phase: (steps, mean ms)}."""
    report, tokens = folder / f"bench_{label}.json", folder / f"tokens_{label}.jsonl"
    subprocess.run([sys.executable, "-m", "jax_eplb.cli", "bench", "--model", args.model, "throughput", "--ep",
                    str(args.ep), "--emulate_devices", str(args.ep), "--dataset", str(dataset), "--max_batch_size",
                    str(args.max_batch_size), "--prefill_chunk", str(args.prefill_chunk), "--no_progress",
                    "--report_json", str(report), "--output_tokens", str(tokens), *extra],
                   check=True, stdout=subprocess.DEVNULL)
    ids = {row["task_id"]: row["output_ids"] for row in map(json.loads, tokens.read_text().splitlines())}
    figures = json.loads(report.read_text())
    steps = {phase: [row["step_ms"] for row in figures["per_iteration"] if row["phase"] == phase]
             for phase in ("mixed", "decode")}
    return figures, ids, {phase: (len(ms), float(np.mean(ms)) if ms else float("nan")) for phase, ms in steps.items()}


async def _client(http, url, model, queue, results, stream: bool):
    while queue:
        task_id, prompt, output = queue.pop(0)
        sent, stamps, ids = time.perf_counter(), [], []
        body = {"model": model, "prompt": prompt, "max_tokens": output, "temperature": 0, "stream": stream,
                "ignore_eos": True, "return_token_ids": True}
        if stream:
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        stamps.append(time.perf_counter())
                        ids += json.loads(line[6:])["choices"][0]["token_ids"]
        else:
            response = await http.post(url + "/v1/completions", json=body)
            response.raise_for_status()
            stamps.append(time.perf_counter())
            ids = response.json()["choices"][0]["token_ids"]
        results[task_id] = (sent, stamps, ids)


async def _load(url, model, requests, clients, stream):
    import httpx

    queue, results = list(requests), {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, url, model, queue, results, stream) for _ in range(clients)))
        return time.perf_counter() - start, results


def _step_counts(metrics_text: str) -> dict:
    """{phase: (steps, seconds)} of the server's ``jax_eplb_iteration_seconds`` histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"mixed": [0.0, 0.0], "decode": [0.0, 0.0]}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in ("jax_eplb_iteration_seconds_count", "jax_eplb_iteration_seconds_sum"):
                out[sample.labels["phase"]][sample.name.endswith("_sum")] = sample.value
    return out


def _steps_between(before: dict, after: dict) -> dict:
    """{phase: (steps, mean ms)} of the iterations between two ``_step_counts``."""
    out = {}
    for phase in ("mixed", "decode"):
        steps = after[phase][0] - before[phase][0]
        out[phase] = (int(steps), 1e3 * (after[phase][1] - before[phase][1]) / steps if steps else float("nan"))
    return out


def _figures(wall, results, cpu_s) -> dict:
    ttft = [stamps[0] - sent for sent, stamps, _ in results.values()]
    itl = [b - a for _, stamps, _ in results.values() for a, b in zip(stamps, stamps[1:])]
    tokens = sum(len(ids) for _, _, ids in results.values())
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "ttft_ms": np.percentile(ttft, [50, 99]) * 1e3,
            "itl_ms": np.percentile(itl, [50, 99]) * 1e3 if itl else [np.nan, np.nan],
            "ids": {k: ids for k, (_, _, ids) in results.items()}, "client_cpu_s": cpu_s}


def run_engine(args, requests, online: bool) -> dict:
    """The engine in this process on ``args.ep`` emulated devices: all requests submitted at once."""
    import threading

    from jax_eplb import MoeLoadBalancerConfig
    from jax_eplb.model import SeededWeights, load_model_config
    from jax_eplb.server import ServingEngine
    from jax_eplb.serving import Request, ThroughputSettings
    from jax_eplb.sharding import ep_mesh

    plan = MoeLoadBalancerConfig.from_dict({"num_slots": args.num_slots, "layer_updates_per_iter": 1}) \
        if online else None
    engine = ServingEngine(load_model_config(args.model), SeededWeights(0), ep_mesh(args.ep, args.ep),
                           ThroughputSettings(max_batch_size=args.max_batch_size, progress=False), plan=plan,
                           prefill_chunk=args.prefill_chunk, max_queue=len(requests),
                           max_waiting_steps=args.max_waiting_steps, batch_wait_ms=args.batch_wait_ms,
                           log=lambda _: None).start()
    results, done, lock = {}, threading.Event(), threading.Lock()

    def listener(task_id):
        def listen(token, reason):
            with lock:
                sent, stamps, ids = results[task_id]
                stamps.append(time.perf_counter())
                ids.append(token)
                if reason is not None and sum(len(r[2]) for r in results.values()) == total:
                    done.set()
        return listen

    from prometheus_client import generate_latest

    total = sum(output for _, _, output in requests)
    before = _step_counts(generate_latest(engine.monitor.registry).decode())
    start = time.perf_counter()
    for task_id, prompt, output in requests:
        results[task_id] = (time.perf_counter(), [], [])
        engine.submit(Request(task_id, tuple(prompt), output), listener(task_id))
    done.wait()
    wall = time.perf_counter() - start
    steps = _steps_between(before, _step_counts(generate_latest(engine.monitor.registry).decode()))
    imbalance = engine.monitor.snapshot()["imbalance"]["mean"]
    engine.stop(0)
    return {**_figures(wall, results, float("nan")), "steps": steps, "imbalance": imbalance}


def run_server(args, folder: Path, requests, extra: list[str], processes: int = 1) -> tuple[dict, int]:
    """{load: figures} for the burst and the streaming load (steps and imbalance from the server's
    /metrics and /eplb), the server's exit code. ``processes`` > 1: one server across that many local
    processes (jax.distributed over loopback, ``--ep / processes`` emulated devices each; process 0
    answers HTTP), which is what the per-iteration hand-over to the other processes costs."""
    import httpx

    port, coordinator = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / f"serve_{port}.log"
    log = open(log_path, "w")
    command = [sys.executable, "-m", "jax_eplb.cli", "serve", args.model, "--ep_size", str(args.ep),
               "--emulate_devices", str(args.ep // processes), "--max_batch_size", str(args.max_batch_size),
               "--prefill_chunk", str(args.prefill_chunk), "--port", str(port),
               "--max_queue_size", str(len(requests)), "--max_waiting_steps",
               str(args.max_waiting_steps), "--batch_wait_ms", str(args.batch_wait_ms), *extra]
    if processes > 1:
        command += ["--coordinator_address", f"127.0.0.1:{coordinator}", "--num_processes", str(processes)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # devices from --emulate_devices
    followers = [subprocess.Popen(command + ["--process_id", str(i)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=env) for i in range(1, processes)]
    server = subprocess.Popen(command + (["--process_id", "0"] if processes > 1 else []), stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    loads = {}
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        for load, clients, stream in (("burst", len(requests), False), ("stream", args.clients, True)):
            cpu, before = time.process_time(), _step_counts(httpx.get(url + "/metrics").text)
            wall, results = asyncio.run(_load(url, model, requests, clients, stream))
            loads[load] = {**_figures(wall, results, time.process_time() - cpu),
                           "steps": _steps_between(before, _step_counts(httpx.get(url + "/metrics").text)),
                           "imbalance": httpx.get(url + "/eplb").json()["imbalance"]["mean"]}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        for follower in followers:
            follower.wait(timeout=120)
        log.close()
    return loads, server.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--num_slots", type=int, default=80, help="slots of the online configuration")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input_mean", type=int, default=32)
    parser.add_argument("--output_mean", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=64)
    parser.add_argument("--prefill_chunk", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--max_waiting_steps", type=int, default=8, help="the engine's prefill batching (serve's flag)")
    parser.add_argument("--batch_wait_ms", type=float, default=5.0, help="the engine's idle wait (serve's flag)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1],
                        help="the server also across this many local processes (e.g. 1 2: the hand-over's cost)")
    args = parser.parse_args()
    if any(n < 1 or args.ep % n for n in args.processes):
        parser.error(f"--processes must divide --ep {args.ep}")
    from jax_eplb.model import load_model_config
    from jax_eplb.serving import load_dataset, prepare_dataset

    os.environ.pop("EXPERT_STATISTIC_ITER_RANGE", None)
    config = load_model_config(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        dataset = prepare_dataset(folder / "dataset.json", num_requests=args.requests, input_mean=args.input_mean,
                                  output_mean=args.output_mean, input_stdev=0, output_stdev=0,
                                  vocab_size=config.vocab_size, seed=0)
        requests = [(r.task_id, list(r.input_ids), r.output_tokens)
                    for r in load_dataset(dataset, config.vocab_size, config.max_seq_len)]
        (folder / "online.yaml").write_text(f"moe_load_balancer:\n  num_slots: {args.num_slots}\n"
                                            f"  layer_updates_per_iter: 1\n")
        print(f"{args.model} on {args.ep} CPU-emulated ranks, batch {args.max_batch_size}, prefill chunk "
              f"{args.prefill_chunk}; {args.requests} requests (in {args.input_mean} / out {args.output_mean}), "
              f"{args.clients} streaming clients; --max_waiting_steps {args.max_waiting_steps} --batch_wait_ms "
              f"{args.batch_wait_ms}", flush=True)
        header = (f"{'configuration':<21} {'load':>9} {'tok/s':>7} {'vs bench':>8} {'req/s':>6} "
                  f"{'TTFT p50/p99 ms':>15} {'ITL p50/p99 ms':>14} {'mixed steps/ms':>14} {'decode steps/ms':>15} "
                  f"{'client CPU s':>12} {'imbalance':>9} {'same tokens':>11}")
        print(header, flush=True)
        rows = []

        def row(label, load, tokens_per_s, ratio, f, steps, imbalance, same):
            ttft = f"{f['ttft_ms'][0]:>6.0f} / {f['ttft_ms'][1]:>6.0f}" if f else f"{'':>15}"
            itl = f"{f['itl_ms'][0]:>5.1f} / {f['itl_ms'][1]:>6.1f}" if f else f"{'':>14}"
            req = f"{f['requests_per_s']:>6.2f}" if f else f"{'':>6}"
            cpu = f"{f['client_cpu_s']:>12.2f}" if f and not np.isnan(f["client_cpu_s"]) else f"{'':>12}"
            rows.append(f"{label:<21} {load:>9} {tokens_per_s:>7.1f} {ratio:>7.2f}x {req} {ttft} {itl} "
                        f"{steps['mixed'][0]:>5} / {steps['mixed'][1]:>6.1f} "
                        f"{steps['decode'][0]:>6} / {steps['decode'][1]:>6.1f} {cpu} {imbalance:>9.4f} "
                        f"{same:>11}")
            print(rows[-1], flush=True)

        for label, extra in (("no EPLB", []), (f"online k=1, {args.num_slots} slots",
                                               ["--extra_llm_api_options", str(folder / "online.yaml")])):
            bench, bench_ids, bench_steps = run_bench(args, folder, dataset, extra, label.split()[0])
            base = bench["output_tokens_per_s"]
            row(label, "bench", base, 1.0, None, bench_steps, bench["mean_imbalance"], "")
            loads = {"engine": run_engine(args, requests, online=bool(extra))}
            codes = []
            for processes in args.processes:
                served, code = run_server(args, folder, requests, extra, processes)
                suffix = "" if processes == 1 else f"/{processes}p"
                loads.update({load + suffix: figures for load, figures in served.items()})
                codes.append(code)
            code = max(codes, key=abs)
            for load, served in loads.items():
                same = all(served["ids"][task] == ids for task, ids in bench_ids.items())
                row(label, load, served["tokens_per_s"], served["tokens_per_s"] / base, served, served["steps"],
                    served["imbalance"], str(same))
            if code != 0:
                print(f"warning: the server exited with {code} after SIGTERM")
        print("\n" + header)
        print("\n".join(rows))


if __name__ == "__main__":
    main()
