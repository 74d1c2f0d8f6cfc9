"""The EP MoE block equals a dense single-device MoE under every placement, transport setting and ep size."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_eplb import build_assignment_tables, mask_failed_ranks, plan_placement
from jax_eplb.moe._transport import resolve_transport
from jax_eplb.moe import (EPMoEBlock, ExpertWeights, MoEConfig, MoEOptions, RouterWeights, all_to_all_moe,
                          chunk_sizes, dispatch_plan, ep_moe_forward, load_aware_slots, round_robin_slots,
                          slot_weights_from_logical)

E, H, F = 8, 16, 8


def make_weights(seed=0, config=None):
    k = jax.random.split(jax.random.key(seed), 5)
    logical = ExpertWeights(jax.random.normal(k[0], (E, H, F)) * 0.3, jax.random.normal(k[1], (E, H, F)) * 0.3,
                            jax.random.normal(k[2], (E, F, H)) * 0.3)
    router = RouterWeights(jax.random.normal(k[3], (H, E)), jax.random.normal(k[4], (E,)) * 0.1)
    return logical, router


def placement(kind, ranks, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "identity":
        return np.arange(E)
    num_slots = 16
    if kind == "random":
        return rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, num_slots - E)]))
    load = rng.lognormal(0, 1, size=(1, E))
    return plan_placement(load, num_slots, ranks).slot_to_expert[0]  # from the planner


def run_block(mesh, config, logical, router, x, slot_to_expert, policy, max_tokens, **options):
    """-> (out [T, H], slot counts [R, S]) of the EP block."""
    ranks = mesh.shape["ep"]
    tables = build_assignment_tables(slot_to_expert, config.num_experts)
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    options = MoEOptions(replica_policy=policy, moe_max_num_tokens=max_tokens, record=("slot",), **options)
    fn = jax.jit(functools.partial(ep_moe_forward, config, mesh, options=options))
    result = fn(router, slots, x, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]))
    # The in-graph per-rank load must agree with the recorded slot histogram.
    np.testing.assert_array_equal(np.asarray(result.rank_load),
                                  np.asarray(result.slot_counts).sum(0).reshape(ranks, -1).sum(1))
    return result.out, result.slot_counts


def assert_close(out, ref):
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 1e-5, err


@pytest.mark.parametrize("ranks,kind", [(1, "identity"), (2, "random"), (4, "planned"), (4, "identity"),
                                        (8, "random"), (8, "planned")])
@pytest.mark.parametrize("policy", ["round_robin", "load_aware"])
def test_matches_dense_reference(ranks, kind, policy, mesh_of, dense_moe):
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2)
    logical, router = make_weights(ranks)
    x = jax.random.normal(jax.random.key(7), (32, H))
    slot_to_expert = placement(kind, ranks, seed=ranks)
    max_tokens = 8 if kind == "random" else None  # chunked and unchunked
    matmul = {"planned": "ragged_dot", "random": "padded", "identity": "pallas_interpret"}[kind]
    out, counts = run_block(mesh_of(ranks), config, logical, router, x, slot_to_expert, policy, max_tokens,
                            grouped_matmul=matmul)
    assert_close(out, dense_moe(config, router, logical, x))
    assert int(counts.sum()) == 32 * 2  # every entry served, none dropped


@pytest.mark.parametrize("policy", ["round_robin", "load_aware"])
def test_failed_rank_slots_serve_nothing(policy, mesh_of, dense_moe):
    """Unused slots (-1): a re-plan onto the serving ranks and TensorRT-LLM's mask-only drop of a rank."""
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2)
    logical, router = make_weights(3)
    x = jax.random.normal(jax.random.key(5), (32, H))
    load = np.random.default_rng(3).lognormal(0, 1, size=(1, E))
    replanned = plan_placement(load, 16, 4, failed_ranks=[1]).slot_to_expert[0]
    # mask-only: every expert on rank 2 has a replica elsewhere in this layout
    in_force = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7])
    masked = mask_failed_ranks(in_force, 4, [2])[0]
    for slot_to_expert, failed in ((replanned, 1), (masked, 2)):
        out, counts = run_block(mesh_of(4), config, logical, router, x, slot_to_expert, policy, None)
        assert_close(out, dense_moe(config, router, logical, x))
        per_rank = np.asarray(counts).sum(0).reshape(4, -1).sum(1)
        assert per_rank[failed] == 0 and per_rank.sum() == 32 * 2, per_rank


@pytest.mark.parametrize("ranks,policy", [(2, "load_aware"), (8, "round_robin")])
def test_ragged_transport_offsets_match_dense_reference(ranks, policy, ragged_emulation, mesh_of, dense_moe):
    """The ragged transport's offsets and layouts, with the primitive emulated (XLA:CPU lacks it)."""
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2)
    logical, router = make_weights(ranks + 10)
    x = jax.random.normal(jax.random.key(8), (32, H))
    slot_to_expert = placement("random", ranks, seed=ranks + 1)
    for max_tokens in (None, 8):
        out, counts = run_block(mesh_of(ranks), config, logical, router, x, slot_to_expert, policy, max_tokens,
                                transport="ragged", ragged_exchange=ragged_emulation)
        assert_close(out, dense_moe(config, router, logical, x))
        assert int(counts.sum()) == 64


def test_token_mask_and_record_modes(mesh_of, dense_moe):
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2)
    logical, router = make_weights(4)
    mesh = mesh_of(4)
    x = jax.random.normal(jax.random.key(9), (16, H))
    mask = jnp.arange(16) % 3 != 0
    slot_to_expert = placement("random", 4, seed=9)
    tables = build_assignment_tables(slot_to_expert, E)
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    args = (router, slots, x, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]))
    ref = dense_moe(config, router, logical, x) * mask[:, None]
    forward = jax.jit(ep_moe_forward, static_argnums=(0, 1), static_argnames=("options",))
    every = MoEOptions(record=("expert", "slot", "expert_total", "traffic"))
    by_expert = forward(config, mesh, *args, token_mask=mask, options=every)
    assert_close(by_expert.out, ref)
    ids = np.asarray(jax.jit(lambda x: __import__("jax_eplb").moe.route(config, router, x).expert_ids)(x))
    want = np.zeros((4, E), np.int64)
    for t in range(16):
        if mask[t]:
            np.add.at(want[t // 4], ids[t], 1)  # rank t // 4 holds token t
    np.testing.assert_array_equal(np.asarray(by_expert.expert_counts), want)
    np.testing.assert_array_equal(np.asarray(by_expert.expert_totals), want.sum(0))  # psum-ed in the step
    slots = np.asarray(by_expert.slot_counts)  # [R, S]: each slot's entries are its expert's
    np.testing.assert_array_equal(np.bincount(np.asarray(slot_to_expert), weights=slots.sum(0), minlength=E),
                                  want.sum(0))
    # entry-mode rows each rank sent to each rank = its slot histogram summed per destination rank
    np.testing.assert_array_equal(np.asarray(by_expert.dispatch_rows)[:, 0], slots.reshape(4, 4, -1).sum(-1))
    plain = forward(config, mesh, *args, token_mask=mask)
    assert plain.expert_counts is None and plain.slot_counts is None and plain.expert_totals is None
    assert plain.dispatch_rows is None
    np.testing.assert_array_equal(np.asarray(plain.rank_load), np.asarray(by_expert.rank_load))
    assert int(plain.rank_load.sum()) == int(mask.sum()) * 2


@pytest.mark.parametrize("method", ["padded", "pallas_interpret", "tokamax"])
@pytest.mark.parametrize("rows,tile", [(1, 4), (37, 8), (64, 64)])
def test_grouped_matmuls_equal_ragged_dot(rows, tile, method):
    from jax_eplb.moe import expert_compute, tokamax_unavailable

    if method == "tokamax" and tokamax_unavailable():
        pytest.skip(f"{tokamax_unavailable()} (the gpu extra, tested on the newest JAX line)")
    rng = np.random.default_rng(rows)
    m = 5
    x = jnp.asarray(rng.normal(size=(rows, H)), jnp.float32)
    row_slot = jnp.asarray(rng.integers(0, m + 1, size=rows), jnp.int32)  # m = empty row
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((m, H, F), (m, H, F), (m, F, H))]
    a = expert_compute(x, row_slot, *w, grouped_matmul="ragged_dot")
    b = expert_compute(x, row_slot, *w, grouped_matmul=method, tile=tile)
    scale = float(np.max(np.abs(np.asarray(a)))) or 1.0  # float32 sums in another order: relative to the output
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)
    assert not np.any(np.asarray(b)[np.asarray(row_slot) == m])


@pytest.mark.parametrize("method", ["ragged_dot", "padded", "pallas_interpret"])
def test_biased_clamped_experts_equal_numpy(method):
    """gpt-oss' experts (``ExpertFunction``: bias rows, clamped SwiGLU) against NumPy written from the
    formula: ``(clip(up, -l, l) + 1) * g * sigmoid(a * g)``, ``g = min(gate, l)``, biases added."""
    from jax_eplb.moe import ExpertFunction, expert_compute

    rng = np.random.default_rng(7)
    m, rows, limit, alpha = 3, 19, 0.6, 1.702
    x = rng.normal(size=(rows, H)).astype(np.float32)
    row_slot = rng.integers(0, m + 1, size=rows)  # m = empty row
    gate, up = (rng.normal(size=(m, H + 1, F)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(m, F + 1, H)).astype(np.float32)
    want = np.zeros((rows, H), np.float32)
    for i, s in enumerate(row_slot):
        if s == m:
            continue
        g = np.minimum(x[i] @ gate[s, :H] + gate[s, H], limit)
        u = np.clip(x[i] @ up[s, :H] + up[s, H], -limit, limit)
        hidden = (u + 1) * g / (1 + np.exp(-alpha * g))
        want[i] = hidden @ down[s, :F] + down[s, F]
    function = ExpertFunction("clamped_swiglu", alpha, limit, bias=True)
    got = expert_compute(jnp.asarray(x), jnp.asarray(row_slot, jnp.int32), *map(jnp.asarray, (gate, up, down)),
                         grouped_matmul=method, tile=8, function=function)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("policy", ["round_robin", "load_aware"])
def test_deepseek_router_with_shared_experts_via_nnx_module(policy, mesh_of, dense_moe):
    """The NNX block: tables as its variables, a new placement swapped in without recompiling."""
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=3, router="deepseek", n_group=4,
                       topk_group=2, routed_scaling_factor=2.5, num_shared_experts=1)
    slot_to_expert = placement("random", 4, seed=3)
    tables = build_assignment_tables(slot_to_expert, E, max_replicas=16 - E + 1)
    block = EPMoEBlock(config, mesh_of(4), tables.layer(0), rngs=nnx.Rngs(0),
                       options=MoEOptions(replica_policy=policy, moe_max_num_tokens=16))
    k = jax.random.split(jax.random.key(1), 3)
    logical = ExpertWeights(jax.random.normal(k[0], (E, H, F)), jax.random.normal(k[1], (E, H, F)),
                            jax.random.normal(k[2], (E, F, H)))
    block.set_placement(tables.layer(0), logical)
    block.correction_bias.set_value(jnp.linspace(-0.5, 0.5, E))
    x = jax.random.normal(jax.random.key(2), (24, H))
    forward = nnx.jit(lambda block, x: block(x).out)
    out = forward(block, x)
    shared = [block.shared.gate.get_value(), block.shared.up.get_value(), block.shared.down.get_value()]
    assert_close(out, dense_moe(config, block.router(), logical, x, shared=shared))
    other = build_assignment_tables(placement("planned", 4, seed=5), E, max_replicas=16 - E + 1)
    block.set_placement(other.layer(0), logical)
    assert_close(forward(block, x), out)  # same function under another placement
    np.testing.assert_array_equal(block.tables().slot_to_expert, other.slot_to_expert[0])


@pytest.mark.parametrize("policy", ["round_robin", "load_aware"])
def test_dropless_when_every_token_picks_one_expert(policy, mesh_of, dense_moe):
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2)
    logical, router = make_weights(1)
    kernel = jnp.zeros((H, E)).at[:, 3].set(5.0).at[:, 5].set(2.0)
    router = RouterWeights(kernel, router.correction_bias)
    x = jnp.abs(jax.random.normal(jax.random.key(3), (64, H))) + 0.1
    slot_to_expert = placement("random", 4, seed=5)
    out, counts = run_block(mesh_of(4), config, logical, router, x, slot_to_expert, policy, 32)
    assert_close(out, dense_moe(config, router, logical, x))
    assert int(counts.sum()) == 128


def test_invalid_expert_ids_contribute_nothing(mesh_of):
    mesh = mesh_of(4)
    slot_to_expert = placement("random", 4, seed=2)
    tables = build_assignment_tables(slot_to_expert, E)
    logical, _ = make_weights(2)
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    x = jax.random.normal(jax.random.key(4), (16, H))
    ids = jnp.asarray(np.random.default_rng(0).integers(-2, E + 2, size=(16, 2)), jnp.int32)
    weights = jnp.ones((16, 2), jnp.float32)

    @jax.jit
    def run(x, ids):
        def body(x, ids, g, u, d, rc, es):
            s = round_robin_slots(ids, rc, es, 16, jax.lax.axis_index("ep")).slot_ids
            return all_to_all_moe(x, weights[: x.shape[0]], s, g, u, d, "ep")[0]
        return jax.shard_map(body, mesh=mesh, in_specs=(jax.P("ep"), jax.P("ep")) + (jax.P("ep"),) * 3 + (jax.P(),) * 2,
                             out_specs=jax.P("ep"), check_vma=False)(
            x, ids, *slots, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]))

    out = run(x, ids)
    valid = (ids >= 0) & (ids < E)
    ref = jnp.zeros((16, H))
    from jax_eplb.moe import swiglu
    for e in range(E):
        w = jnp.sum(jnp.where(ids == e, 1.0, 0.0), axis=1)
        ref = ref + w[:, None] * swiglu(x, logical.gate[e], logical.up[e], logical.down[e])
    assert bool(jnp.all(jnp.isfinite(out)))
    assert_close(out, ref)
    assert int((~valid).sum()) > 0


def test_token_plan_hand_worked():
    from jax_eplb.moe._dispatch import token_plan

    # 2 ranks x 2 local slots; slot 4 = invalid. Token 0 -> slots 3, 2 (rank 1 twice); token 1 -> 1, 4;
    # token 2 -> 2, 0 (both ranks).
    plan = token_plan(jnp.array([[3, 2], [1, 4], [2, 0]]), num_ranks=2, slots_per_rank=2)
    assert plan.destination.tolist() == [1, 2, 0, 2, 1, 0]  # entry (t, k); only a token's first entry per rank
    assert np.asarray(plan.position)[[0, 2, 4, 5]].tolist() == [0, 0, 1, 1]
    assert plan.local_slots.tolist() == [[1, 0], [1, 0], [1, 2], [2, 2], [0, 2], [2, 0]]
    assert plan.send_counts.tolist() == [2, 2] and plan.entry_counts.tolist() == [2, 3]


def test_entry_and_token_dispatch_equal_the_dense_reference(ragged_emulation, mesh_of, dense_moe):
    """Both dispatch modes through the ragged exchange (emulated); all_to_all runs token mode in every
    other test here and entry mode in the model's dense-reference test."""
    transport = "ragged"
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=4)
    logical, router = make_weights(21)
    x = jax.random.normal(jax.random.key(21), (32, H))
    slot_to_expert = placement("random", 4, seed=21)
    ref = dense_moe(config, router, logical, x)
    for dispatch in ("entry", "token"):
        out, counts = run_block(mesh_of(4), config, logical, router, x, slot_to_expert, "load_aware", None,
                                transport=transport, dispatch=dispatch,
                                ragged_exchange=ragged_emulation if transport == "ragged" else None)
        assert_close(out, ref)
        assert int(counts.sum()) == 32 * 4  # entries served, counted the same way in both modes


def test_auto_transport_is_timed_once_per_mesh_and_shape_on_gpu(monkeypatch, capsys, ragged_emulation, mesh_of):
    """Pretend-GPU mesh: 'auto' times both transports at the layer's shapes and says so in one line; a
    ragged exchange that differs is out; explicit transports and CPU meshes are not measured."""
    import jax_eplb.moe._transport as transport_module
    from jax_eplb.moe import ExpertShapes
    from jax_eplb_kernels import _probe

    mesh = mesh_of(4)
    assert resolve_transport(MoEOptions(), mesh).transport == "all_to_all"  # CPU: nothing measured
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_probe, "_choices", {})
    monkeypatch.setattr(transport_module, "platform", lambda mesh: "gpu")
    shapes = ExpertShapes(rows=16 * 2, hidden=32, ffn=16, local_slots=3, dtype="float32")

    def wrong(operand, output, *args, axis_name):  # drops the last row of every block
        return ragged_emulation(operand, output, *args, axis_name=axis_name).at[-1].set(0)

    good = resolve_transport(MoEOptions(ragged_exchange=ragged_emulation), mesh, shapes, 2).transport
    line = capsys.readouterr().err.strip()
    assert good in ("ragged", "all_to_all") and line.endswith(f"-> {good}")
    assert line.startswith("EP transport on 4 devices (16 tokens x top-2 per rank, hidden 32, float32): all_to_all ")
    assert re.search(r"all_to_all \d+\.\d us", line) and re.search(r"ragged \d+\.\d us", line)  # both timed
    for _ in range(2):
        assert resolve_transport(MoEOptions(ragged_exchange=wrong), mesh, shapes, 2).transport == "all_to_all"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ragged out (differs from the reference)" in lines[0]  # measured once per key
    assert len(_probe._choices) == 2
    explicit = MoEOptions(transport="ragged", ragged_exchange=wrong)
    assert resolve_transport(explicit, mesh) is explicit


def test_traffic_accounting_hand_worked_and_equal_to_the_send_counts():
    from jax_eplb.moe._dispatch import token_plan
    from jax_eplb.moe._traffic import layer_traffic, rows_to_ranks

    # 2 ranks x 2 local slots, 3 tokens per rank, top-2; slot 4 = invalid.
    slot_ids = np.array([[[3, 2], [1, 4], [2, 0]],    # rank 0: token rows to rank 1: 2; entries to rank 1: 3
                         [[0, 1], [2, 3], [0, 2]]])   # rank 1: token rows to rank 0: 2; entries to rank 0: 3
    for dispatch, plan, to_other in (("token", token_plan, 2), ("entry", dispatch_plan, 3)):
        rows = rows_to_ranks(slot_ids, 2, dispatch)
        for rank in range(2):
            np.testing.assert_array_equal(rows[rank], plan(jnp.asarray(slot_ids[rank]), 2, 2).send_counts)
        hidden, payload = 10, 2 * 8 if dispatch == "token" else 4
        ragged = layer_traffic(slot_ids, 2, hidden, "ragged", dispatch)
        assert ragged.real_rows.tolist() == [to_other, to_other]
        # out: rows x (H x 2 bytes + payload); back: the rows it served for the other rank, float32
        assert ragged.sent_bytes.tolist() == [to_other * (hidden * 2 + payload) + to_other * hidden * 4] * 2
        block = 3 if dispatch == "token" else 6
        fixed = layer_traffic(slot_ids, 2, hidden, "all_to_all", dispatch)
        assert fixed.sent_bytes.tolist() == [block * (hidden * 2 + payload) + block * hidden * 4] * 2
        assert fixed.receive_buffer_bytes == ragged.receive_buffer_bytes == 2 * block * (hidden * 2 + payload)


def test_recorded_dispatch_rows_count_tokens_once_per_rank(mesh_of):
    """One slot per expert (slot = expert id): the rows recorded in the step, summed over MoE chunks,
    equal the tokens (entries) each rank's routing sends to each rank, counted by hand."""
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=4)
    logical, router = make_weights(5)
    ranks, tokens = 4, 24
    x = jax.random.normal(jax.random.key(5), (tokens, H))
    mask = jnp.arange(tokens) % 5 != 0
    identity = np.arange(E)
    tables = build_assignment_tables(identity, E)
    options = MoEOptions(record=("traffic",), moe_max_num_tokens=8)  # 3 chunks of 2 tokens per rank
    result = jax.jit(functools.partial(ep_moe_forward, config, mesh_of(ranks), options=options))(
        router, slot_weights_from_logical(logical, identity, mesh_of(ranks)), x,
        jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), token_mask=mask)
    ids = np.asarray(jax.jit(lambda x: __import__("jax_eplb").moe.route(config, router, x).expert_ids)(x))
    want = np.zeros((ranks, 2, ranks), np.int64)  # [src, entry/token, dst]
    for t in np.flatnonzero(np.asarray(mask)):
        dst = ids[t] // (E // ranks)
        np.add.at(want[t // (tokens // ranks), 0], dst, 1)
        want[t // (tokens // ranks), 1, np.unique(dst)] += 1
    np.testing.assert_array_equal(np.asarray(result.dispatch_rows), want)
    assert (want[:, 1] < want[:, 0]).any()  # some token has two experts on one rank


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the auto transport is measured on GPUs only")
def test_auto_transport_on_gpu_takes_a_transport_that_matched(mesh_of, capsys):
    chosen = resolve_transport(MoEOptions(), mesh_of(len(jax.devices()))).transport
    if len(jax.devices()) == 1:  # one rank: nothing travels, nothing is measured
        assert chosen == "all_to_all" and capsys.readouterr().err == ""
        return
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f"-> {chosen}") and "all_to_all" in line and "ragged" in line


def test_dispatch_plan_hand_worked():
    # 2 ranks x 2 local slots; slot 4 = invalid.
    plan = dispatch_plan(jnp.array([[3, 0], [1, 4], [2, 3]]), num_ranks=2, slots_per_rank=2)
    assert plan.destination.tolist() == [1, 0, 0, 2, 1, 1]
    assert np.asarray(plan.position)[[0, 1, 2, 4, 5]].tolist() == [0, 0, 1, 1, 2]  # entry 3 is invalid
    assert plan.local_slot.tolist() == [1, 0, 1, 2, 0, 1]
    assert plan.send_counts.tolist() == [2, 3]


def test_chunk_sizes_follow_trtllm_rule():
    assert chunk_sizes(10, 4, None) == [10]
    assert chunk_sizes(10, 4, 16) == [4, 3, 3]  # ceil(40 / 16) = 3 chunks
    assert sum(chunk_sizes(7, 8, 5)) == 7


def _rank_loads(slots, num_ranks, slots_per_rank):
    s = np.asarray(slots).reshape(-1)
    return np.bincount(s[s < num_ranks * slots_per_rank] // slots_per_rank, minlength=num_ranks)


def test_load_aware_is_at_least_as_even_as_round_robin(mesh_of):
    """On skewed batches the realized per-rank load of load_aware never exceeds round_robin's max, is the
    NumPy split model's up to the integer rounding (one entry per replica on a rank), and is lower in sum."""
    from jax_eplb.planning import split_rank_loads

    mesh = mesh_of(4)
    rng = np.random.default_rng(0)
    peaks = {"rr": 0, "la": 0}
    for trial in range(4):
        popularity = rng.lognormal(0, 1.2, E)
        slot_to_expert = plan_placement(popularity[None], 16, 4).slot_to_expert[0]
        tables = build_assignment_tables(slot_to_expert, E)
        ids = jnp.asarray(rng.choice(E, size=(64, 2), p=popularity / popularity.sum()), jnp.int32)

        def body(ids, rc, es, policy):
            rank = jax.lax.axis_index("ep")
            if policy == "rr":
                return round_robin_slots(ids, rc, es, 16, rank).slot_ids
            return load_aware_slots(ids, rc, es, 16, rank, "ep").slot_ids

        loads = {}
        for policy in ("rr", "la"):
            fn = jax.jit(jax.shard_map(functools.partial(body, policy=policy), mesh=mesh,
                                       in_specs=(jax.P("ep"), jax.P(), jax.P()), out_specs=jax.P("ep"),
                                       check_vma=False))
            slots = fn(ids, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]))
            # every entry still goes to a replica of its own expert
            np.testing.assert_array_equal(slot_to_expert[np.asarray(slots)], np.asarray(ids))
            loads[policy] = _rank_loads(slots, 4, 4)
            peaks[policy] += int(loads[policy].max())
        assert loads["la"].max() <= loads["rr"].max()
        model = split_rank_loads(slot_to_expert, np.bincount(np.asarray(ids).ravel(), minlength=E)[None], 4)[0, 0]
        assert loads["la"].max() <= np.ceil(model.max()) + 4  # 4 slots per rank: at most one entry more each
    assert peaks["la"] < peaks["rr"]


def test_replica_quotas_water_fill_hand_worked():
    from jax_eplb.moe import replica_quotas

    # ranks: [slot0=e0, slot1=e1 | slot2=e0, slot3=e2]; counts e0=10, e1=6, e2=2.
    tables = build_assignment_tables(np.array([0, 1, 0, 2]), 3)
    quotas = replica_quotas(jnp.array([10, 6, 2]), jnp.asarray(tables.replica_count[0]),
                            jnp.asarray(tables.expert_slots[0]), slots_per_rank=2, num_ranks=2)
    # water level 9: rank 0 (base 6) takes 3 of e0, rank 1 (base 2) takes 7.
    assert np.asarray(quotas).tolist() == [[3, 7], [6, 0], [2, 0]]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="ragged_all_to_all runs on GPU only (scripts/gpu_check.sh)")
@pytest.mark.parametrize("policy", ["round_robin", "load_aware"])
def test_ragged_transport_real_primitive_on_gpu(policy, mesh_of, dense_moe):
    ranks = len(jax.devices())
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2)
    logical, router = make_weights(3)
    x = jax.random.normal(jax.random.key(5), (8 * ranks, H))
    slot_to_expert = placement("random", ranks, seed=4) if 16 % ranks == 0 else np.arange(E)
    for max_tokens in (None, 4 * ranks):
        out, _ = run_block(mesh_of(ranks), config, logical, router, x, slot_to_expert, policy, max_tokens,
                           transport="ragged",
                           grouped_matmul="ragged_dot")
        assert_close(out, dense_moe(config, router, logical, x))


def test_auto_grouped_matmul_is_measured_at_the_layer_shapes(monkeypatch, capsys):
    """On a (pretend) GPU, 'auto' times ragged_dot against tokamax (where it can run) and, on JAX < 0.11,
    our Triton kernel (which cannot compile here: out); on CPU it is 'padded' with nothing measured."""
    from jax_eplb.moe import ExpertShapes, tokamax_unavailable
    from jax_eplb.moe import resolve_grouped_matmul
    from jax_eplb_kernels import _probe, triton_in_auto

    monkeypatch.setattr(_probe, "_choices", {})
    shapes = ExpertShapes(rows=40, hidden=16, ffn=8, local_slots=3, dtype="float32")
    assert resolve_grouped_matmul("auto", "cpu", shapes) == "padded" and capsys.readouterr().err == ""
    chosen = resolve_grouped_matmul("auto", "gpu", shapes)
    line = capsys.readouterr().err.strip()
    has_tokamax = tokamax_unavailable() is None
    if not has_tokamax and not triton_in_auto():  # ragged_dot alone: nothing to measure
        assert chosen == "ragged_dot" and line == ""
        return
    assert line.startswith("grouped matmul (40 rows x 16 -> 8, 3 local slots, float32): ragged_dot ")
    assert line.endswith(f"-> {chosen}") and ("tokamax" in line) == has_tokamax
    if jax.default_backend() == "cpu":  # compiled Triton cannot run here
        assert ("pallas out (" in line) == triton_in_auto() and chosen in ("ragged_dot", "tokamax")
