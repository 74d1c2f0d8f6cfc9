"""Kernels: Pallas (interpret mode on CPU) == XLA reference == plain-Python rule, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_eplb import build_assignment_tables
from jax_eplb_kernels import HistogramBlockSizes, RoutingBlockSizes, route_to_slots, routing_histogram

SMALL_HIST = HistogramBlockSizes(block=32, inner_steps=2)


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


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_histogram_pallas_equals_reference(tokens, k, num_bins, seed):
    ids = np.random.default_rng(seed).integers(-2, num_bins + 3, size=(tokens, k))
    expected = np.bincount(ids[(ids >= 0) & (ids < num_bins)], minlength=num_bins)
    for impl in ("xla", "pallas_interpret"):
        got = routing_histogram(jnp.asarray(ids, jnp.int32), num_bins, implementation=impl, block_sizes=SMALL_HIST)
        np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("case", ["all_equal", "all_invalid", "one_hot_expert"])
@pytest.mark.parametrize("num_bins", [256, 288, 384])
def test_histogram_adversarial(case, num_bins):
    rng = np.random.default_rng(0)
    ids = {"all_equal": np.full((130, 8), 7),
           "all_invalid": rng.choice([-1, num_bins, num_bins + 100], size=(130, 8)),
           "one_hot_expert": np.where(rng.random((130, 8)) < 0.9, num_bins - 1, rng.integers(0, num_bins, (130, 8)))}[case]
    expected = np.bincount(ids[(ids >= 0) & (ids < num_bins)], minlength=num_bins)
    got = routing_histogram(jnp.asarray(ids, jnp.int32), num_bins, implementation="pallas_interpret",
                            block_sizes=SMALL_HIST)
    np.testing.assert_array_equal(np.asarray(got), expected)


@settings(max_examples=20, deadline=None)
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
    np.testing.assert_array_equal(np.asarray(got), python_round_robin(np.zeros((600, 4), int), [0, 1, 0, 1], 2, 0, 1024))


def test_bad_input_and_explicit_implementation():
    with pytest.raises(ValueError, match="implementation"):
        routing_histogram(jnp.zeros((4, 2), jnp.int32), 8, implementation="cuda")
    with pytest.raises(ValueError, match="integers"):
        routing_histogram(jnp.zeros((4, 2)), 8)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        route_to_slots(jnp.zeros((4,), jnp.int32), jnp.ones(2, jnp.int32), jnp.zeros((2, 1), jnp.int32), 2)
    if jax.default_backend() == "cpu":  # compiled Pallas (Triton) needs a GPU: fails fast, no silent fallback
        with pytest.raises(Exception):
            routing_histogram(jnp.zeros((4, 2), jnp.int32), 8, implementation="pallas").block_until_ready()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas GPU kernels need a GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("num_ids,num_bins", [(65_536, 256), (1_000_003, 288), (4096, 384)])
def test_compiled_pallas_on_gpu(num_ids, num_bins):
    rng = np.random.default_rng(num_ids)
    ids = jnp.asarray(rng.integers(-1, num_bins + 2, size=(num_ids // 8, 8)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(routing_histogram(ids, num_bins, implementation="pallas")),
                                  np.asarray(routing_histogram(ids, num_bins, implementation="xla")))
    slot_to_expert = rng.permutation(np.concatenate([np.arange(num_bins), rng.integers(0, num_bins, 32)]))
    tables = build_assignment_tables(slot_to_expert, num_bins)
    args = (ids, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), num_bins + 32)
    got = route_to_slots(*args, rank_offset=3, with_histogram=True, implementation="pallas")
    want = route_to_slots(*args, rank_offset=3, with_histogram=True, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got.slot_ids), np.asarray(want.slot_ids))
    np.testing.assert_array_equal(np.asarray(got.slot_counts), np.asarray(want.slot_counts))


def test_auto_implementation_override(monkeypatch):
    from jax_eplb_kernels import resolve_implementation

    monkeypatch.setenv("JAX_EPLB_KERNELS", "pallas_interpret")
    assert resolve_implementation("auto") == "pallas_interpret"
    assert resolve_implementation("xla") == "xla"  # explicit requests win
    monkeypatch.setenv("JAX_EPLB_KERNELS", "triton")
    with pytest.raises(ValueError, match="JAX_EPLB_KERNELS"):
        resolve_implementation("auto")
