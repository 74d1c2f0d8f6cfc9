"""TensorRT-LLM's ``MoeLoadBalancerConfig`` YAML: strict loading, validation, writing.

Schema (no other keys)::

    initial_global_assignments:   # layer index -> expert id of every global slot ([S])
      3: [138, 81, 60, ...]
    layer_updates_per_iter: 0     # 0 = static, k > 0 = online (k layers re-placed per iteration)
    num_slots: 288
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from jax_eplb._assignment import (UNUSED_SLOT, AssignmentTables, build_assignment_tables, check_slot_geometry,
                                  default_slot_to_expert)
from jax_eplb._atomic import atomic_write_text
from jax_eplb._errors import EplbInputError
from jax_eplb._yaml import load_yaml

PLAN_KEYS = ("num_slots", "initial_global_assignments", "layer_updates_per_iter")


@dataclasses.dataclass(frozen=True)
class MoeLoadBalancerConfig:
    """A placement plan as TensorRT-LLM spells it.

    Attributes:
      num_slots: total slots S (None: one per expert).
      initial_global_assignments: ``{layer_id: [S] expert ids}``, or None for the default layout; -1
        marks a slot that serves nothing (vLLM's convention; TensorRT-LLM's loader has no such entry).
      layer_updates_per_iter: 0 for a static plan; k > 0 re-places k layers per iteration.
      source: where the config came from, used in error messages.
    """

    num_slots: int | None = None
    initial_global_assignments: Mapping[int, Sequence[int]] | None = None
    layer_updates_per_iter: int = 0
    source: str = dataclasses.field(default="<config>", compare=False)

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<config>") -> "MoeLoadBalancerConfig":
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise EplbInputError(f"{source}: expected a mapping with keys {list(PLAN_KEYS)}, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in PLAN_KEYS)
        if unknown:
            raise EplbInputError(f"{source}: unknown key(s) {unknown}; allowed: {list(PLAN_KEYS)}")
        num_slots = raw.get("num_slots")
        if num_slots is not None and (not _is_int(num_slots) or num_slots < 1):
            raise EplbInputError(f"{source}: key 'num_slots' must be a positive integer, got {num_slots!r}")
        updates = raw.get("layer_updates_per_iter", 0)
        if not _is_int(updates) or updates < 0:
            raise EplbInputError(
                f"{source}: key 'layer_updates_per_iter' must be an integer >= 0, got {updates!r}")
        assignments = raw.get("initial_global_assignments")
        parsed = None
        if assignments is not None:
            if not isinstance(assignments, Mapping):
                raise EplbInputError(
                    f"{source}: key 'initial_global_assignments' must map layer index -> list of "
                    f"expert ids, got {type(assignments).__name__}")
            parsed = {}
            for layer, experts in assignments.items():
                if not _is_int(layer):
                    raise EplbInputError(
                        f"{source}: initial_global_assignments key {layer!r} is not a layer index")
                if not isinstance(experts, Sequence) or isinstance(experts, str) or not all(
                        _is_int(e) for e in experts):
                    raise EplbInputError(
                        f"{source}: layer {layer}: expected a list of integer expert ids, got {experts!r:.80}")
                parsed[int(layer)] = tuple(int(e) for e in experts)
            lengths = {len(v) for v in parsed.values()}
            if len(lengths) > 1:
                raise EplbInputError(f"{source}: layers have different slot counts {sorted(lengths)}")
            if num_slots is None and lengths:
                num_slots = lengths.pop()
        return cls(num_slots, parsed, int(updates), source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "MoeLoadBalancerConfig":
        return cls.from_dict(load_yaml(path, "plan"), str(path))

    # ------------------------------------------------------------------ checking / tables

    def resolved_num_slots(self, num_experts: int) -> int:
        return num_experts if self.num_slots is None else int(self.num_slots)

    def slot_to_expert(self, layer_ids: Sequence[int], num_experts: int, ep_size: int) -> np.ndarray:
        """``[L, S]`` int32 for the given MoE layers, validated; default layout if no assignments."""
        num_slots = self.resolved_num_slots(num_experts)
        try:
            check_slot_geometry(num_experts, num_slots, ep_size)
        except EplbInputError as err:
            raise EplbInputError(f"{self.source}: {err}") from None
        layer_ids = [int(i) for i in layer_ids]
        if self.initial_global_assignments is None:
            return np.tile(default_slot_to_expert(num_experts, num_slots, ep_size), (len(layer_ids), 1))
        missing = [i for i in layer_ids if i not in self.initial_global_assignments]
        if missing:
            raise EplbInputError(
                f"{self.source}: initial_global_assignments has no entry for MoE layer(s) {missing}")
        extra = sorted(set(self.initial_global_assignments) - set(layer_ids))
        if extra:
            raise EplbInputError(
                f"{self.source}: initial_global_assignments has layer(s) {extra} that are not MoE "
                f"layers of this model ({layer_ids[0]}..{layer_ids[-1]})")
        planned = {int(e) for layer in layer_ids for e in self.initial_global_assignments[layer]} - {UNUSED_SLOT}
        if planned and max(planned) < num_experts - 1 and len(planned) < num_experts:
            raise EplbInputError(f"{self.source}: the plan places {len(planned)} distinct experts (ids up to "
                                 f"{max(planned)}) but the model has {num_experts} experts; was it made for "
                                 f"another model?")
        rows = []
        for layer in layer_ids:
            experts = np.asarray(self.initial_global_assignments[layer], dtype=np.int64)
            if experts.shape != (num_slots,):
                raise EplbInputError(
                    f"{self.source}: layer {layer}: {experts.shape[0]} slots, expected num_slots={num_slots}")
            bad = (experts < UNUSED_SLOT) | (experts >= num_experts)
            if bad.any():
                slot = int(np.argmax(bad))
                raise EplbInputError(
                    f"{self.source}: layer {layer}: slot {slot} holds expert {experts[slot]}, "
                    f"expected 0..{num_experts - 1} (or {UNUSED_SLOT}: unused)")
            absent = np.setdiff1d(np.arange(num_experts), experts)
            if absent.size:
                raise EplbInputError(
                    f"{self.source}: layer {layer}: expert(s) {absent[:8].tolist()} have no replica")
            rows.append(experts)
        return np.stack(rows).astype(np.int32)

    def assignment_tables(self, layer_ids: Sequence[int], num_experts: int, ep_size: int,
                          max_replicas: int | None = None) -> AssignmentTables:
        return build_assignment_tables(self.slot_to_expert(layer_ids, num_experts, ep_size),
                                       num_experts, max_replicas)

    # ------------------------------------------------------------------ writing

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"num_slots": self.num_slots,
                               "layer_updates_per_iter": int(self.layer_updates_per_iter)}
        if self.initial_global_assignments is not None:
            out["initial_global_assignments"] = {
                int(k): [int(e) for e in v] for k, v in sorted(self.initial_global_assignments.items())}
        return out

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Writes TensorRT-LLM's layout (sorted keys, inline lists), atomically."""
        atomic_write_text(path, dump_yaml(self.to_dict()))


class _InlineListDumper(yaml.SafeDumper):
    pass


_InlineListDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_yaml(config: Mapping) -> str:
    return yaml.dump(dict(config), Dumper=_InlineListDumper, width=float("inf"))


def plan_config_from_slots(slot_to_expert: np.ndarray, layer_ids: Sequence[int],
                           layer_updates_per_iter: int = 0) -> MoeLoadBalancerConfig:
    """Wraps ``[L, S]`` assignments as a config."""
    slot_to_expert = np.asarray(slot_to_expert)
    return MoeLoadBalancerConfig(
        num_slots=int(slot_to_expert.shape[1]),
        initial_global_assignments={int(l): tuple(int(e) for e in row)
                                    for l, row in zip(layer_ids, slot_to_expert)},
        layer_updates_per_iter=int(layer_updates_per_iter),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
