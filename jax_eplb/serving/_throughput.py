"""``jax-eplb bench ... throughput``: greedy generation over a dataset on an ``ep`` mesh.

In-flight batching over ``max_batch_size`` rows (rounded up to a multiple of ``ep``; attention
is data-parallel, so each rank's rows are its local tokens): whenever rows are free and requests
wait, a mixed iteration admits requests in dataset order (their prompts, right-padded to the
dataset's longest, prefill in the same step in which the active rows decode one token, as
TensorRT-LLM's scheduler does); otherwise a decode iteration advances every active row. With
chunked prefill (``prefill_chunk``) a prompt prefills at most that many tokens per iteration,
over as many mixed iterations as it needs (steps are ``[batch, chunk]``: one compile for any
prompt length, and a bounded number of MoE tokens per step). A
request leaves after its ``output_tokens`` (or ``eos_id``). Every step is one *iteration* (the
statistics' iteration index); "prefill" step times are those of the mixed iterations.

Per-rank load is measured in-graph every iteration (entries each rank's experts computed, per
MoE layer); its imbalance (max/mean - 1), averaged over iterations and layers, is reported.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np

from jax_eplb._assignment import build_assignment_tables, check_slot_geometry
from jax_eplb._atomic import atomic_write_text
from jax_eplb._errors import EplbInputError
from jax_eplb._metrics import load_metrics
from jax_eplb.model import (MoEOptions, MoETransformer, ModelConfig, init_weights, load_model_config,
                            restore_checkpoint)
from jax_eplb.serving._dataset import Request, load_dataset
from jax_eplb.serving._devices import ep_mesh, to_host
from jax_eplb.serving._options import load_extra_options
from jax_eplb.serving._recorder import StatisticsRecorder


@dataclasses.dataclass(frozen=True)
class ThroughputSettings:
    model: str  # model config YAML
    dataset: str
    ep: int
    model_path: str | None = None  # orbax checkpoint; None: seeded random weights
    extra_llm_api_options: str | None = None
    warmup: int = 0  # requests run first, untimed and not in the figures
    eos_id: int = -1  # < 0: ignore EOS, always generate output_tokens
    max_batch_size: int = 256
    emulate_devices: int | None = None
    replica_policy: str = "round_robin"
    transport: str = "all_to_all"
    grouped_matmul: str = "auto"  # ragged_dot | padded | pallas (GPU) | auto (padded on CPU, ragged_dot on GPU)
    prefill_chunk: int | None = None  # chunked prefill: prompt tokens per row and iteration (None: whole prompts)
    seed: int = 0
    online_planner: str = "migration_aware"  # or "trtllm": TensorRT-LLM's greedy, re-planned from scratch
    online_state: str | None = None  # online: restore statistics + plan from here if present; save at exit
    output_tokens: str | None = None
    report_json: str | None = None
    progress: bool = True


@dataclasses.dataclass
class ThroughputResult:
    figures: dict
    tokens: dict  # task_id -> generated ids
    statistics_path: str | None
    slot_to_expert: np.ndarray  # [Lm, S] placement at the end
    per_iteration: list  # one dict per timed iteration: phase, imbalance, balancer work


class _Prepared(NamedTuple):
    config: ModelConfig
    requests: list
    options: object
    slot_to_expert: np.ndarray
    balanced: bool
    batch: int

    @property
    def layer_updates_per_iter(self) -> int:
        balancer = self.options.load_balancer
        return balancer.layer_updates_per_iter if balancer is not None else 0


def _prepare(s: ThroughputSettings, environ) -> tuple[_Prepared, StatisticsRecorder | None]:
    """Reads and checks every input before any device work."""
    config = load_model_config(s.model)
    requests = load_dataset(s.dataset, config.vocab_size, config.max_seq_len)
    options = load_extra_options(s.extra_llm_api_options)
    if s.max_batch_size < 1:
        raise EplbInputError(f"--max_batch_size must be >= 1, got {s.max_batch_size}")
    if s.prefill_chunk is not None and s.prefill_chunk < 1:
        raise EplbInputError(f"--prefill_chunk must be >= 1, got {s.prefill_chunk}")
    if not 0 <= s.warmup < len(requests):
        raise EplbInputError(f"--warmup must be in [0, {len(requests)}) (requests in the dataset), got {s.warmup}")
    if s.online_planner not in ("migration_aware", "trtllm"):
        raise EplbInputError(f"online planner must be 'migration_aware' or 'trtllm', got {s.online_planner!r}")
    if s.model_path is not None and not Path(s.model_path).is_dir():
        raise EplbInputError(f"--model_path {s.model_path} does not exist")
    balancer = options.load_balancer
    balanced = balancer is not None
    if s.online_state and not (balanced and balancer.layer_updates_per_iter > 0):
        raise EplbInputError("--online_state needs an online moe_load_balancer (layer_updates_per_iter > 0)")
    if balanced:
        slot_to_expert = balancer.slot_to_expert(config.moe_layer_ids, config.num_experts, s.ep)
    else:
        check_slot_geometry(config.num_experts, config.num_experts, s.ep)
        slot_to_expert = np.tile(np.arange(config.num_experts, dtype=np.int32), (config.num_moe_layers, 1))
    batch = -(-min(s.max_batch_size, len(requests)) // s.ep) * s.ep
    recorder = StatisticsRecorder.from_environment(config.moe_layer_ids, config.top_k, environ)
    return _Prepared(config, requests, options, slot_to_expert, balanced, batch), recorder


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_throughput(s: ThroughputSettings, environ=None, log: Callable[[str], None] = print,
                   before_iteration: Callable | None = None) -> ThroughputResult:
    """Runs the benchmark. ``before_iteration(iteration, model)``, if given, is called before
    every step (benchmarks use it to change the workload mid-run)."""
    import os

    prep, recorder = _prepare(s, os.environ if environ is None else environ)
    config, requests = prep.config, prep.requests
    mesh = ep_mesh(s.ep, s.emulate_devices)
    if s.transport == "ragged" and mesh.devices.flat[0].platform == "cpu":
        raise EplbInputError("--transport ragged needs GPUs (XLA:CPU has no ragged_all_to_all); use all_to_all")
    if s.grouped_matmul == "pallas" and mesh.devices.flat[0].platform != "gpu":
        raise EplbInputError("--grouped_matmul pallas needs GPUs (compiled Pallas); use padded or ragged_dot")
    online = prep.layer_updates_per_iter > 0
    record = () if recorder is None else (("slot",) if prep.balanced else ("expert",))
    if online:
        record = tuple(sorted(set(record) | {"expert_total"}))
    moe_options = MoEOptions(replica_policy=s.replica_policy, moe_max_num_tokens=prep.options.moe_max_num_tokens,
                             record=record, transport=s.transport, grouped_matmul=s.grouped_matmul)
    for key in prep.options.ignored_keys:
        log(f"note: extra option {key!r} has no effect here (ignored)")

    start = time.perf_counter()
    if s.model_path:
        weights = restore_checkpoint(s.model_path, config, mesh, prep.slot_to_expert)
    else:
        weights = init_weights(config, s.seed, mesh, prep.slot_to_expert)
    tables = build_assignment_tables(prep.slot_to_expert, config.num_experts)
    model = MoETransformer(config, mesh, weights, tables, moe_options)
    balancer = None
    if online:
        from jax_eplb.model import init_weights as logical_init, restore_logical_experts
        from jax_eplb.online import OnlineBalancer

        master = (restore_logical_experts(s.model_path, config) if s.model_path
                  else jax.tree.map(np.asarray, logical_init(config, s.seed, mesh=None).moe.experts))
        trtllm = s.online_planner == "trtllm"
        balancer = OnlineBalancer(model, master, prep.layer_updates_per_iter,
                                  algorithm="trtllm" if trtllm else "balanced", migration_aware=not trtllm)
        if s.online_state and Path(s.online_state).exists():
            balancer.restore_state(s.online_state)
            log(f"online balancer state (statistics + placement) restored from {s.online_state}")
    prefill_len = max(len(r.input_ids) for r in requests)
    if s.prefill_chunk:
        prefill_len = min(prefill_len, s.prefill_chunk)
    model.compile(prep.batch, prefill_len)
    log(f"model {config.name}: {config.num_moe_layers} MoE layers, {config.num_experts} experts -> "
        f"{model.num_slots} slots on ep={s.ep} ({mesh.devices.flat[0].platform}); batch {prep.batch}, "
        f"prefill {prefill_len}; weights + compile {time.perf_counter() - start:.1f} s")

    iteration = 0
    warm, timed = requests[:s.warmup], requests[s.warmup:]
    tokens: dict = {}
    stats = {"prefill_s": [], "decode_s": [], "rank_load": []}  # rank_load: [Lm, R] per iteration
    per_iteration = []
    timed_start = None  # first timed iteration (the online schedule starts there: warm-up excluded)

    def serve(queue: list[Request], collect: bool, progress: _Progress) -> dict:
        """In-flight batching over ``prep.batch`` rows; returns {task_id: generated ids}."""
        nonlocal iteration
        b = prep.batch
        queue = list(queue)
        owner: list[Request | None] = [None] * b  # the request each row serves
        prefilled = np.zeros(b, np.int64)  # prompt tokens of the row's request already in its cache
        generated: list[list[int]] = [[] for _ in range(b)]
        positions = np.zeros(b, np.int32)
        next_token = np.zeros(b, np.int32)
        done: dict = {}
        cache = model.new_cache(b)
        while queue or any(o is not None for o in owner):
            for i in [i for i in range(b) if owner[i] is None][:len(queue)]:  # admit into free rows
                owner[i], generated[i], prefilled[i] = queue.pop(0), [], 0
            if recorder is not None:
                recorder.begin_iteration(iteration)
            if before_iteration is not None:
                before_iteration(iteration, model)
            t0 = time.perf_counter()
            update = None
            if balancer is not None and collect:
                update = balancer.before_step(iteration - timed_start)
            prompt_len = np.array([len(o.input_ids) if o is not None else 0 for o in owner])
            decoding = np.array([o is not None for o in owner]) & (prefilled >= prompt_len)
            admit = np.flatnonzero(prefilled < prompt_len)  # rows prefilling (a chunk of) their prompt
            chunk = np.minimum(prompt_len - prefilled, prefill_len)  # [B] tokens each prefills now
            if admit.size:  # a mixed iteration: prompts (chunks) prefill while the active rows decode
                prompt = np.zeros((b, prefill_len), np.int32)
                lengths = np.zeros(b, np.int32)
                for i in admit:
                    prompt[i, :chunk[i]] = owner[i].input_ids[prefilled[i]:prefilled[i] + chunk[i]]
                    lengths[i] = chunk[i]
                out = model.mixed(prompt, lengths, next_token, positions, decoding, cache,
                                  starts=np.where(lengths > 0, prefilled, 0))
            else:  # a decode-only iteration
                out = model.decode(next_token, positions, decoding, cache)
            finishing = admit[prefilled[admit] + chunk[admit] >= prompt_len[admit]]  # prompts complete now
            prefilled[admit] += chunk[admit]
            stepping = decoding.copy()  # rows that produce a token in this iteration
            stepping[finishing] = True
            fresh = to_host(out.next_token)
            rank_load = to_host(out.rank_load)
            elapsed = time.perf_counter() - t0
            cache = out.cache
            if recorder is not None and recorder.wants(iteration):
                recorder.add(iteration, to_host(out.slot_counts if prep.balanced else out.expert_counts))
            if balancer is not None and collect:
                balancer.observe(out.expert_totals)
            if collect:
                stats["prefill_s" if admit.size else "decode_s"].append(elapsed)
                stats["rank_load"].append(rank_load)
                row = {"iteration": iteration, "phase": "mixed" if admit.size else "decode",
                       "rows": int(stepping.sum()),
                       "imbalance": float(load_metrics(rank_load[None]).imbalance.mean()),
                       "step_ms": 1e3 * elapsed}
                if update is not None:
                    row.update(slots_moved=update.slots_moved, slots_from_devices=update.slots_from_devices,
                               bytes_moved=update.bytes_moved,
                               plan_ms=1e3 * update.plan_seconds, apply_ms=1e3 * update.apply_seconds,
                               layers_applied=list(update.layers_applied))
                per_iteration.append(row)
            positions = positions + decoding  # decoded rows wrote one more position
            for i in finishing:
                positions[i] = len(owner[i].input_ids)  # prefilled rows: the next token goes here
            for i in np.flatnonzero(stepping):
                next_token[i] = fresh[i]
                generated[i].append(int(fresh[i]))
                if len(generated[i]) >= owner[i].output_tokens or (s.eos_id >= 0 and fresh[i] == s.eos_id):
                    done[owner[i].task_id] = generated[i]
                    owner[i] = None
            progress.update(int(stepping.sum()))
            iteration += 1
        return done

    try:
        if warm:
            serve(warm, False, _Progress(0, False, ""))
        progress = _Progress(sum(r.output_tokens for r in timed), s.progress, "generating")
        timed_start = iteration
        t_start = time.perf_counter()
        finished = serve(timed, True, progress)
        tokens = {r.task_id: finished[r.task_id] for r in timed}  # dataset order
        wall = time.perf_counter() - t_start
        progress.close()
        if balancer is not None:
            balancer.finish()
            if s.online_state:
                balancer.save_state(s.online_state)  # replaces the older state once complete
                log(f"online balancer state saved to {s.online_state}")
    finally:
        statistics_path = recorder.flush() if recorder is not None else None
        if recorder is not None and recorder.written:
            log(f"expert statistics of iterations {recorder.iterations[0]}-{recorder.iterations[-1]} -> "
                f"{recorder.path}")
        elif recorder is not None:
            log(f"warning: no iteration fell in [{recorder.start}, {recorder.stop}); no statistics written")

    output_tokens = sum(len(v) for v in tokens.values())
    per_layer = load_metrics(np.stack(stats["rank_load"])).imbalance  # [Lm], averaged over iterations
    figures = {
        "model": config.name, "ep": s.ep, "num_slots": model.num_slots, "platform": mesh.devices.flat[0].platform,
        "load_balancer": "static plan" if prep.balanced else "none", "replica_policy": s.replica_policy,
        "requests": len(timed), "output_tokens": output_tokens, "iterations": len(stats["rank_load"]),
        "wall_s": wall, "output_tokens_per_s": output_tokens / wall if wall else float("nan"),
        "requests_per_s": len(timed) / wall if wall else float("nan"),
        "mean_prefill_step_ms": 1e3 * float(np.mean(stats["prefill_s"])) if stats["prefill_s"] else None,
        "mean_decode_step_ms": 1e3 * float(np.mean(stats["decode_s"])) if stats["decode_s"] else None,
        "mean_step_ms": 1e3 * float(np.mean(stats["prefill_s"] + stats["decode_s"])),
        "mean_imbalance": float(per_layer.mean()),
        "mean_imbalance_per_layer": {int(l): float(v) for l, v in zip(config.moe_layer_ids, per_layer)},
    }
    if balancer is not None:
        updates = [r for r in balancer.reports if r.layers_applied]
        figures.update(
            load_balancer=f"online, k={prep.layer_updates_per_iter}, {s.online_planner}",
            layer_updates=sum(len(r.layers_applied) for r in updates),
            slots_moved=sum(r.slots_moved for r in updates), bytes_moved=sum(r.bytes_moved for r in updates),
            slots_from_devices=sum(r.slots_from_devices for r in updates),
            mean_plan_ms_per_update=1e3 * float(np.mean([r.plan_seconds for r in updates])) if updates else 0.0,
            mean_apply_ms_per_iteration=1e3 * float(np.mean([r.apply_seconds for r in balancer.reports])))
    writes = jax.process_index() == 0  # multi-host: every process holds all results; one writes them
    if s.output_tokens and writes:
        atomic_write_text(Path(s.output_tokens), "".join(
            json.dumps({"task_id": k, "output_ids": v}) + "\n" for k, v in tokens.items()))
    if s.report_json and writes:
        atomic_write_text(Path(s.report_json), json.dumps({**figures, "per_iteration": per_iteration}, indent=2) + "\n")
    final_placement = balancer.slot_to_expert if balancer is not None else prep.slot_to_expert
    return ThroughputResult(figures, tokens, str(statistics_path) if statistics_path else None, final_placement,
                            per_iteration)


def format_figures(figures: dict) -> str:
    rows = [("requests", f"{figures['requests']}"), ("output tokens", f"{figures['output_tokens']}"),
            ("iterations", f"{figures['iterations']}"),
            ("throughput (output tok/s)", f"{figures['output_tokens_per_s']:.1f}"),
            ("throughput (requests/s)", f"{figures['requests_per_s']:.2f}"),
            ("mean step (ms)", f"{figures['mean_step_ms']:.2f}"),
            ("mean prefill (mixed) step (ms)", f"{figures['mean_prefill_step_ms'] or float('nan'):.2f}"),
            ("mean decode step (ms)", f"{figures['mean_decode_step_ms'] or float('nan'):.2f}"),
            ("avg per-rank imbalance (in-graph)", f"{figures['mean_imbalance']:.4f}")]
    if "slots_moved" in figures:
        rows += [("layer updates", f"{figures['layer_updates']}"),
                 ("slots moved (total)", f"{figures['slots_moved']}"),
                 ("  of which copied on device (not from host)", f"{figures['slots_from_devices']}"),
                 ("bytes moved (total)", f"{figures['bytes_moved'] / 2**20:.1f} MiB"),
                 ("planner ms per layer update (host thread)", f"{figures['mean_plan_ms_per_update']:.2f}"),
                 ("rebalance ms per iteration (in step loop)", f"{figures['mean_apply_ms_per_iteration']:.2f}")]
    title = (f"=== {figures['model']} ep={figures['ep']} slots={figures['num_slots']} "
             f"({figures['load_balancer']}, {figures['replica_policy']}, {figures['platform']}) ===")
    width = max(len(k) for k, _ in rows)
    return "\n".join([title] + [f"{k:<{width}}  {v}" for k, v in rows])
