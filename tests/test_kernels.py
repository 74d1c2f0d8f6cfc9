"""Kernels: Pallas (interpret mode on CPU) == XLA reference == plain-Python rule, exactly."""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_eplb import build_assignment_tables
from jax_eplb_kernels._mosaic_gpu import interpret_available
from jax_eplb_kernels import (HistogramBlockSizes, MatmulBlockSizes, RoutingBlockSizes, dtype_tolerance,
                              relative_close, route_to_slots, routing_histogram, tile_grouped_matmul)

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


def check_round_robin(num_experts, extra, tokens, k, rank_offset, block, seed, implementations, **options):
    """A random placement and routing (every third case: all on one expert) through ``route_to_slots`` with
    each implementation == the rule written as a loop (slot ids and their histogram)."""
    rng = np.random.default_rng(seed)
    num_slots = num_experts + extra
    slot_to_expert = rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, extra)]))
    tables = build_assignment_tables(slot_to_expert, num_experts)
    ids = rng.integers(-1, num_experts + 1, size=(tokens, k))
    if seed % 3 == 0:
        ids[:] = rng.integers(0, num_experts)  # everyone on one expert
    expected = python_round_robin(ids, slot_to_expert, num_experts, rank_offset, block)
    for impl in implementations:
        got = route_to_slots(jnp.asarray(ids, jnp.int32), jnp.asarray(tables.replica_count[0]),
                             jnp.asarray(tables.expert_slots[0]), num_slots, rank_offset=rank_offset,
                             with_histogram=True, block=block, implementation=impl, **options)
        np.testing.assert_array_equal(np.asarray(got.slot_ids), expected, err_msg=impl)
        np.testing.assert_array_equal(np.asarray(got.slot_counts),
                                      np.bincount(expected[expected < num_slots], minlength=num_slots), err_msg=impl)


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 12), st.integers(0, 6), st.integers(1, 200), st.integers(1, 4), st.integers(0, 5),
       st.sampled_from([32, 64]), st.integers(0, 2**31 - 1))
def test_round_robin_routing_matches_rule(num_experts, extra, tokens, k, rank_offset, block, seed):
    check_round_robin(num_experts, extra, tokens, k, rank_offset, block, seed, ("xla", "pallas_interpret"),
                      block_sizes=RoutingBlockSizes(chunk=16))


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
NEEDS_MOSAIC_INTERPRETER = pytest.mark.skipif(not interpret_available(),
                                              reason="Mosaic GPU's interpreter comes with JAX >= 0.11")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason=NEEDS_GPU)
@pytest.mark.parametrize("num_ids,num_bins", [(65_536, 256), (1_000_003, 288), (4096, 384)])
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_compiled_pallas_on_gpu(num_ids, num_bins):
    rng = np.random.default_rng(num_ids)
    ids = jnp.asarray(rng.integers(-1, num_bins + 2, size=(num_ids // 8, 8)), jnp.int32)
    want = np.asarray(routing_histogram(ids, num_bins, implementation="xla"))
    from jax_eplb_kernels import MosaicHistogramBlockSizes

    for method in ("scan", "per_bin"):
        for semantics in ("lane", "warpgroup"):
            sizes = MosaicHistogramBlockSizes(method=method, semantics=semantics)
            got = routing_histogram(ids, num_bins, implementation="mosaic_gpu", mosaic_block_sizes=sizes)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"mosaic_gpu {method} {semantics}")
    for method in ("outer", "compare"):
        got = routing_histogram(ids, num_bins, implementation="pallas", block_sizes=HistogramBlockSizes(method=method))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=method)
    slot_to_expert = rng.permutation(np.concatenate([np.arange(num_bins), rng.integers(0, num_bins, 32)]))
    tables = build_assignment_tables(slot_to_expert, num_bins)
    args = (ids, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), num_bins + 32)
    want = route_to_slots(*args, rank_offset=3, with_histogram=True, implementation="xla")
    for impl in ("pallas", "mosaic_gpu"):
        if impl == "mosaic_gpu" and tables.expert_slots.shape[-1] * num_bins > 256 * 128:
            continue  # beyond one TMA copy of the table: the Mosaic kernel refuses it (tested on CPU)
        got = route_to_slots(*args, rank_offset=3, with_histogram=True, implementation=impl)
        np.testing.assert_array_equal(np.asarray(got.slot_ids), np.asarray(want.slot_ids), err_msg=impl)
        np.testing.assert_array_equal(np.asarray(got.slot_counts), np.asarray(want.slot_counts), err_msg=impl)


@pytest.fixture
def pretend_gpu(monkeypatch):
    """'auto' as on a GPU (its trials then compile GPU kernels for real, which fails on CPU)."""
    import types

    from jax_eplb_kernels import _dispatch, _probe

    monkeypatch.setattr(_dispatch.jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("JAX_EPLB_KERNELS", raising=False)
    choices = {}
    monkeypatch.setattr(_probe, "_choices", choices)
    return types.SimpleNamespace(fastest_correct=_probe.fastest_correct,
                                 resolve_implementation=_dispatch.resolve_implementation,
                                 triton_in_auto=_dispatch.triton_in_auto, TIMED_RUNS=_probe.TIMED_RUNS,
                                 _choices=choices)


def _sleeping(result, seconds, calls, name):
    def run():
        calls.append(name)
        if result == "raise":
            raise RuntimeError("mosaic compile error\nsecond line")
        time.sleep(seconds)
        return jnp.asarray(result)
    return run


def test_auto_takes_the_fastest_correct_candidate_and_says_so(pretend_gpu):
    calls, lines = [], []
    trials = lambda: {"xla": _sleeping([1, 2], 0.03, calls, "xla"),  # noqa: E731
                      "fast": _sleeping([1, 2], 0.0, calls, "fast"), "slow": _sleeping([1, 2], 0.08, calls, "slow"),
                      "wrong": _sleeping([1, 3], 0.0, calls, "wrong"), "broken": _sleeping("raise", 0, calls, "b")}
    choose = pretend_gpu.fastest_correct
    assert choose(trials, "k", reference="xla", subject="toy kernel", log=lines.append) == "fast"
    assert choose(trials, "k", reference="xla", log=lines.append) == "fast" and len(lines) == 1  # cached per key
    line = lines[0]
    assert line.startswith("toy kernel: xla ") and line.endswith("-> fast")
    assert re.search(r"fast \d+\.\d us", line) and re.search(r"xla \d+\.\d us", line)
    assert "wrong out (differs from the reference)" in line
    assert "broken out (RuntimeError: mosaic compile error)" in line  # the error's first line only
    assert calls.count("wrong") == 1 and calls.count("fast") == 1 + pretend_gpu.TIMED_RUNS
    # the reference wins where nothing else is both correct and faster
    only_slow = lambda: {"xla": _sleeping([1], 0.0, [], "xla"), "slow": _sleeping([1], 0.05, [], "slow")}  # noqa: E731
    assert choose(only_slow, "k2", reference="xla", log=lines.append) == "xla"


def test_auto_decides_while_the_caller_is_traced_in_shard_map(pretend_gpu):
    """The EP block calls the kernels inside jit + shard_map: the trials must still compile and run
    (here interpreted) rather than be staged into, or evaluated inside, that trace."""
    from jax.sharding import Mesh, PartitionSpec as P

    from jax_eplb_kernels.histogram import histogram_pallas, histogram_reference

    ids = jnp.asarray(np.arange(100, dtype=np.int32) % 7)
    trials = lambda: {"xla": lambda: histogram_reference(ids, 7),  # noqa: E731
                      "pallas": lambda: histogram_pallas(ids, 7, SMALL_HIST["outer"], interpret=True)}

    def body(x):
        impl = pretend_gpu.resolve_implementation("auto", trials, "shard_map_trial")
        return x + (impl in ("xla", "pallas"))

    mesh = Mesh(np.array(jax.devices("cpu")[:4]), ("ep",))
    for check_vma in (True, False):
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=check_vma))
        np.testing.assert_array_equal(np.asarray(f(jnp.zeros(8, jnp.int32))), np.ones(8))
    assert list(pretend_gpu._choices) == [("gpu", "shard_map_trial")]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a device where compiled GPU kernels cannot run")
def test_auto_falls_back_to_xla_when_the_kernels_fail_on_the_device(pretend_gpu, capsys):
    ids = jnp.asarray(np.random.default_rng(0).integers(-1, 300, (40, 8)), jnp.int32)
    got = routing_histogram(ids, 288)  # compiled Mosaic GPU / Triton cannot run on CPU: both out -> XLA
    np.testing.assert_array_equal(np.asarray(got), np.asarray(routing_histogram(ids, 288, implementation="xla")))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("routing histogram (320 ids, 288 bins): xla ") and line.endswith("-> xla")
    assert "mosaic_gpu out (" in line and ("pallas out (" in line) == pretend_gpu.triton_in_auto()
    tables = build_assignment_tables(np.array([0, 1, 2, 0]), 3)
    args = (jnp.asarray(ids % 3), jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), 4)
    np.testing.assert_array_equal(np.asarray(route_to_slots(*args).slot_ids),
                                  np.asarray(route_to_slots(*args, implementation="xla").slot_ids))
    x, w = jnp.ones((32, 16)), jnp.ones((2, 16, 16))
    np.testing.assert_array_equal(np.asarray(tile_grouped_matmul(x, w, jnp.array([0, 1]), 2)),
                                  np.full((32, 16), 16.0))
    # Triton kernels are measured only on JAX < 0.11: from 0.11 on, the tile matmul needs no trial
    assert set(pretend_gpu._choices.values()) == {"xla"}
    assert len(pretend_gpu._choices) == (3 if pretend_gpu.triton_in_auto() else 2)


def test_trials_pass_correct_kernels_and_reject_a_wrong_one(monkeypatch):
    """The trials' own inputs and comparisons: the kernels (interpreted here) agree with the reference."""
    import functools

    from jax_eplb_kernels import _probe
    from jax_eplb_kernels.grouped_matmul import api as matmul_api
    from jax_eplb_kernels.histogram import api as histogram_api
    from jax_eplb_kernels._mosaic_gpu import interpret_available
    from jax_eplb_kernels.slot_routing import api as routing_api

    for module, name, flag in ((histogram_api, "histogram_pallas", True), (routing_api, "route_pallas", True),
                               (matmul_api, "tile_grouped_matmul_pallas", True),
                               (histogram_api, "histogram_mosaic_gpu", interpret_available()),
                               (routing_api, "route_mosaic_gpu", interpret_available())):
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), interpret=flag))
    for module in (histogram_api, routing_api):
        if not interpret_available():  # JAX < 0.11 has no Mosaic GPU interpreter: that candidate is left out
            monkeypatch.setattr(module, "mosaic_gpu_available", lambda: False)
        monkeypatch.setattr(module, "triton_in_auto", lambda: True)
    monkeypatch.setattr(_probe, "TIMED_RUNS", 1)  # interpreted kernels are slow; one timed run each
    cases = [(lambda: histogram_api._trials(300, 37, HistogramBlockSizes(block=64),
                                            histogram_api.MosaicHistogramBlockSizes(block=128)), None),
             (lambda: routing_api._trials((70, 3), 16, 3, 24, 128, RoutingBlockSizes()), None),
             (lambda: matmul_api._trials(3, 32, 48, 2, 16, jnp.float32, jnp.float32, MatmulBlockSizes(bn=16, bk=16)),
              relative_close(dtype_tolerance(jnp.float32)))]
    for trials, close in cases:
        names, figures = _probe.measure(_probe.Choice("k", trials, "xla", close or _probe._equal, "trial"))
        assert len(names) >= 2 and all(isinstance(figures[n], float) for n in names), figures
    monkeypatch.setattr(histogram_api, "histogram_pallas", lambda ids, n, sizes: jnp.zeros((n,), jnp.int32))
    names, figures = _probe.measure(_probe.Choice("k", cases[0][0], "xla", _probe._equal, "trial"))
    assert figures["pallas"] == "differs from the reference"


def test_triton_is_a_candidate_of_auto_only_before_jax_0_11():
    from jax_eplb_kernels.histogram import api as histogram_api
    from jax_eplb_kernels.slot_routing import api as routing_api

    old = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11)
    want = {"xla", "mosaic_gpu"} | ({"pallas"} if old else set())
    assert set(histogram_api._trials(10, 4, HistogramBlockSizes(), histogram_api.MosaicHistogramBlockSizes())) == want
    assert set(routing_api._trials((5, 2), 4, 2, 6, 1024, RoutingBlockSizes())) == want


@NEEDS_MOSAIC_INTERPRETER
@settings(max_examples=4, deadline=None)
@given(st.integers(2, 12), st.integers(0, 6), st.integers(1, 120), st.integers(1, 4), st.integers(0, 5),
       st.sampled_from([128, 256]), st.integers(0, 2**31 - 1))
def test_mosaic_gpu_routing_matches_rule(num_experts, extra, tokens, k, rank_offset, block, seed):
    check_round_robin(num_experts, extra, tokens, k, rank_offset, block, seed, ("mosaic_gpu_interpret",))


@NEEDS_MOSAIC_INTERPRETER
@settings(max_examples=4, deadline=None)
@given(st.integers(1, 700), st.integers(1, 300), st.sampled_from([128, 256]), st.integers(0, 2**31 - 1))
def test_mosaic_gpu_histogram_equals_numpy(num_ids, num_bins, block, seed):
    from jax_eplb_kernels import MosaicHistogramBlockSizes

    ids = np.random.default_rng(seed).integers(-3, num_bins + 3, size=num_ids)
    if seed % 3 == 0:
        ids[:] = num_bins - 1  # one hot bin
    expected = np.bincount(ids[(ids >= 0) & (ids < num_bins)], minlength=num_bins)
    for method in ("scan", "per_bin"):
        got = routing_histogram(jnp.asarray(ids, jnp.int32), num_bins, implementation="mosaic_gpu_interpret",
                                mosaic_block_sizes=MosaicHistogramBlockSizes(block=block, method=method))
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=method)


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
