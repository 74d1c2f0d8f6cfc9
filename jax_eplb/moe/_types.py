"""What an MoE layer is (``MoEConfig``), how it runs (``MoEOptions``) and what it returns (``MoEOutput``).

Axis legend: T tokens, H hidden, F expert FFN, E experts, S slots, R ranks, X = E or S.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jax_eplb_kernels import IMPLEMENTATIONS

ROUTERS = ("softmax", "deepseek", "topk_softmax")
ACTIVATIONS = ("silu", "clamped_swiglu")
POLICIES = ("round_robin", "load_aware")
SHARED_BALANCE = ("auto", "on", "off")
RECORD_MODES = ("expert", "slot", "expert_total", "traffic")
TRANSPORTS = ("auto", "all_to_all", "ragged")
DISPATCH_MODES = ("token", "entry")
GROUPED_MATMULS = ("auto", "ragged_dot", "padded", "pallas", "pallas_interpret", "tokamax")
KERNEL_IMPLEMENTATIONS = IMPLEMENTATIONS  # the kernels' own names (jax_eplb_kernels)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing of one MoE layer.

    router: ``softmax`` (Mixtral, Qwen3-MoE: softmax over experts, top-k, renormalised when
    ``renormalize``), ``deepseek`` (DeepSeek-V3, Kimi-K2, GLM-4.5: sigmoid scores, selection bias,
    group-limited top-k) or ``topk_softmax`` (gpt-oss: top-k of the logits, softmax over those k).
    router_logit_bias: the router has a bias added to its logits (gpt-oss).

    Experts: ``activation`` ``silu`` (SwiGLU: ``silu(gate) * up``) or ``clamped_swiglu`` (gpt-oss:
    ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``).
    ``expert_bias``: every expert linear layer has a bias, stored as one more input row of its
    weight (gate, up ``[H + 1, F]``, down ``[F + 1, H]``: the affine map as one matrix applied to
    ``[x, 1]``), so a bias travels with its expert's weights wherever a plan moves them.
    """

    hidden_size: int
    expert_ffn_size: int
    num_experts: int
    top_k: int
    router: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_ffn_size: int | None = None
    router_logit_bias: bool = False
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.expert_bias and self.num_shared_experts:
            raise ValueError("expert biases with shared experts are not implemented (no such model)")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) > num_experts ({self.num_experts})")
        if self.router == "deepseek" and self.num_experts % self.n_group:
            raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.router == "deepseek" and not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")

    @property
    def expert_shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """One expert's gate, up ``[H (+1), F]`` and down ``[F (+1), H]`` (the bias row with ``expert_bias``)."""
        h, f, b = self.hidden_size, self.expert_ffn_size, int(self.expert_bias)
        return (h + b, f), (h + b, f), (f + b, h)

    @property
    def expert_function(self) -> "ExpertFunction":
        return ExpertFunction(self.activation, self.swiglu_alpha, self.swiglu_limit, self.expert_bias)

    @property
    def shared_width(self) -> int:
        """FFN width of the shared experts together (0: none)."""
        return (self.shared_ffn_size or self.expert_ffn_size) * self.num_shared_experts


@dataclasses.dataclass(frozen=True)
class ExpertFunction:
    """What an expert computes from its weights (``MoEConfig``'s ``activation``, ``swiglu_*`` and
    ``expert_bias``; hashable: a static argument of the jitted expert compute)."""

    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    bias: bool = False

    def glu(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """The gated hidden activation from the gate and up projections (float32)."""
        if self.activation == "silu":
            return jax.nn.silu(gate) * up
        gate = jnp.minimum(gate, self.limit)
        return (jnp.clip(up, -self.limit, self.limit) + 1) * gate * jax.nn.sigmoid(gate * self.alpha)

    def with_one(self, x: jax.Array) -> jax.Array:
        """``[..., D]`` -> ``[..., D + 1]`` with a column of ones when the weights carry a bias row, else x."""
        return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1) if self.bias else x


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    """How an MoE layer runs (static: changing one recompiles; a new placement does not).

    replica_policy: ``round_robin`` (TensorRT-LLM's rule) or ``load_aware`` (ours).
    moe_max_num_tokens: TensorRT-LLM's MoE chunking (None: one chunk).
    record: histograms to compute in the step: ``expert`` (per-rank logical ids), ``slot``
      (per-rank slot ids), ``expert_total`` (logical ids summed over ranks: online balancing),
      ``traffic`` (rows each rank's dispatch sends to each rank, both dispatch modes).
    transport: ``auto`` (on a single-process GPU mesh the faster of ``ragged`` and ``all_to_all``,
      timed once on that mesh at the layer's shapes, ``ragged`` only where it matched; else
      ``all_to_all``), ``all_to_all`` (fixed capacity, any backend) or ``ragged`` (real rows only; GPU).
    dispatch: ``token`` (each token once per destination rank, combined there) or ``entry``
      (every (token, k) entry on its own); ``moe/_dispatch.py`` has the buffer sizes.
    grouped_matmul: ``auto`` (tile-padded on CPU; on a GPU the fastest close one of ragged_dot,
      tokamax and - JAX < 0.11 - pallas, measured at the layer's shapes), ``ragged_dot``, ``padded``,
      ``pallas`` (Triton; GPU), ``pallas_interpret`` or ``tokamax`` (the ``gpu`` extra).
    kernel_implementation: the routing kernels' choice (``auto``: measured on a GPU, see
      ``jax_eplb_kernels._dispatch``; ``mosaic_gpu``, ``pallas`` (Triton), ``xla``, ``*_interpret``).
    ragged_exchange: replaces ``jax.lax.ragged_all_to_all`` in the ``ragged`` transport (None: the
      primitive; backends without it can pass an emulation).
    shared_expert_balance: layers with shared experts: ``on`` - the tokens' shared-expert rows join the
      load-aware split (a rank computes part of another's shared rows, riding along with tokens it
      receives anyway, or as a trip of their own), ``off`` - every rank computes its own tokens'
      shared rows, ``auto`` (default) - ``on`` under ``load_aware`` on more than one rank. ``on``
      needs ``load_aware``.
    """

    replica_policy: str = "round_robin"
    moe_max_num_tokens: int | None = None
    record: tuple[str, ...] = ()
    transport: str = "auto"
    dispatch: str = "token"
    grouped_matmul: str = "auto"
    kernel_implementation: str = "auto"
    ragged_exchange: Callable | None = None
    shared_expert_balance: str = "auto"

    def __post_init__(self):
        record = (self.record,) if isinstance(self.record, str) else tuple(self.record or ())
        object.__setattr__(self, "record", record)
        checks = (("replica_policy", self.replica_policy, POLICIES), ("transport", self.transport, TRANSPORTS),
                  ("dispatch", self.dispatch, DISPATCH_MODES),
                  ("grouped_matmul", self.grouped_matmul, GROUPED_MATMULS),
                  ("kernel_implementation", self.kernel_implementation, KERNEL_IMPLEMENTATIONS),
                  ("shared_expert_balance", self.shared_expert_balance, SHARED_BALANCE))
        for name, value, choices in checks:
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if not set(record) <= set(RECORD_MODES):
            raise ValueError(f"record must hold some of {RECORD_MODES}, got {record!r}")
        if self.shared_expert_balance == "on" and self.replica_policy != "load_aware":
            raise ValueError("shared_expert_balance='on' needs replica_policy='load_aware' (the split moves the rows)")
        if self.moe_max_num_tokens is not None and self.moe_max_num_tokens < 1:
            raise ValueError(f"moe_max_num_tokens must be >= 1, got {self.moe_max_num_tokens}")


class ExpertWeights(NamedTuple):
    """SwiGLU experts: gate, up ``[X, H, F]``; down ``[X, F, H]`` (X = E logical or S slots; a
    leading layer axis when stacked)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array


class RouterWeights(NamedTuple):
    kernel: jax.Array  # [H, E]
    correction_bias: jax.Array  # [E] (DeepSeek selection bias; zeros otherwise)
    logit_bias: jax.Array | None = None  # [E] added to the logits (gpt-oss); None: none


class MoEOutput(NamedTuple):
    """What one MoE layer returns.

    out:       ``[T, H]`` float32 from the pure forward: the routed experts, plus the shared experts
               when it is given them (the block does; it casts to the input dtype).
    rank_load: ``[R]`` int32 routed (token, k) entries each rank computed this call (in-graph
               balance; TensorRT-LLM's measure).
    expert_counts: ``[R, E]`` int32 per-rank histogram of routed logical expert ids, or None
               when not recorded (then it is not computed at all).
    slot_counts: ``[R, S]`` int32 per-rank histogram of the chosen slots, or None.
    expert_totals: ``[E]`` int32 expert histogram summed over ranks in-graph, or None.
    dispatch_rows: ``[R_src, 2, R_dst]`` int32 rows each rank's dispatch plans send to each rank
               (``[:, 0]`` entry mode, ``[:, 1]`` token mode; summed over chunks, the rank's own
               block included), or None (``moe/_traffic.py`` turns them into bytes).
    rank_rows: ``[R]`` int32 rows each rank computed: ``rank_load`` plus the shared-expert rows it
               computed (its own tokens', or what the split gave it when they are balanced; one row
               per token and expert FFN width); None only where a caller builds the tuple itself.
    """

    out: jax.Array
    rank_load: jax.Array
    expert_counts: jax.Array | None
    slot_counts: jax.Array | None
    expert_totals: jax.Array | None = None
    dispatch_rows: jax.Array | None = None
    rank_rows: jax.Array | None = None
