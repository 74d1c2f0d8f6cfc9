"""Online EP load balancing while serving (TensorRT-LLM's ``layer_updates_per_iter`` mode, improved).

Per iteration:
* ``observe``: the step's logical-expert counts of all ranks ``[Lm, E]`` (``psum``-ed over
  ``ep`` inside the step) are folded into device-resident decayed statistics
  ``L <- decay * L + c`` (one tiny jitted update; nothing goes to the host).
* ``before_step``: plans that finished are applied (only changed slots are rewritten, from device
  copies or the host expert source, then that layer's statistics are reset); the layers due by the schedule
  have their statistics (``[k, E]``, one small transfer) planned on a host thread, overlapping
  the next step. With several processes (multi-host), every process plans the same layers from
  the same statistics and must apply them at the same iteration (the slot rewrite is a
  collective), so a plan is applied exactly one iteration after it was started, waiting for it
  if need be; in one process a plan is applied as soon as it is done.
* Plans are migration-aware: experts stay in their slots where that costs no balance, so an
  update moves few slots (TensorRT-LLM and DeepSeek re-plan from scratch).
* ``algorithm="flow"`` plans for each iteration's load under the load-aware split: the layer's
  iterations are drawn by the noise model around its decayed statistics, with the entries of
  one iteration = statistics total / (1 + decay + ... + decay^(n-1)) after n observed steps.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb._assignment import build_assignment_tables
from jax_eplb._metrics import project_onto_plan, rank_loads_from_counts
from jax_eplb.moe import as_expert_source, shared_balance_on
from jax_eplb.planning import plan_placement
from jax_eplb.sharding import replicated
from jax_eplb.online._schedule import OnlineSchedule
from jax_eplb.online._slot_writer import SlotWriter
from jax_eplb.online._state import check_saved_state, previous_state_path, saved_state

DECAY = 0.95


@jax.jit
def _decay_update(statistics, expert_totals, decay):
    """statistics ``[Lm, E]`` f32, expert_totals ``[Lm, E]`` (summed over ranks in the step) -> decayed."""
    return decay * statistics + expert_totals.astype(jnp.float32)


@jax.jit
def _reset_layers(statistics, layer_mask):
    return jnp.where(layer_mask[:, None], 0.0, statistics)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class UpdateReport(NamedTuple):
    """What one iteration's balancer work cost (zeros when nothing happened)."""

    iteration: int
    layers_planned: tuple[int, ...]
    layers_applied: tuple[int, ...]
    slots_moved: int
    bytes_moved: int
    plan_seconds: float  # host-thread planner time of the plans applied now
    apply_seconds: float  # time the step loop spent rewriting slots (stalls the next step)
    slots_from_devices: int = 0  # of slots_moved, copied from a device copy instead of host memory


class _Planned(NamedTuple):
    layers: tuple[int, ...]
    slot_to_expert: np.ndarray  # [k, S]
    seconds: float


class OnlineBalancer:
    """Keeps a :class:`~jax_eplb.model.MoETransformer`'s placement balanced while it serves.

    Args:
      model: a ``MoETransformer`` whose MoE layers record ``"expert_total"``
        (``MoEOptions(record=("expert_total", ...))``).
      expert_source: host access to the logical experts (``ExpertSource``, e.g. a weight source's
        ``expert_source(config)``, or arrays ``[Lm, E, ...]``): where rewritten slots come from
        when no device holds a copy.
      layer_updates_per_iter: k > 0 layers re-placed per iteration.
      algorithm: the planner (``plan_placement``'s): ``balanced`` (default), ``flow`` (for each
        iteration's load; pair it with the ``load_aware`` replica policy), ``trtllm``, ``deepseek``.
      migration_aware: False re-plans every due layer from scratch (TensorRT-LLM's behaviour;
        for comparison).
      overlap: plan on a host thread (applied at the next iteration after it finishes); False
        plans and applies within ``before_step`` (deterministic; for tests).
      device_copies: fill changed slots from resident copies of their experts (on-device copy or
        ppermute) rather than the host source; default: on GPU meshes (see ``SlotWriter``).
      lockstep: with ``overlap``, apply each plan exactly one iteration after it started (waiting
        for the thread if it is slower than a step), so every process applies the same plans at the
        same iteration. Default: on when JAX runs several processes (required there).
      migration_tolerance: accepted relative rise of the max rank load (under the layer's current
        statistics) to keep slots in place: a layer whose current placement is within it of the
        new plan is not touched, and new plans keep experts in place within it.
    """

    def __init__(self, model, expert_source, layer_updates_per_iter: int, *, decay: float = DECAY,
                 warmup_iters: int = 0, algorithm: str = "balanced", migration_tolerance: float = 0.05,
                 migration_aware: bool = True, overlap: bool = True, lockstep: bool | None = None,
                 device_copies: bool | None = None):
        if "expert_total" not in model.options.record:
            raise ValueError("the model's step must record expert totals: MoEOptions(record=('expert_total', ...))")
        config = model.config
        self.model, self.source = model, as_expert_source(expert_source)
        self.schedule = OnlineSchedule(config.num_moe_layers, layer_updates_per_iter, warmup_iters)
        self.decay, self.algorithm, self.tolerance = decay, algorithm, migration_tolerance
        self.migration_aware = migration_aware
        tables = model.tables()
        self.slot_to_expert = tables.slot_to_expert.copy()  # [Lm, S] host mirror
        self.max_replicas = tables.max_replicas
        self._replicated = replicated(model.mesh)
        self.statistics = jax.device_put(jnp.zeros((config.num_moe_layers, config.num_experts), jnp.float32),
                                         self._replicated)
        self._steps_observed = np.zeros(config.num_moe_layers)  # [Lm] steps in the statistics since a reset
        self.writer = SlotWriter(model.mesh, device_copies)
        # compile the rebalance programs now, not mid-serving
        model.set_slot_experts(self.writer.warm_up(model.slot_experts()))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if overlap else None
        self.lockstep = jax.process_count() > 1 if lockstep is None else lockstep
        self._pending: list[concurrent.futures.Future] = []
        self.reports: list[UpdateReport] = []

    # ------------------------------------------------------------------ per iteration

    def observe(self, expert_totals) -> None:
        """Folds one step's ``[Lm, E]`` expert totals into the decayed statistics (device only)."""
        self.statistics = _decay_update(self.statistics, expert_totals, jnp.float32(self.decay))
        self._steps_observed += 1

    def before_step(self, iteration: int) -> UpdateReport:
        applied: list[UpdateReport] = []  # one per plan applied now (iteration -1, layers_planned ())
        # One look per future (a plan finishing now waits a step); in lockstep every plan of an
        # earlier iteration counts as done and is waited for.
        done = [self.lockstep or f.done() for f in self._pending]
        ready = [f for f, d in zip(self._pending, done) if d]
        self._pending = [f for f, d in zip(self._pending, done) if not d]
        applied += [self._apply(future.result()) for future in ready]
        due = self.schedule.due(iteration)
        if due:
            loads = np.asarray(self.statistics[np.asarray(due)])  # [k, E]: one small transfer
            previous = self.slot_to_expert[list(due)]
            steps = np.maximum(self._steps_observed[list(due)], 1)
            entries = loads.sum(axis=1) * (1 - self.decay) / (1 - self.decay ** steps)  # [k] per iteration
            if self._pool is not None:
                self._pending.append(self._pool.submit(self._plan, due, loads, previous, entries))
            else:
                applied.append(self._apply(self._plan(due, loads, previous, entries)))
        report = UpdateReport(iteration, tuple(due), tuple(l for a in applied for l in a.layers_applied),
                              *(sum(getattr(a, field) for a in applied) for field in UpdateReport._fields[3:]))
        self.reports.append(report)
        return report

    def finish(self) -> None:
        """Applies plans still in flight (call at the end of serving)."""
        for future in self._pending:
            self._apply(future.result())
        self._pending = []

    # ------------------------------------------------------------------ planning and applying

    def _plan(self, layers, loads, previous, entries) -> _Planned:
        """New placements for ``layers``; a layer whose current placement is within
        ``migration_tolerance`` of the new plan's max rank load keeps it (moves nothing; ``flow``
        judges that by the per-iteration load itself). ``entries``: ``[k]`` entries per iteration."""
        start = time.perf_counter()
        model = self.model
        if not np.any(loads):
            return _Planned(tuple(layers), previous, time.perf_counter() - start)
        if not self.migration_aware:
            plan = plan_placement(loads, model.num_slots, model.num_ranks, self.algorithm,
                                  entries_per_iteration=entries)
            return _Planned(tuple(layers), plan.slot_to_expert, time.perf_counter() - start)
        shared = self._shared_rows(entries) if self.algorithm == "flow" else 0.0
        plan = plan_placement(loads, model.num_slots, model.num_ranks, self.algorithm, previous=previous,
                              migration_tolerance=self.tolerance, entries_per_iteration=entries, shared_rows=shared)
        if self.algorithm == "flow":
            return _Planned(tuple(layers), plan.slot_to_expert, time.perf_counter() - start)
        current_peak = rank_loads_from_counts(project_onto_plan(loads[None], previous)[0], model.num_ranks).max(axis=1)
        keep = current_peak <= plan.rank_load.max(axis=1) * (1 + self.tolerance)
        chosen = np.where(keep[:, None], previous, plan.slot_to_expert)
        return _Planned(tuple(layers), chosen, time.perf_counter() - start)

    def _shared_rows(self, entries) -> float:
        """Shared-expert rows per rank per iteration the split moves (0 unless the layers balance them)."""
        model = self.model
        moe = model.config.moe
        if not moe.num_shared_experts or not shared_balance_on(model.options, model.num_ranks):
            return 0.0
        pieces = -(-moe.shared_width // moe.expert_ffn_size)
        return float(np.mean(entries)) / moe.top_k / model.num_ranks * pieces

    def _apply(self, planned: _Planned) -> UpdateReport:
        start = time.perf_counter()
        experts = self.model.slot_experts()
        moves = []
        for layer, new in zip(planned.layers, planned.slot_to_expert):
            experts, move = self.writer.move_layer(experts, self.source, layer, self.slot_to_expert[layer], new)
            self.slot_to_expert[layer] = new
            moves.append(move)
        self.model.set_slot_experts(experts)
        self.model.set_tables(self._tables(self.slot_to_expert))
        mask = np.zeros(self.slot_to_expert.shape[0], bool)
        mask[list(planned.layers)] = True
        self.statistics = _reset_layers(self.statistics, jax.device_put(mask, self._replicated))
        self._steps_observed[mask] = 0
        return UpdateReport(-1, (), tuple(planned.layers), sum(m.slots_moved for m in moves),
                            sum(m.bytes_moved for m in moves), planned.seconds, time.perf_counter() - start,
                            sum(m.slots_from_devices for m in moves))

    def _tables(self, slot_to_expert):
        return build_assignment_tables(slot_to_expert, self.model.config.num_experts, self.max_replicas)

    # ------------------------------------------------------------------ state

    def save_state(self, path) -> None:
        """Decayed statistics and the current plan, with orbax (a restarted server keeps its placement).

        Written next to ``path`` first and swapped in when complete, so a failed save (or a crash at
        any moment) keeps the previous state (``_state``)."""
        import shutil

        import orbax.checkpoint as ocp

        self.finish()
        path = Path(path).absolute()
        staging = path.with_name(path.name + ".saving")
        lead = jax.process_index() == 0
        if lead:
            shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
        _sync_processes("online_state_staging")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging, {"statistics": self.statistics, "slot_to_expert": np.asarray(self.slot_to_expert)})
        checkpointer.wait_until_finished()
        if lead:  # a complete state exists at every moment: path, or path.old during the swap
            previous = previous_state_path(path)
            if path.exists():
                shutil.rmtree(previous, ignore_errors=True)
                path.rename(previous)
            staging.rename(path)
            shutil.rmtree(previous, ignore_errors=True)
        _sync_processes("online_state_saved")

    def restore_state(self, path) -> None:
        """Loads saved statistics and re-lays the model's experts under the saved plan."""
        import orbax.checkpoint as ocp

        path = saved_state(path) or path
        check_saved_state(path, *self.statistics.shape, self.slot_to_expert.shape[1])
        target = {"statistics": jax.ShapeDtypeStruct(self.statistics.shape, jnp.float32, sharding=self._replicated),
                  "slot_to_expert": np.zeros_like(self.slot_to_expert)}
        restored = ocp.StandardCheckpointer().restore(Path(path).absolute(), target)
        slot_to_expert = np.asarray(restored["slot_to_expert"])
        self.model.set_placement(self._tables(slot_to_expert), self.source)
        self.slot_to_expert = slot_to_expert.copy()
        self.statistics = restored["statistics"]
        self._steps_observed[:] = np.inf  # the saved statistics: taken as a long (steady) window
