"""Kernels: Pallas (interpret mode on CPU) == XLA reference == plain-Python rule, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_eplb import build_assignment_tables
from jax_eplb_kernels import (HistogramBlockSizes, MatmulBlockSizes, RoutingBlockSizes, route_to_slots,
                              routing_histogram, tile_grouped_matmul)

SMALL_HIST = {m: HistogramBlockSizes(block=32, inner_steps=2, min_programs=2, method=m) for m in ("outer", "compare")}


def python_round_robin(ids, slot_to_expert, num_experts, rank_offset, block):
    """TensorRT-LLM's rule written as a loop, from its description."""
    replicas = {e: [s for s, x in enumerate(slot_to_expert) if x == e] for e in range(num_experts)}
    out = []
    seen = {}
    for i, e in enumerate(np.asarray(ids).reshape(-1).tolist()):
        b = i // block
        if i % block == 0:
            seen = {}
        if not 0 <= e < num_experts:
            out.append(len(slot_to_expert))
            continue
        occ = seen.get(e, 0)
        seen[e] = occ + 1
        out.append(replicas[e][(b + rank_offset + occ) % len(replicas[e])])
    return np.array(out).reshape(np.asarray(ids).shape)


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 300), st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_histogram_pallas_equals_reference(tokens, k, num_bins, seed):
    ids = np.random.default_rng(seed).integers(-2, num_bins + 3, size=(tokens, k))
    expected = np.bincount(ids[(ids >= 0) & (ids < num_bins)], minlength=num_bins)
    np.testing.assert_array_equal(np.asarray(routing_histogram(jnp.asarray(ids, jnp.int32), num_bins,
                                                               implementation="xla")), expected)
    for method, sizes in SMALL_HIST.items():
        got = routing_histogram(jnp.asarray(ids, jnp.int32), num_bins, implementation="pallas_interpret",
                                block_sizes=sizes)
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=method)


@pytest.mark.parametrize("method", ["outer", "compare"])
@pytest.mark.parametrize("case", ["all_equal", "all_invalid", "one_hot_expert"])
@pytest.mark.parametrize("num_bins", [256, 288, 384])
def test_histogram_adversarial(case, num_bins, method):
    rng = np.random.default_rng(0)
    ids = {"all_equal": np.full((130, 8), 7),
           "all_invalid": rng.choice([-1, num_bins, num_bins + 100], size=(130, 8)),
           "one_hot_expert": np.where(rng.random((130, 8)) < 0.9, num_bins - 1,
                                      rng.integers(0, num_bins, (130, 8)))}[case]
    expected = np.bincount(ids[(ids >= 0) & (ids < num_bins)], minlength=num_bins)
    got = routing_histogram(jnp.asarray(ids, jnp.int32), num_bins, implementation="pallas_interpret",
                            block_sizes=SMALL_HIST[method])
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_outer_layout_covers_bins_with_dot_sized_factors():
    from jax_eplb_kernels._outer_count import outer_layout

    for num_bins in range(1, 1100):
        layout = outer_layout(num_bins)
        assert layout.num_bins >= num_bins and layout.lo_bins == 1 << layout.lo_bits
        assert 16 <= layout.lo_bins <= layout.hi_bins and layout.num_bins < max(2 * num_bins, 512)


def test_histogram_programs_fill_the_gpu_on_small_inputs():
    sizes = HistogramBlockSizes()  # block 256, up to 16 blocks a program, at least 264 programs
    assert sizes.steps_for(65_536) == 1  # 256 programs of one block
    assert sizes.steps_for(8_388_608) == 16  # 2048 programs of 16 blocks
    assert sizes.steps_for(1_000_000) == 15
    with pytest.raises(ValueError, match="method"):
        HistogramBlockSizes(method="atomic")


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 12), st.integers(0, 6), st.integers(1, 200), st.integers(1, 4), st.integers(0, 5),
       st.sampled_from([32, 64]), st.integers(0, 2**31 - 1))
def test_round_robin_routing_matches_rule(num_experts, extra, tokens, k, rank_offset, block, seed):
    rng = np.random.default_rng(seed)
    num_slots = num_experts + extra
    slot_to_expert = rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, extra)]))
    tables = build_assignment_tables(slot_to_expert, num_experts)
    ids = rng.integers(-1, num_experts + 1, size=(tokens, k))
    if seed % 3 == 0:
        ids[:] = rng.integers(0, num_experts)  # everyone on one expert
    expected = python_round_robin(ids, slot_to_expert, num_experts, rank_offset, block)
    for impl in ("xla", "pallas_interpret"):
        got = route_to_slots(jnp.asarray(ids, jnp.int32), jnp.asarray(tables.replica_count[0]),
                             jnp.asarray(tables.expert_slots[0]), num_slots, rank_offset=rank_offset,
                             with_histogram=True, block=block, implementation=impl,
                             block_sizes=RoutingBlockSizes(chunk=16))
        np.testing.assert_array_equal(np.asarray(got.slot_ids), expected)
        np.testing.assert_array_equal(np.asarray(got.slot_counts),
                                      np.bincount(expected[expected < num_slots], minlength=num_slots))


def test_default_block_is_trtllm_1024():
    tables = build_assignment_tables(np.array([0, 1, 0, 1]), 2)
    ids = jnp.zeros((600, 4), jnp.int32)  # 2400 entries of expert 0, 3 blocks
    got = route_to_slots(ids, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), 4,
                         implementation="xla").slot_ids
    want = python_round_robin(np.zeros((600, 4), int), [0, 1, 0, 1], 2, 0, 1024)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_bad_input_and_explicit_implementation():
    with pytest.raises(ValueError, match="implementation"):
        routing_histogram(jnp.zeros((4, 2), jnp.int32), 8, implementation="cuda")
    with pytest.raises(ValueError, match="integers"):
        routing_histogram(jnp.zeros((4, 2)), 8)
    with pytest.raises(ValueError, match="chunk >= 16"):
        route_to_slots(jnp.zeros((4, 2), jnp.int32), jnp.ones(2, jnp.int32), jnp.zeros((2, 1), jnp.int32), 2,
                       implementation="pallas", block_sizes=RoutingBlockSizes(chunk=8))
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        route_to_slots(jnp.zeros((4,), jnp.int32), jnp.ones(2, jnp.int32), jnp.zeros((2, 1), jnp.int32), 2)
    if jax.default_backend() == "cpu":  # compiled Pallas (Triton) needs a GPU: fails fast, no silent fallback
        with pytest.raises(Exception):
            routing_histogram(jnp.zeros((4, 2), jnp.int32), 8, implementation="pallas").block_until_ready()


NEEDS_GPU = "compiled Pallas GPU kernels need a GPU (scripts/gpu_check.sh)"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason=NEEDS_GPU)
@pytest.mark.parametrize("num_ids,num_bins", [(65_536, 256), (1_000_003, 288), (4096, 384)])
def test_compiled_pallas_on_gpu(num_ids, num_bins):
    rng = np.random.default_rng(num_ids)
    ids = jnp.asarray(rng.integers(-1, num_bins + 2, size=(num_ids // 8, 8)), jnp.int32)
    want = np.asarray(routing_histogram(ids, num_bins, implementation="xla"))
    for method in ("outer", "compare"):
        got = routing_histogram(ids, num_bins, implementation="pallas", block_sizes=HistogramBlockSizes(method=method))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=method)
    slot_to_expert = rng.permutation(np.concatenate([np.arange(num_bins), rng.integers(0, num_bins, 32)]))
    tables = build_assignment_tables(slot_to_expert, num_bins)
    args = (ids, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), num_bins + 32)
    got = route_to_slots(*args, rank_offset=3, with_histogram=True, implementation="pallas")
    want = route_to_slots(*args, rank_offset=3, with_histogram=True, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got.slot_ids), np.asarray(want.slot_ids))
    np.testing.assert_array_equal(np.asarray(got.slot_counts), np.asarray(want.slot_counts))


@pytest.fixture
def pretend_gpu(monkeypatch):
    """'auto' as on a GPU (its probes then compile Pallas for real, which fails on CPU)."""
    from jax_eplb_kernels import _dispatch

    monkeypatch.setattr(_dispatch.jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("JAX_EPLB_KERNELS", raising=False)
    monkeypatch.setattr(_dispatch, "_probe_results", {})
    return _dispatch


def test_auto_on_gpu_uses_pallas_only_after_its_probe_passes(pretend_gpu):
    calls = []

    def probe(result):
        def run():
            calls.append(result)
            if result == "raise":
                raise RuntimeError("triton compile error")
            return bool(jnp.sum(jnp.arange(4)) == 6) and result  # concrete even under a trace
        return run

    resolve = pretend_gpu.resolve_implementation
    assert jax.jit(lambda x: x + (resolve("auto", probe(True), "ok") == "pallas"))(0) == 1  # probed under jit
    assert resolve("auto", probe(False), "wrong") == "xla"
    assert resolve("auto", probe("raise"), "broken") == "xla"
    assert resolve("auto", probe(True), "ok") == "pallas" and calls == [True, False, "raise"]  # once per key
    assert resolve("pallas", probe(False), "wrong") == "pallas"  # explicit requests are not probed


def test_probe_runs_a_kernel_while_the_caller_is_traced_in_shard_map(pretend_gpu):
    """The EP block calls the kernels inside jit + shard_map: the probe must still compile and run
    its kernel (here interpreted) rather than be staged into, or evaluated inside, that trace."""
    from jax.sharding import Mesh, PartitionSpec as P

    from jax_eplb_kernels.histogram import histogram_pallas, histogram_reference

    ids = np.arange(100, dtype=np.int32) % 7

    def probe():
        return bool(jnp.array_equal(histogram_pallas(jnp.asarray(ids), 7, SMALL_HIST["outer"], interpret=True),
                                    histogram_reference(jnp.asarray(ids), 7)))

    def body(x):
        impl = pretend_gpu.resolve_implementation("auto", probe, "shard_map_probe")
        return x + (impl == "pallas")

    mesh = Mesh(np.array(jax.devices("cpu")[:4]), ("ep",))
    for check_vma in (True, False):
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=check_vma))
        np.testing.assert_array_equal(np.asarray(f(jnp.zeros(8, jnp.int32))), np.ones(8))
    assert pretend_gpu._probe_results == {"shard_map_probe": True}


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a device where compiled Pallas cannot run")
def test_auto_falls_back_to_xla_when_the_kernel_fails_on_the_device(pretend_gpu, caplog):
    ids = jnp.asarray(np.random.default_rng(0).integers(-1, 300, (40, 8)), jnp.int32)
    with caplog.at_level("WARNING", logger="jax_eplb_kernels"):
        got = routing_histogram(ids, 288)  # compiled Pallas cannot run on CPU: probe fails -> XLA
    np.testing.assert_array_equal(np.asarray(got), np.asarray(routing_histogram(ids, 288, implementation="xla")))
    assert "routing_histogram" in caplog.text and "uses XLA" in caplog.text
    tables = build_assignment_tables(np.array([0, 1, 2, 0]), 3)
    args = (jnp.asarray(ids % 3), jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), 4)
    np.testing.assert_array_equal(np.asarray(route_to_slots(*args).slot_ids),
                                  np.asarray(route_to_slots(*args, implementation="xla").slot_ids))
    x, w = jnp.ones((32, 16)), jnp.ones((2, 16, 16))
    np.testing.assert_array_equal(np.asarray(tile_grouped_matmul(x, w, jnp.array([0, 1]), 2)),
                                  np.full((32, 16), 16.0))
    assert set(pretend_gpu._probe_results.values()) == {False} and len(pretend_gpu._probe_results) == 3


def test_probes_pass_a_correct_kernel(monkeypatch):
    """The probes' own logic: a correct kernel (interpreted here) passes, so a GPU keeps Pallas."""
    import functools

    from jax_eplb_kernels.grouped_matmul import api as matmul_api
    from jax_eplb_kernels.histogram import api as histogram_api
    from jax_eplb_kernels.slot_routing import api as routing_api

    for module, name in ((histogram_api, "histogram_pallas"), (routing_api, "route_pallas"),
                         (matmul_api, "tile_grouped_matmul_pallas")):
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), interpret=True))
    assert histogram_api._probe(288, HistogramBlockSizes(block=64))
    assert routing_api._probe(16, 3, 24, 64, RoutingBlockSizes())
    assert matmul_api._probe(32, 48, 16, jnp.float32, jnp.float32, MatmulBlockSizes(bn=16, bk=16))
    # ... and a wrong one fails.
    monkeypatch.setattr(histogram_api, "histogram_pallas", lambda ids, n, sizes: jnp.zeros((n,), jnp.int32))
    assert not histogram_api._probe(288, HistogramBlockSizes(block=64))


def test_auto_implementation_override(monkeypatch):
    from jax_eplb_kernels import resolve_implementation

    monkeypatch.setenv("JAX_EPLB_KERNELS", "pallas_interpret")
    assert resolve_implementation("auto") == "pallas_interpret"
    assert resolve_implementation("xla") == "xla"  # explicit requests win
    monkeypatch.setenv("JAX_EPLB_KERNELS", "triton")
    with pytest.raises(ValueError, match="JAX_EPLB_KERNELS"):
        resolve_implementation("auto")


def numpy_tile_grouped_matmul(x, w, tile_group, used_tiles):
    tile = x.shape[0] // len(tile_group)
    out = np.zeros((x.shape[0], w.shape[2]))
    for t, g in enumerate(tile_group[:used_tiles]):
        out[t * tile:(t + 1) * tile] = x[t * tile:(t + 1) * tile].astype(np.float64) @ w[g]
    return out


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 6), st.sampled_from([8, 16]), st.integers(1, 4), st.sampled_from([16, 32]),
       st.sampled_from([16, 48]), st.data())
def test_tile_grouped_matmul_pallas_equals_numpy(num_tiles, tile, groups, k, n, data):
    rng = np.random.default_rng(num_tiles * 100 + tile + groups)
    x = rng.normal(size=(num_tiles * tile, k)).astype(np.float32)
    w = rng.normal(size=(groups, k, n)).astype(np.float32)
    tile_group = np.sort(rng.integers(0, groups, num_tiles))
    used = data.draw(st.integers(0, num_tiles))
    expected = numpy_tile_grouped_matmul(x, w, tile_group, used)
    for impl in ("xla", "pallas_interpret"):
        got = tile_grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(tile_group), used, implementation=impl,
                                  block_sizes=MatmulBlockSizes(bn=16, bk=16))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4, err_msg=impl)


def test_tile_grouped_matmul_bad_input():
    x, w, groups = jnp.zeros((12, 16)), jnp.zeros((2, 16, 16)), jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="tiles"):
        tile_grouped_matmul(x, w, jnp.zeros((5,), jnp.int32), 1, implementation="xla")
    with pytest.raises(ValueError, match=r"w \[m, K, N\]"):
        tile_grouped_matmul(x, jnp.zeros((2, 8, 16)), groups, 1, implementation="xla")
    with pytest.raises(ValueError, match="multiples"):
        tile_grouped_matmul(x, w, groups, 1, implementation="pallas_interpret", block_sizes=MatmulBlockSizes(bk=12))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason=NEEDS_GPU)
def test_compiled_tile_grouped_matmul_on_gpu():
    rng = np.random.default_rng(0)
    num_tiles, tile, groups, k, n = 40, 64, 9, 512, 384
    x = jnp.asarray(rng.normal(size=(num_tiles * tile, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(groups, k, n)) / np.sqrt(k), jnp.bfloat16)
    tile_group = jnp.asarray(np.sort(rng.integers(0, groups, num_tiles)), jnp.int32)
    want = tile_grouped_matmul(x, w, tile_group, 33, implementation="xla")
    got = tile_grouped_matmul(x, w, tile_group, 33, implementation="pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=2e-2)
    assert not np.any(np.asarray(got)[33 * tile:])


def test_empty_input_gives_zero_counts():
    tables = build_assignment_tables(np.array([0, 1, 0]), 2)
    for impl in ("xla", "pallas_interpret"):
        counts = routing_histogram(jnp.zeros((0, 8), jnp.int32), 16, implementation=impl)
        np.testing.assert_array_equal(np.asarray(counts), np.zeros(16))
        got = route_to_slots(jnp.zeros((0, 8), jnp.int32), jnp.asarray(tables.replica_count[0]),
                             jnp.asarray(tables.expert_slots[0]), 3, with_histogram=True, implementation=impl)
        assert got.slot_ids.shape == (0, 8)
        np.testing.assert_array_equal(np.asarray(got.slot_counts), np.zeros(3))
