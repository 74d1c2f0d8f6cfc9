"""``bench ... throughput`` as a library: greedy generation over requests on an ``ep`` mesh.

``run_throughput`` takes objects (model config and weight source, requests, mesh, plan, an
optional statistics recorder); the command line reads files and environment variables into
those objects (``serving._inputs``). Rows are served by in-flight batching (``_batcher``) over
``max_batch_size`` rows (rounded up to a multiple of ep; attention is data-parallel, so each
rank's rows are its local tokens); every step is one *iteration* (the statistics' iteration
index). With an online plan (``layer_updates_per_iter > 0``) an ``OnlineBalancer`` re-places
layers between iterations.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from jax_eplb._assignment import (UNUSED_SLOT, AssignmentTables, build_assignment_tables, default_slot_to_expert,
                                  widest_replicas)
from jax_eplb._atomic import atomic_write_text
from jax_eplb._errors import EplbInputError
from jax_eplb._plan_config import MoeLoadBalancerConfig
from jax_eplb.model import ModelConfig, ModelRunner, WeightSource, build_model
from jax_eplb.moe import (DISPATCH_MODES, GROUPED_MATMULS, POLICIES, SHARED_BALANCE, TRANSPORTS, MoEOptions,
                          require_tokamax, shared_balance_on)
from jax_eplb.serving._batcher import InFlightBatcher
from jax_eplb.serving._dataset import Request
from jax_eplb.serving._devices import to_host
from jax_eplb.serving._figures import ThroughputFigures, TrafficFigures, online_summary
from jax_eplb.serving._recorder import StatisticsRecorder
from jax_eplb.sharding import num_ranks, platform, require_gpu

ONLINE_PLANNERS = ("migration_aware", "flow", "trtllm")


@dataclasses.dataclass(frozen=True)
class ThroughputSettings:
    """How to serve (no files here: see ``run_throughput``'s arguments)."""

    max_batch_size: int = 256
    warmup: int = 0  # requests run first, untimed and not in the figures
    eos_id: int = -1  # < 0: ignore EOS, always generate output_tokens
    replica_policy: str = "round_robin"
    # shared experts' rows in the load-aware split: auto (on under load_aware), on, off
    shared_expert_balance: str = "auto"
    transport: str = "auto"  # all_to_all | ragged (GPU) | auto (the faster correct one on a GPU, else all_to_all)
    dispatch: str = "token"  # token (once per destination rank) | entry (every (token, k) entry)
    grouped_matmul: str = "auto"  # ragged_dot | padded | pallas (GPU) | tokamax | auto (padded on CPU, measured on GPU)
    prefill_chunk: int | None = None  # chunked prefill: prompt tokens per row and iteration (None: whole prompts)
    moe_max_num_tokens: int | None = None  # TensorRT-LLM's MoE chunking
    # migration_aware (balanced, keeps slots), flow (per-iteration load, keeps slots) or trtllm (from scratch)
    online_planner: str = "migration_aware"
    # apply each online plan exactly one iteration after it started (as every multi-process run must):
    # reproducible figures; default False in one process: a plan is applied as soon as it is done
    online_lockstep: bool = False
    traffic: bool = False  # record each step's dispatch rows: the exchange's bytes in the figures
    progress: bool = True

    def __post_init__(self):
        for name, value in (("--max_batch_size", self.max_batch_size), ("--prefill_chunk", self.prefill_chunk),
                            ("moe_max_num_tokens", self.moe_max_num_tokens)):
            if value is not None and value < 1:
                raise EplbInputError(f"{name} must be >= 1, got {value}")
        for name, value, choices in (("replica policy", self.replica_policy, POLICIES),
                                     ("transport", self.transport, TRANSPORTS),
                                     ("dispatch", self.dispatch, DISPATCH_MODES),
                                     ("grouped matmul", self.grouped_matmul, GROUPED_MATMULS),
                                     ("online planner", self.online_planner, ONLINE_PLANNERS),
                                     ("shared expert balance", self.shared_expert_balance, SHARED_BALANCE)):
            if value not in choices:
                raise EplbInputError(f"{name} must be one of {choices}, got {value!r}")
        if self.shared_expert_balance == "on" and self.replica_policy != "load_aware":
            raise EplbInputError("--shared_expert_balance on needs --replica_policy load_aware")

    def moe_options(self, record: tuple[str, ...]) -> MoEOptions:
        return MoEOptions(replica_policy=self.replica_policy, moe_max_num_tokens=self.moe_max_num_tokens,
                          record=record, transport=self.transport, dispatch=self.dispatch,
                          grouped_matmul=self.grouped_matmul, shared_expert_balance=self.shared_expert_balance)


@dataclasses.dataclass
class ThroughputResult:
    figures: dict
    tokens: dict  # task_id -> generated ids, in request order
    statistics_path: str | None
    slot_to_expert: np.ndarray  # [Lm, S] placement at the end
    per_iteration: list  # one dict per timed iteration: phase, imbalance, balancer work

    def write(self, output_tokens: str | None = None, report_json: str | None = None) -> None:
        """The generated ids (JSON lines) and all figures (JSON), written atomically by process 0."""
        if jax.process_index() != 0:  # multi-host: every process holds all results; one writes them
            return
        if output_tokens:
            atomic_write_text(Path(output_tokens), "".join(
                json.dumps({"task_id": k, "output_ids": v}) + "\n" for k, v in self.tokens.items()))
        if report_json:
            atomic_write_text(Path(report_json),
                              json.dumps({**self.figures, "per_iteration": self.per_iteration}, indent=2) + "\n")


def placement_tables(config: ModelConfig, plan: MoeLoadBalancerConfig | None, ep: int) -> AssignmentTables:
    """The tables of ``plan`` (None: one slot per expert, TensorRT-LLM's default layout), built and
    validated once, ``max_replicas`` wide enough for every later plan of the same geometry."""
    if plan is None:
        slot_to_expert = np.tile(default_slot_to_expert(config.num_experts, config.num_experts, ep),
                                 (config.num_moe_layers, 1))
    else:
        slot_to_expert = plan.slot_to_expert(config.moe_layer_ids, config.num_experts, ep)
    return build_assignment_tables(slot_to_expert, config.num_experts,
                                   widest_replicas(config.num_experts, slot_to_expert.shape[1]))


def _check(config: ModelConfig, settings: ThroughputSettings, requests: Sequence[Request], mesh, plan,
           online_state) -> None:
    if not 0 <= settings.warmup < len(requests):
        raise EplbInputError(f"--warmup must be in [0, {len(requests)}) (requests in the dataset), "
                             f"got {settings.warmup}")
    check_serving(config, settings, mesh, plan, online_state)


def check_serving(config: ModelConfig, settings: ThroughputSettings, mesh, plan, online_state) -> None:
    """What serving ``config`` under ``plan`` on ``mesh`` needs, checked before any device work."""
    online = plan is not None and plan.layer_updates_per_iter > 0
    if online_state and not online:
        raise EplbInputError("--online_state needs an online moe_load_balancer (layer_updates_per_iter > 0)")
    if online and plan.initial_global_assignments and any(
            UNUSED_SLOT in row for row in plan.initial_global_assignments.values()):
        raise EplbInputError("a plan with unused slots (-1) is static: online updates (layer_updates_per_iter > 0) "
                             "would fill them")
    if online_state and _saved(online_state) is not None:
        from jax_eplb.online import check_saved_state

        check_saved_state(_saved(online_state), config.num_moe_layers, config.num_experts,
                          plan.resolved_num_slots(config.num_experts))
    if settings.transport == "ragged":
        require_gpu(mesh, "--transport ragged", " (XLA:CPU has no ragged_all_to_all); use all_to_all")
    if settings.grouped_matmul == "pallas":
        require_gpu(mesh, "--grouped_matmul pallas", " (compiled Pallas); use padded or ragged_dot")
    if settings.grouped_matmul == "tokamax":
        require_tokamax()


def run_throughput(config: ModelConfig, weights: WeightSource, requests: Sequence[Request], mesh,
                   settings: ThroughputSettings = ThroughputSettings(), *, plan: MoeLoadBalancerConfig | None = None,
                   recorder: StatisticsRecorder | None = None, online_state: str | Path | None = None,
                   log: Callable[[str], None] = print, before_iteration: Callable | None = None) -> ThroughputResult:
    """Serves ``requests`` and measures throughput and per-rank balance.

    Args:
      plan: the ``moe_load_balancer`` (static, or online with ``layer_updates_per_iter > 0``).
      recorder: records expert (no plan) or slot (with a plan) statistics of its iteration window.
      online_state: online mode: restore decayed statistics and placement from this directory if it
        exists, save them there at the end.
      before_iteration: ``before_iteration(iteration, model)`` is called before every step
        (benchmarks use it to change the workload mid-run).
    Every input is checked before any device work.
    """
    _check(config, settings, requests, mesh, plan, online_state)
    batch = -(-min(settings.max_batch_size, len(requests)) // num_ranks(mesh)) * num_ranks(mesh)
    chunk = max(len(r.input_ids) for r in requests)
    chunk = min(chunk, settings.prefill_chunk) if settings.prefill_chunk else chunk
    runner, balancer, tables = prepare_serving(config, weights, mesh, settings, plan=plan,
                                               recording=recorder is not None, online_state=online_state,
                                               batch=batch, chunk=chunk, log=log)
    loop = ServingLoop(runner, settings, batch, chunk, recorder, balancer, before_iteration,
                       _new_figures(config, settings))
    timed = requests[settings.warmup:]
    interrupted = True  # until the run completes (Ctrl-C, an error): the dump is marked partial
    try:
        if settings.warmup:
            loop.serve(requests[:settings.warmup], timed=False)
        t_start = time.perf_counter()
        finished = loop.serve(timed, timed=True)
        wall = time.perf_counter() - t_start
        if balancer is not None:
            balancer.finish()
            if online_state:
                balancer.save_state(online_state)  # replaces the older state once complete
                log(f"online balancer state saved to {online_state}")
        interrupted = False
    finally:
        statistics_path = flush_statistics(recorder, log, interrupted)
    tokens = {r.task_id: finished[r.task_id] for r in timed}  # request order
    figures = {"model": config.name, "ep": num_ranks(mesh), "num_slots": runner.model.num_slots,
               "platform": platform(mesh), "load_balancer": "static plan" if plan is not None else "none",
               "replica_policy": settings.replica_policy,
               "shared_expert_balance": bool(config.num_shared_experts)
               and shared_balance_on(settings.moe_options(()), num_ranks(mesh)),
               **loop.figures.summary(wall, sum(map(len, tokens.values())), len(timed), config.moe_layer_ids)}
    if balancer is not None:
        figures.update(online_summary(balancer.reports, plan.layer_updates_per_iter, settings.online_planner))
    final = balancer.slot_to_expert if balancer is not None else tables.slot_to_expert
    return ThroughputResult(figures, tokens, statistics_path, final, loop.figures.per_iteration)


def prepare_serving(config: ModelConfig, weights: WeightSource, mesh, settings: ThroughputSettings, *,
                    plan: MoeLoadBalancerConfig | None, recording: bool, online_state, batch: int, chunk: int,
                    log: Callable[[str], None], sampling: bool = False, expert_totals: bool = False):
    """The model on ``mesh`` under ``plan``'s tables with its steps compiled for ``batch`` rows and
    prompt chunks of ``chunk`` (and the sampling programs with ``sampling``), and the online balancer
    when the plan is online. ``recording``: the step records expert (no plan) or slot (a plan)
    histograms; ``expert_totals``: it returns each step's ``[Lm, E]`` expert totals (always when online).
    Returns (runner, balancer or None, the initial tables)."""
    tables = placement_tables(config, plan, num_ranks(mesh))
    online = plan is not None and plan.layer_updates_per_iter > 0
    record = () if not recording else (("slot",) if plan is not None else ("expert",))
    record = tuple(sorted(set(record) | {"expert_total"})) if online or expert_totals else record
    record = record + ("traffic",) if settings.traffic else record
    start = time.perf_counter()
    runner = ModelRunner(build_model(config, mesh, tables, weights, options=settings.moe_options(record)))
    balancer = _online_balancer(runner.model, weights, plan, settings, online_state, log) if online else None
    runner.compile(batch, chunk, sampling=sampling)
    log(f"model {config.name}: {config.num_moe_layers} MoE layers, {config.num_experts} experts -> "
        f"{runner.model.num_slots} slots on ep={num_ranks(mesh)} ({platform(mesh)}); batch {batch}, "
        f"prefill {chunk}; weights + compile {time.perf_counter() - start:.1f} s")
    return runner, balancer, tables


def _new_figures(config: ModelConfig, settings: ThroughputSettings) -> ThroughputFigures:
    traffic = TrafficFigures(config.top_k, config.hidden_size, np.dtype(config.jnp_dtype).itemsize,
                             settings.moe_max_num_tokens) if settings.traffic else None
    return ThroughputFigures(traffic)


def _online_balancer(model, weights: WeightSource, plan, settings: ThroughputSettings, online_state, log):
    from jax_eplb.online import OnlineBalancer

    algorithm = {"migration_aware": "balanced"}.get(settings.online_planner, settings.online_planner)
    balancer = OnlineBalancer(model, weights.expert_source(model.config), plan.layer_updates_per_iter,
                              algorithm=algorithm, migration_aware=algorithm != "trtllm",
                              lockstep=True if settings.online_lockstep else None)
    if online_state and _saved(online_state) is not None:
        balancer.restore_state(online_state)
        log(f"online balancer state (statistics + placement) restored from {online_state}")
    return balancer


def _saved(online_state):
    from jax_eplb.online import saved_state

    return saved_state(online_state)


def flush_statistics(recorder: StatisticsRecorder | None, log, interrupted: bool = False) -> str | None:
    if recorder is None:
        return None
    path = recorder.flush(partial=interrupted)
    if recorder.written:
        note = " (partial: the run was interrupted; meta_info.json says so)" if interrupted else ""
        log(f"expert statistics of iterations {recorder.iterations[0]}-{recorder.iterations[-1]}{note} -> "
            f"{recorder.path}")
    else:
        log(f"warning: no iteration fell in [{recorder.start}, {recorder.stop}); no statistics written")
    return str(path) if path else None


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="generating", unit="tok", file=sys.stderr, leave=False)

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class ServingLoop:
    """The iteration loop: batcher inputs -> step -> statistics, balancer and figures."""

    def __init__(self, runner: ModelRunner, settings: ThroughputSettings, batch: int, chunk: int,
                 recorder: StatisticsRecorder | None, balancer, before_iteration: Callable | None,
                 figures: ThroughputFigures):
        self.runner, self.settings, self.batch, self.chunk = runner, settings, batch, chunk
        self.recorder, self.balancer, self.before_iteration = recorder, balancer, before_iteration
        self.iteration = 0
        self.timed_start: int | None = None  # first timed iteration (the online schedule counts from it)
        self.figures = figures
        self.expert_totals = None  # the last step's [Lm, E] expert totals, when the step returns them

    def serve(self, requests: Sequence[Request], timed: bool) -> dict:
        """Serves ``requests`` to completion; returns {task_id: generated ids}."""
        batcher = InFlightBatcher(requests, self.batch, self.chunk, self.settings.eos_id)
        progress = _Progress(sum(r.output_tokens for r in requests), timed and self.settings.progress)
        if timed:
            self.timed_start = self.iteration
        cache = self.runner.new_cache(self.batch)
        while batcher.busy:
            batcher.admit()
            cache, rows = self.step(batcher, cache, timed)
            progress.update(rows)
        progress.close()
        return batcher.done

    def step(self, batcher: InFlightBatcher, cache, timed: bool):
        """One iteration over the batcher's admitted rows; returns (the cache, rows that produced a token)."""
        it = self.iteration
        if self.recorder is not None:
            self.recorder.begin_iteration(it)
        if self.before_iteration is not None:
            self.before_iteration(it, self.runner.model)
        t0 = time.perf_counter()
        update = self.balancer.before_step(it - self.timed_start) if self.balancer is not None and timed else None
        step = batcher.inputs()
        if step.mixed:  # prompts (chunks) prefill while the active rows decode
            out = self.runner.mixed(step.prompt, step.lengths, step.next_token, step.positions, step.decoding, cache,
                                    starts=step.starts, sampling=step.sampling)
        else:
            out = self.runner.decode(step.next_token, step.positions, step.decoding, cache, sampling=step.sampling)
        fresh, rank_load, rank_rows = to_host(out.next_token), to_host(out.rank_load), to_host(out.rank_rows)
        elapsed = time.perf_counter() - t0
        if self.recorder is not None and self.recorder.wants(it):
            self.recorder.add(it, to_host(out.slot_counts if out.slot_counts is not None else out.expert_counts))
        if self.balancer is not None and timed:
            self.balancer.observe(out.expert_totals)
        self.expert_totals = out.expert_totals
        rows = batcher.advance(step, fresh)
        if timed:
            self.figures.add(it, step.mixed, elapsed, rank_load, rows, update, rank_rows)
            if self.figures.traffic is not None:
                tokens = self.batch * (self.chunk if step.mixed else 1) // num_ranks(self.runner.model.mesh)
                self.figures.traffic.add(step.mixed, to_host(out.dispatch_rows), tokens)
        self.iteration += 1
        return out.cache, rows
