"""Planners: published cases, exact reproduction of the baselines, properties on random loads."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_eplb import (EplbInputError, deepseek_rebalance, lower_bound, plan_placement, trtllm_plan,
                      trtllm_replication)
from jax_eplb._metrics import rank_loads


# ----------------------------------------------------------------- independent straightforward references


def reference_trtllm(load, num_slots, ep_size):
    """Plain-Python TensorRT-LLM greedy (one layer), written from the rules, not the vectorised code."""
    num_experts = len(load)
    if num_slots == num_experts:
        count = [1] * num_experts
    elif sum(load) == 0:
        count = [num_slots // num_experts + (e < num_slots % num_experts) for e in range(num_experts)]
    else:
        count = [1] * num_experts
        for _ in range(num_slots - num_experts):
            best = max(range(num_experts), key=lambda e: (load[e] / count[e], e))
            count[best] += 1
    replicas = [(load[e] / count[e], e) for e in range(num_experts) for _ in range(count[e])]
    replicas.sort(key=lambda r: (-r[0], r[1]))
    per_rank = num_slots // ep_size
    rank_load, rank_items = [0.0] * ep_size, [[] for _ in range(ep_size)]
    for size, expert in replicas:
        free = [r for r in range(ep_size) if len(rank_items[r]) < per_rank]
        r = min(free, key=lambda r: (rank_load[r], r))
        rank_items[r].append(expert)
        rank_load[r] += size
    return [e for items in rank_items for e in items]


def peak(load, plan, ep_size):
    return rank_loads(np.atleast_2d(load), np.atleast_2d(plan), ep_size).max(axis=1)


# ----------------------------------------------------------------- published cases


@pytest.mark.parametrize("load,num_slots,expected", [
    ([10, 5, 2, 15, 8], 9, [2, 1, 1, 3, 2]),
    ([0, 0, 0, 0], 6, [2, 2, 1, 1]),
    ([1, 4, 2, 1], 8, [1, 4, 2, 1]),
    ([0, 10, 0], 4, [1, 2, 1]),
])
def test_trtllm_replication_published_cases(load, num_slots, expected):
    assert trtllm_replication(np.array([load]), num_slots)[0].tolist() == expected


def test_deepseek_readme_example():
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    plan = deepseek_rebalance(weight, 16, 4, 2, 8)
    assert plan.phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                     [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    # log2phy inverts phy2log; logcnt counts replicas.
    for layer in range(2):
        for expert in range(12):
            slots = [s for s in plan.log2phy[layer, expert] if s >= 0]
            assert sorted(slots) == [s for s in range(16) if plan.phy2log[layer, s] == expert]
            assert plan.logcnt[layer, expert] == len(slots)


# ----------------------------------------------------------------- properties

loads_strategy = st.integers(2, 24).flatmap(lambda e: st.tuples(
    st.lists(st.lists(st.integers(0, 1000), min_size=e, max_size=e), min_size=1, max_size=3),
    st.sampled_from([1, 2, 3, 4]),  # ep_size
    st.integers(0, 3),  # extra slots per rank
))


def _geometry(num_experts, ep_size, extra):
    per_rank = -(-num_experts // ep_size) + extra
    return per_rank * ep_size


@settings(max_examples=60, deadline=None)
@given(loads_strategy)
def test_trtllm_matches_plain_reference(case):
    loads, ep_size, extra = case
    load = np.array(loads, dtype=float)
    num_slots = _geometry(load.shape[1], ep_size, extra)
    plan = trtllm_plan(load, num_slots, ep_size)
    for layer in range(load.shape[0]):
        assert plan[layer].tolist() == reference_trtllm(load[layer].tolist(), num_slots, ep_size)


@settings(max_examples=60, deadline=None)
@given(loads_strategy)
def test_every_plan_valid_and_balanced_not_worse_than_baselines(case):
    loads, ep_size, extra = case
    load = np.array(loads, dtype=float)
    num_experts = load.shape[1]
    num_slots = _geometry(num_experts, ep_size, extra)
    bound = lower_bound(load, num_slots, ep_size).max_rank_load
    peaks = {}
    for algorithm in ("balanced", "trtllm", "deepseek"):
        plan = plan_placement(load, num_slots, ep_size, algorithm)
        assert plan.slot_to_expert.shape == (load.shape[0], num_slots)
        for row in plan.slot_to_expert:  # every expert has a replica, ids in range
            assert sorted(set(row.tolist())) == list(range(num_experts))
        peaks[algorithm] = plan.rank_load.max(axis=1)
        np.testing.assert_allclose(plan.rank_load.sum(axis=1), load.sum(axis=1))
        assert np.all(peaks[algorithm] >= bound * (1 - 1e-9))
    best_baseline = np.minimum(peaks["trtllm"], peaks["deepseek"])
    assert np.all(peaks["balanced"] <= best_baseline * (1 + 1e-9))


@settings(max_examples=30, deadline=None)
@given(loads_strategy, st.integers(0, 2**31 - 1))
def test_previous_config_never_costs_balance(case, seed):
    loads, ep_size, extra = case
    load = np.array(loads, dtype=float)
    num_slots = _geometry(load.shape[1], ep_size, extra)
    rng = np.random.default_rng(seed)
    previous = plan_placement(rng.permutation(load, axis=1), num_slots, ep_size).slot_to_expert
    fresh = plan_placement(load, num_slots, ep_size)
    kept = plan_placement(load, num_slots, ep_size, previous=previous)
    assert np.all(kept.rank_load.max(1) <= fresh.rank_load.max(1) * (1 + 1e-9) + 1e-9)
    assert np.array_equal(kept.slots_moved, (kept.slot_to_expert != previous).sum(1))
    assert np.all(kept.slots_moved <= num_slots)
    # Re-planning with unchanged load from the plan itself moves nothing.
    again = plan_placement(load, num_slots, ep_size, previous=fresh.slot_to_expert)
    assert again.slots_moved.sum() == 0


def test_balanced_avoids_duplicate_replicas_on_a_rank():
    rng = np.random.default_rng(0)
    load = rng.lognormal(0, 1.0, size=(6, 32)) * 100
    plan = plan_placement(load, 48, 8)
    assert plan.duplicates.sum() == 0
    bins = np.sort(plan.slot_to_expert.reshape(6, 8, 6), axis=2)  # independent recount
    assert not (bins[..., 1:] == bins[..., :-1]).any()


def test_balanced_quality_on_real_data(real_loads):
    """Targets from the issue, on real DeepSeek-V3 loads."""
    for ep_size, num_slots in ((32, 288), (64, 320)):
        bound = lower_bound(real_loads, num_slots, ep_size)
        plan = plan_placement(real_loads, num_slots, ep_size)
        excess = plan.rank_load.max(1) / bound.max_rank_load - 1
        assert excess.mean() <= 1e-3
    bal = plan_placement(real_loads, 288, 144).rank_load.max(1)
    greedy = plan_placement(real_loads, 288, 144, "trtllm").rank_load.max(1)
    assert bal.mean() < greedy.mean() * 0.995


def test_bad_arguments():
    with pytest.raises(EplbInputError, match="divisible"):
        plan_placement(np.ones((1, 8)), 10, 4)
    with pytest.raises(EplbInputError, match=">="):
        plan_placement(np.ones((1, 8)), 4, 4)
    with pytest.raises(EplbInputError, match="non-negative"):
        plan_placement(np.array([[1.0, -1.0]]), 2, 1)
    with pytest.raises(EplbInputError, match="non-negative"):
        plan_placement(np.array([[1.0, np.nan]]), 2, 1)
    with pytest.raises(EplbInputError, match="algorithm"):
        plan_placement(np.ones((1, 4)), 4, 2, "magic")
