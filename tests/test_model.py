"""The sharded MoE transformer generates exactly what an independent dense single-device model does,
under any ep size and placement, and checkpoints restore onto any mesh and placement."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jax_eplb import EplbInputError, build_assignment_tables, plan_placement
from jax_eplb.model import (ModelConfig, MoEOptions, MoETransformer, create_random_checkpoint, init_weights,
                            restore_checkpoint, restore_logical_experts)
from jax_eplb.moe import RouterWeights, route

SMALL = {"model": dict(name="small", vocab_size=64, hidden_size=32, num_layers=3, first_k_dense=1, num_heads=4,
                       num_kv_heads=2, head_dim=8, dense_ffn_size=48, num_experts=16, top_k=4, expert_ffn_size=16,
                       num_shared_experts=1, max_seq_len=24, router="deepseek", n_group=4, topk_group=2,
                       routed_scaling_factor=2.0, router_bias_scale=0.05, init_std=0.2, router_logit_std=1.0)}


def small_config(**overrides):
    return dataclasses.replace(ModelConfig.from_dict(SMALL, "small.yaml"), **overrides)


def mesh_of(ranks):
    devices = jax.devices() if len(jax.devices()) >= ranks else jax.devices("cpu")
    return Mesh(np.array(devices[:ranks]), ("ep",))


# ----------------------------------------------------------------------------- independent reference

def _norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta):  # x [T, N, Dh], positions 0..T-1
    t, _, d = x.shape
    half = d // 2
    angle = np.arange(t)[:, None, None] * theta ** (-np.arange(half) / half)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


def _attention(c, w, layer, x):  # x [T, H], full causal attention, no cache
    h = _norm(x, np.asarray(w.norm[layer]), c.rms_norm_eps)
    t = x.shape[0]
    q = _rope((h @ np.asarray(w.wq[layer])).reshape(t, c.num_heads, c.head_dim), c.rope_theta)
    k = _rope((h @ np.asarray(w.wk[layer])).reshape(t, c.num_kv_heads, c.head_dim), c.rope_theta)
    v = (h @ np.asarray(w.wv[layer])).reshape(t, c.num_kv_heads, c.head_dim)
    group = c.num_heads // c.num_kv_heads
    out = np.zeros((t, c.num_heads, c.head_dim))
    for head in range(c.num_heads):
        kv = head // group
        s = q[:, head] @ k[:, kv].T / np.sqrt(c.head_dim)
        s = np.where(np.tri(t, dtype=bool), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
    return x + out.reshape(t, -1) @ np.asarray(w.wo[layer])


def _swiglu(x, gate, up, down):
    g = x @ gate
    return (g / (1 + np.exp(-g)) * (x @ up)) @ down


_route = jax.jit(route, static_argnums=0)


def reference_next_token(c, w, tokens):
    """Greedy next token of one sequence, recomputing everything (float64 NumPy; the router's
    top-k selection comes from the block's router function, the MoE is a loop over experts)."""
    x = w.embed[np.asarray(tokens)]
    for layer in range(c.first_k_dense):
        x = _attention(c, w.dense.attention, layer, x)
        x = x + _swiglu(_norm(x, w.dense.mlp_norm[layer], c.rms_norm_eps), *(m[layer] for m in w.dense.mlp))
    moe = w.moe
    for layer in range(c.num_moe_layers):
        x = _attention(c, moe.attention, layer, x)
        h = _norm(x, moe.mlp_norm[layer], c.rms_norm_eps)
        routing = _route(c.moe, RouterWeights(jnp.asarray(moe.router.kernel[layer], jnp.float32),
                                             jnp.asarray(moe.router.correction_bias[layer], jnp.float32)),
                        jnp.asarray(h, jnp.float32))
        ids, weights = np.asarray(routing.expert_ids), np.asarray(routing.weights, np.float64)
        out = _swiglu(h, *(e[layer] for e in moe.shared))
        for e in range(c.num_experts):
            gate = np.sum(np.where(ids == e, weights, 0.0), axis=1)
            if gate.any():
                out = out + gate[:, None] * _swiglu(h, *(m[layer, e] for m in moe.experts))
        x = x + out
    final = _norm(x[-1], np.asarray(w.final_norm), c.rms_norm_eps)
    return int(np.argmax(final @ np.asarray(w.lm_head)))


def generate(model, prompts, steps):
    b = len(prompts)
    width = max(map(len, prompts))
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    out = model.prefill(tokens, lengths, model.new_cache(b))
    result = [[int(t)] for t in np.asarray(out.next_token)]
    positions = lengths.copy()
    for _ in range(steps - 1):
        out = model.decode(np.asarray(out.next_token), positions, np.ones(b, bool), out.cache)
        positions += 1
        for i, t in enumerate(np.asarray(out.next_token)):
            result[i].append(int(t))
    return result


def build(config, ranks, slot_to_expert, seed=0, **options):
    mesh = mesh_of(ranks)
    return MoETransformer(config, mesh, init_weights(config, seed, mesh, slot_to_expert), build_assignment_tables(slot_to_expert, config.num_experts),
                          MoEOptions(**options))


PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], [60, 2, 11, 40, 33, 17, 5, 9], [12, 0, 4, 4],
           [7], [50, 51, 52, 53, 54, 55], [9, 9], [31, 30, 2, 2, 2]]


@pytest.mark.parametrize("ranks,placement,options", [
    (1, "identity", {}),
    (4, "random", {"moe_max_num_tokens": 8}),
    (2, "random", {"grouped_matmul": "pallas_interpret"}),
    (2, "planned", {"replica_policy": "load_aware", "grouped_matmul": "ragged_dot"}),
])
def test_generation_matches_dense_reference(ranks, placement, options):
    config = small_config()
    rng = np.random.default_rng(ranks)
    lm, e = config.num_moe_layers, config.num_experts
    if placement == "identity":
        slot_to_expert = np.tile(np.arange(e), (lm, 1))
    elif placement == "random":
        slot_to_expert = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, 8)]))
                                   for _ in range(lm)])
    else:
        slot_to_expert = plan_placement(rng.lognormal(0, 1, (lm, e)), 24, ranks).slot_to_expert
    model = build(config, ranks, slot_to_expert, **options)
    got = generate(model, PROMPTS, steps=5)
    logical = jax.tree.map(lambda a: np.asarray(a, np.float64), init_weights(config, 0, mesh=None))
    for prompt, tokens in zip(PROMPTS, got):
        want, seq = [], list(prompt)
        for _ in range(5):
            want.append(reference_next_token(config, logical, seq))
            seq.append(want[-1])
        assert tokens == want


def test_same_tokens_under_every_ep_size_and_placement():
    config = small_config()
    rng = np.random.default_rng(0)
    runs = []
    for ranks, slots in ((1, 16), (2, 16), (4, 32), (8, 32)):
        slot_to_expert = np.stack([rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, slots - 16)]))
                                   for _ in range(config.num_moe_layers)])
        runs.append(generate(build(config, ranks, slot_to_expert), PROMPTS, steps=6))
    assert all(r == runs[0] for r in runs[1:])


def test_checkpoint_restores_onto_other_meshes_and_placements(tmp_path):
    config = small_config()
    create_random_checkpoint(tmp_path / "ckpt", config, seed=5)
    logical = restore_logical_experts(tmp_path / "ckpt", config)
    assert logical.gate.shape == (config.num_moe_layers, config.num_experts, config.hidden_size,
                                  config.expert_ffn_size)
    rng = np.random.default_rng(1)
    outputs = []
    for ranks, slots in ((2, 16), (8, 24)):
        slot_to_expert = np.stack([rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, slots - 16)]))
                                   for _ in range(config.num_moe_layers)])
        mesh = mesh_of(ranks)
        weights = restore_checkpoint(tmp_path / "ckpt", config, mesh, slot_to_expert)
        assert weights.moe.experts.gate.shape[1] == slots
        for layer in range(config.num_moe_layers):  # slot s holds its expert's logical weights
            np.testing.assert_array_equal(np.asarray(weights.moe.experts.down[layer]),
                                          logical.down[layer][slot_to_expert[layer]])
        model = MoETransformer(config, mesh, weights, build_assignment_tables(slot_to_expert, 16))
        outputs.append(generate(model, PROMPTS, steps=4))
    assert outputs[0] == outputs[1]
    # Seeded random weights placed directly equal the checkpoint's.
    assert generate(build(config, 2, np.tile(np.arange(16), (2, 1)), seed=5), PROMPTS, 4) == outputs[0]
    with pytest.raises(EplbInputError, match="already exists"):
        create_random_checkpoint(tmp_path / "ckpt", config)
    with pytest.raises(EplbInputError, match="different model"):
        restore_checkpoint(tmp_path / "ckpt", small_config(hidden_size=64), mesh_of(2), np.tile(np.arange(16), (2, 1)))


def test_set_placement_changes_nothing_but_the_layout():
    config = small_config()
    identity = np.tile(np.arange(16), (2, 1))
    model = build(config, 4, np.concatenate([identity, identity[:, :8]], axis=1) % 16)
    before = generate(model, PROMPTS, 4)
    compiled = model._step._cache_size()
    rng = np.random.default_rng(3)
    new = np.stack([rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, 8)])) for _ in range(2)])
    model.set_placement(build_assignment_tables(new, 16), init_weights(config, 0, mesh=None).moe.experts)
    assert generate(model, PROMPTS, 4) == before
    assert model._step._cache_size() == compiled  # same shapes: no recompilation


@pytest.mark.parametrize("bad,match", [
    ({"first_k_dense": 3}, "first_k_dense"),
    ({"num_kv_heads": 3}, "multiple"),
    ({"dtype": "float16"}, "dtype"),
    ({"n_group": 5}, "divisible"),
    ({"colour": 1}, "unknown"),
])
def test_bad_model_configs(bad, match):
    raw = {"model": {**SMALL["model"], **bad}}
    with pytest.raises(EplbInputError, match=match):
        ModelConfig.from_dict(raw, "bad.yaml")


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3_slice"])
def test_shipped_configs_build(name):
    """Shipped configs load and their weights have the advertised shapes (abstractly: no memory)."""
    from jax_eplb.model import load_model_config

    config = load_model_config(name)
    assert config.num_experts >= 64 and config.top_k >= 4 and config.n_group > 1 and config.router == "deepseek"
    shapes = jax.eval_shape(lambda: init_weights(config, 0, mesh=None))
    lm = config.num_layers - config.first_k_dense
    assert shapes.moe.experts.gate.shape == (lm, config.num_experts, config.hidden_size, config.expert_ffn_size)
    if name == "deepseek_v3_slice":
        assert (config.hidden_size, config.expert_ffn_size, config.num_experts, config.top_k) == (7168, 2048, 256, 8)
