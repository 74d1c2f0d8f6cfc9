"""Test setup: 8 CPU-emulated devices (set before JAX is imported anywhere) and shared helpers.

On a GPU machine the GPU stays the default backend (the kernel GPU tests use it); mesh tests
fall back to the emulated CPU devices when there are fewer accelerators than ranks. Helpers
reach tests as fixtures: ``mesh_of``, ``dense_moe`` (the single-device MoE oracle),
``ragged_emulation`` (``ragged_all_to_all`` from all_gather, for XLA:CPU) and ``small`` (a
small DeepSeek-style model: config, build, generate, and an independent float64 NumPy decoder).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"


def pytest_configure(config):
    """Compiled programs are cached on disk for the session: tests that build the same model and
    shapes reuse them instead of compiling again (most of this suite's time is XLA compiles). SIGINT
    stops the run with its summary even where a launcher started it with SIGINT ignored (a time limit
    sends SIGINT: scripts/gpu_check.sh)."""
    import tempfile

    signal.signal(signal.SIGINT, signal.default_int_handler)

    cache = os.environ.get("JAX_EPLB_TEST_COMPILE_CACHE") or tempfile.mkdtemp(prefix="jax_eplb_compile_cache_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if jax.default_backend() == "gpu":  # float32 comparisons mean float32: GPUs multiply in TF32 by default
        jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def real_loads():
    """[L, E] DeepSeek-V3 loads from the shared data set; skipped where it is absent."""
    path = SHARED_DATA / "prefill_in1024.json"
    if not path.exists():
        pytest.skip("shared DeepSeek-V3 statistics not present")
    from jax_eplb import load_sglang_json

    return load_sglang_json(path).total()


def make_mesh(ranks: int) -> Mesh:
    devices = jax.devices() if len(jax.devices()) >= ranks else jax.devices("cpu")
    return Mesh(np.array(devices[:ranks]), ("ep",))


@pytest.fixture
def mesh_of():
    """``mesh_of(ranks)``: an ``ep`` mesh (accelerators when there are enough, else CPU-emulated)."""
    return make_mesh


# ----------------------------------------------------------------------------- MoE oracles

def numpy_router_scores(config, kernel, x, logit_bias=None) -> np.ndarray:
    """``[T, E]`` float64 scores the combine weights come from: softmax (Mixtral, Qwen3; gpt-oss' softmax over
    its top-k logits is this renormalised over the chosen) or sigmoid (DeepSeek); ``logit_bias`` added first."""
    logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    if logit_bias is not None:
        logits = logits + np.asarray(logit_bias, np.float64)
    if config.router == "deepseek":
        return 1 / (1 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def numpy_route(config, kernel, bias, x) -> tuple[np.ndarray, np.ndarray]:
    """The routers written from their papers in float64 NumPy: expert ids ``[T, K]`` (best first) and combine
    weights ``[T, K]``. Softmax top-k (renormalised if the config says so); DeepSeek-V3: the bias steers the
    choice only, a group scores the sum of its two best biased scores, experts only from the ``topk_group``
    best groups, weights the plain sigmoid scores renormalised, times ``routed_scaling_factor``."""
    scores = numpy_router_scores(config, kernel, x, bias if config.router == "topk_softmax" else None)
    if config.router == "deepseek":
        choice = scores + np.asarray(bias, np.float64)[None]
        tokens, experts = choice.shape
        grouped = choice.reshape(tokens, config.n_group, experts // config.n_group)
        group_score = np.sort(grouped, -1)[..., -2:].sum(-1)  # [T, G]
        best = np.argsort(-group_score, -1, kind="stable")[:, :config.topk_group]
        allowed = np.zeros((tokens, config.n_group), bool)
        np.put_along_axis(allowed, best, True, -1)
        choice = np.where(np.repeat(allowed, experts // config.n_group, -1), choice, -np.inf)
    else:
        choice = scores
    ids = np.argsort(-choice, -1, kind="stable")[:, :config.top_k]
    return ids, numpy_combine_weights(config, scores, ids)


def numpy_combine_weights(config, scores, ids) -> np.ndarray:
    """``[T, K]`` combine weights of the chosen ``ids`` from the router's plain ``scores`` (float64)."""
    weights = np.take_along_axis(scores, ids, -1)
    if config.renormalize or config.router == "topk_softmax":
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * (config.routed_scaling_factor if config.router == "deepseek" else 1.0)


def dense_moe_reference(config, router, logical, x, shared=None):
    """Single-device dense MoE in float32: a loop over logical experts. The experts are those the package's
    router picks (a choice near a tie may go either way in float32); their combine weights come from the
    NumPy router's scores (``numpy_combine_weights``), so a wrong weight rule in the package shows here."""
    from jax_eplb.moe import route, swiglu

    x = x.astype(jnp.float32)
    ids = np.asarray(route(config, router, x).expert_ids)
    scores = numpy_router_scores(config, router.kernel, x)
    weights = jnp.asarray(numpy_combine_weights(config, scores, ids), jnp.float32)
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(config.num_experts):
        weight = jnp.sum(jnp.where(ids == e, weights, 0.0), axis=1)  # [T]
        out = out + weight[:, None] * swiglu(x, *(w[e].astype(jnp.float32) for w in logical))
    if shared is not None:
        out = out + swiglu(x, *(w.astype(jnp.float32) for w in shared))
    return out


@pytest.fixture
def dense_moe():
    return dense_moe_reference


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``jax.lax.ragged_all_to_all`` semantics from ``all_gather`` (XLA:CPU lacks the primitive).

    Every rank gathers all operands and offsets and copies the rows addressed to it.
    """
    del recv_sizes  # implied by the senders' send_sizes
    rank = jax.lax.axis_index(axis_name)
    num_ranks = jax.lax.axis_size(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [R, rows_in, ...]
    starts = jax.lax.all_gather(input_offsets, axis_name)[:, rank]  # [R] per source
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, rank]
    targets = jax.lax.all_gather(output_offsets, axis_name)[:, rank]
    rows_in = operand.shape[0]
    index = jnp.arange(rows_in)
    for source in range(num_ranks):
        take = index < sizes[source]
        dst = jnp.where(take, targets[source] + index, output.shape[0])
        src = jnp.minimum(starts[source] + index, rows_in - 1)
        output = output.at[dst].set(operands[source][src], mode="drop")
    return output


@pytest.fixture
def ragged_emulation():
    return emulated_ragged_all_to_all


# ----------------------------------------------------------------------------- a small model

class SmallModels:
    """A small DeepSeek-style model (16 experts, top-4, groups, a shared expert), its runner, greedy
    generation, and an independent float64 NumPy decoder to check it against."""

    RAW = {"model": dict(name="small", vocab_size=64, hidden_size=32, num_layers=3, first_k_dense=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, dense_ffn_size=48, num_experts=16, top_k=4, expert_ffn_size=16,
                         num_shared_experts=1, max_seq_len=24, router="deepseek", n_group=4, topk_group=2,
                         routed_scaling_factor=2.0, router_bias_scale=0.05, init_std=0.2, router_logit_std=1.0)}
    PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], [60, 2, 11, 40, 33, 17, 5, 9], [12, 0, 4, 4],
               [7], [50, 51, 52, 53, 54, 55], [9, 9], [31, 30, 2, 2, 2]]

    def config(self, **overrides):
        from jax_eplb.model import ModelConfig

        return dataclasses.replace(ModelConfig.from_dict(self.RAW, "small.yaml"), **overrides)

    def identity_plus(self, config, extra: int) -> np.ndarray:
        """``[Lm, E + extra]``: every expert once, then the first ``extra`` again."""
        base = np.arange(config.num_experts)
        return np.tile(np.concatenate([base, base[:extra]]), (config.num_moe_layers, 1))

    def random_placement(self, config, slots: int, rng) -> np.ndarray:
        e = config.num_experts
        return np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, slots - e)]))
                         for _ in range(config.num_moe_layers)])

    def build(self, config, ranks, slot_to_expert, seed=0, weights=None, **options):
        """A ``ModelRunner`` over the model on ``ranks`` devices under ``slot_to_expert``."""
        from jax_eplb import build_assignment_tables
        from jax_eplb._assignment import widest_replicas
        from jax_eplb.model import ModelRunner, SeededWeights, build_model
        from jax_eplb.moe import MoEOptions

        tables = build_assignment_tables(slot_to_expert, config.num_experts,
                                         widest_replicas(config.num_experts, np.shape(slot_to_expert)[1]))
        model = build_model(config, make_mesh(ranks), tables, weights or SeededWeights(seed),
                            options=MoEOptions(**options))
        return ModelRunner(model)

    def generate(self, runner, prompts=None, steps=5, before_step=None, after_step=None):
        """Greedy tokens ``[B][steps]`` of ``prompts`` (prefill, then decode), with optional hooks
        ``before_step(iteration)`` and ``after_step(output)`` around every step."""
        prompts = prompts or self.PROMPTS
        b = len(prompts)
        tokens = np.zeros((b, max(map(len, prompts))), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        lengths = np.array([len(p) for p in prompts])
        result, positions, out = [[] for _ in range(b)], lengths.copy(), None
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            if out is None:
                out = runner.prefill(tokens, lengths, runner.new_cache(b))
            else:
                out = runner.decode(np.asarray(out.next_token), positions, np.ones(b, bool), out.cache)
                positions += 1
            if after_step is not None:
                after_step(out)
            for i, t in enumerate(np.asarray(out.next_token)):
                result[i].append(int(t))
        return result

    def reference_next_token(self, config, params, experts, tokens) -> int:
        """Greedy next token of one sequence, recomputing everything (float64 NumPy; the router's
        top-k selection comes from the block's router function, its combine weights from the NumPy
        router's scores, the MoE is a loop over experts).
        ``params``: ``seeded_params`` as float64; ``experts``: logical ``[Lm, E, ...]``."""
        c = config
        x = params["embed"][np.asarray(tokens)]
        if c.first_k_dense:
            x = _reference_layers(c, params["dense_layers"]["layers"], None, range(c.first_k_dense), x)
        x = _reference_layers(c, params["moe_layers"]["layers"], experts, range(c.num_moe_layers), x)
        final = _norm(x[-1], params["final_norm"]["weight"], c.rms_norm_eps)
        return int(np.argmax(final @ params["lm_head"]))


def _norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta):  # x [T, N, Dh], positions 0..T-1
    t, _, d = x.shape
    half = d // 2
    angle = np.arange(t)[:, None, None] * theta ** (-np.arange(half) / half)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


def _attention(c, w, layer, h):  # h [T, H] normed; full causal attention, no cache
    t = h.shape[0]
    q = _rope((h @ w["wq"][layer]).reshape(t, c.num_heads, c.head_dim), c.rope_theta)
    k = _rope((h @ w["wk"][layer]).reshape(t, c.num_kv_heads, c.head_dim), c.rope_theta)
    v = (h @ w["wv"][layer]).reshape(t, c.num_kv_heads, c.head_dim)
    group = c.num_heads // c.num_kv_heads
    out = np.zeros((t, c.num_heads, c.head_dim))
    for head in range(c.num_heads):
        kv = head // group
        s = q[:, head] @ k[:, kv].T / np.sqrt(c.head_dim)
        s = np.where(np.tri(t, dtype=bool), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
    return out.reshape(t, -1) @ w["wo"][layer]


def _swiglu(x, gate, up, down):
    g = x @ gate
    return (g / (1 + np.exp(-g)) * (x @ up)) @ down


def _reference_moe(c, mlp, experts, layer, h):
    from jax_eplb.moe import RouterWeights, route

    router = RouterWeights(jnp.asarray(mlp["router_kernel"][layer], jnp.float32),
                           jnp.asarray(mlp["correction_bias"][layer], jnp.float32))
    ids = np.asarray(jax.jit(route, static_argnums=0)(c.moe, router, jnp.asarray(h, jnp.float32)).expert_ids)
    weights = numpy_combine_weights(c.moe, numpy_router_scores(c.moe, mlp["router_kernel"][layer], h), ids)
    out = _swiglu(h, *(mlp["shared"][k][layer] for k in ("gate", "up", "down"))) if "shared" in mlp else 0.0
    for e in range(c.num_experts):
        gate = np.sum(np.where(ids == e, weights, 0.0), axis=1)
        if gate.any():
            out = out + gate[:, None] * _swiglu(h, *(np.asarray(m[layer, e], np.float64) for m in experts))
    return out


def _reference_layers(c, w, experts, layers, x):
    for layer in layers:
        x = x + _attention(c, w["attention"], layer, _norm(x, w["attention_norm"]["weight"][layer], c.rms_norm_eps))
        h = _norm(x, w["mlp_norm"]["weight"][layer], c.rms_norm_eps)
        if experts is None:
            x = x + _swiglu(h, *(w["mlp"][k][layer] for k in ("gate", "up", "down")))
        else:
            x = x + _reference_moe(c, w["mlp"], experts, layer, h)
    return x


@pytest.fixture(scope="session")
def small():
    return SmallModels()
