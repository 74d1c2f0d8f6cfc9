"""Planners: published cases, exact reproduction of the baselines, properties on random loads."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_eplb import (ALGORITHMS, UNUSED_SLOT, EplbInputError, MoeLoadBalancerConfig, build_assignment_tables,
                      deepseek_rebalance, duplicate_count, lower_bound, mask_failed_ranks, plan_placement,
                      project_onto_plan, trtllm_plan, trtllm_replication)
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


def test_trtllm_loads_are_float32_as_in_its_cpp():
    """TensorRT-LLM passes float load factors: 16777217 rounds to 16777216, the two experts tie and
    the extra replica goes to the larger id (double arithmetic would pick expert 0)."""
    assert trtllm_plan(np.array([[16777217, 16777216]]), 3, 3).tolist() == [[0, 1, 1]]


def test_deepseek_equals_eplb_py_outputs():
    """deepseek-ai/EPLB's own outputs (recorded by scripts/record_peer_outputs.py) on tie-heavy loads,
    global and hierarchical: equal plans needs eplb.py's float32 arithmetic and torch's sort order."""
    import json
    from pathlib import Path

    cases = json.loads((Path(__file__).parent / "fixtures" / "peers" / "deepseek_eplb.json").read_text())
    assert len(cases) == 17
    for case in cases:
        plan = deepseek_rebalance(np.array(case["weight"]), case["num_replicas"], case["num_groups"],
                                  case["num_nodes"], case["num_gpus"])
        assert plan.phy2log.tolist() == case["phy2log"]
        assert plan.logcnt.tolist() == case["logcnt"]


def test_torch_sort_order_on_ties():
    """torch.sort(descending=True).indices recorded on CPU: not index order for more than 16 values."""
    from jax_eplb.planning._introsort import torch_descending_order

    values = np.array([[1.0, 2.0] * 16])
    assert torch_descending_order(values)[0].tolist() == [1, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 9, 3, 7, 11, 5,
                                                           6, 0, 30, 2, 28, 26, 4, 24, 22, 20, 18, 8, 16, 14, 10, 12]
    short = np.array([[3.0, 1.0, 3.0, 2.0, 1.0]])  # up to 16 values: insertion sort, ties in index order
    assert torch_descending_order(short)[0].tolist() == [0, 2, 3, 1, 4]


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


# ----------------------------------------------------------------- failed ranks, unused slots


def _serving_slots_reference(plan_row, load_row, ep_size, failed):
    """Plain reference: per-rank loads under even splits, ignoring slots that hold -1."""
    replicas = {e: sum(1 for s in plan_row if s == e) for e in range(len(load_row))}
    per_rank = len(plan_row) // ep_size
    loads = [sum(load_row[s] / replicas[s] for s in plan_row[r * per_rank:(r + 1) * per_rank] if s >= 0)
             for r in range(ep_size)]
    serving = [loads[r] for r in range(ep_size) if r not in failed]
    mean = sum(serving) / len(serving)
    return loads, (max(serving) / mean - 1.0) if mean > 0 else 0.0


@settings(max_examples=40, deadline=None)
@given(loads_strategy, st.data())
def test_plans_around_failed_ranks(case, data):
    loads, ep_size, extra = case
    load = np.array(loads, dtype=float)
    num_experts = load.shape[1]
    num_slots = _geometry(num_experts, ep_size, extra)
    per_rank = num_slots // ep_size
    failed = data.draw(st.lists(st.integers(0, ep_size - 1), unique=True, max_size=ep_size - 1))
    algorithm = data.draw(st.sampled_from(ALGORITHMS))
    if (ep_size - len(failed)) * per_rank < num_experts:
        with pytest.raises(EplbInputError, match="fewer than"):
            plan_placement(load, num_slots, ep_size, algorithm, failed_ranks=failed)
        return
    previous = data.draw(st.sampled_from([None, plan_placement(load[:, ::-1], num_slots, ep_size).slot_to_expert]))
    plan = plan_placement(load, num_slots, ep_size, algorithm, failed_ranks=failed, previous=previous)
    by_rank = plan.slot_to_expert.reshape(load.shape[0], ep_size, per_rank)
    for layer in range(load.shape[0]):
        assert np.all(by_rank[layer, failed] == UNUSED_SLOT)
        serving = np.delete(by_rank[layer], failed, axis=0)
        assert sorted(set(serving.ravel().tolist())) == list(range(num_experts))
        loads_ref, imbalance_ref = _serving_slots_reference(plan.slot_to_expert[layer].tolist(),
                                                            load[layer].tolist(), ep_size, failed)
        np.testing.assert_allclose(plan.rank_load[layer], loads_ref, rtol=1e-9, atol=1e-9)
        assert plan.imbalance[layer] == pytest.approx(imbalance_ref, abs=1e-9)
    if previous is not None:
        assert np.array_equal(plan.slots_moved, (plan.slot_to_expert != previous).sum(1))
    tables = plan.tables(num_experts)
    assert np.array_equal(tables.replica_count.sum(1), (plan.slot_to_expert >= 0).sum(1))
    # mask-only from the plan: nothing else moves; an expert whose last replica was on the rank is an error
    if len(failed) + 1 < ep_size:
        rank = next(r for r in range(ep_size) if r not in failed)
        row = plan.slot_to_expert.copy()
        sole = [e for e in range(num_experts) if set(np.flatnonzero(row[0] == e) // per_rank) == {rank}]
        if sole:
            with pytest.raises(EplbInputError, match=f"expert\\(s\\) \\[{sole[0]}"):
                mask_failed_ranks(row[:1], ep_size, [rank])
        else:
            masked = mask_failed_ranks(row[:1], ep_size, [rank])
            assert np.all(masked.reshape(ep_size, per_rank)[rank] == UNUSED_SLOT)
            assert np.array_equal(np.delete(masked.reshape(ep_size, per_rank), rank, 0),
                                  np.delete(row[0].reshape(ep_size, per_rank), rank, 0))


def test_unused_slots_hand_worked(tmp_path):
    tables = build_assignment_tables(np.array([[-1, 0, 1, 0]]), 2)
    assert tables.replica_count.tolist() == [[2, 1]]
    assert tables.expert_slots.tolist() == [[[1, 3], [2, -1]]]
    np.testing.assert_array_equal(project_onto_plan(np.array([[[6.0, 5.0]]]), np.array([[-1, 0, 1, 0]])),
                                  [[[0.0, 3.0, 5.0, 3.0]]])
    assert duplicate_count(np.array([[-1, -1, 0, 1]]), 2).tolist() == [0]   # two unused slots are no duplicate
    assert mask_failed_ranks([[0, 1, 2, 0, 3, 1]], 3, [0]).tolist() == [[-1, -1, 2, 0, 3, 1]]
    with pytest.raises(EplbInputError, match=r"layer row 0: expert\(s\) \[2\].*failed rank\(s\) \[1\]"):
        mask_failed_ranks([[0, 1, 2, 0, 3, 1]], 3, [1])
    with pytest.raises(EplbInputError, match="every rank"):
        mask_failed_ranks([[0, 1]], 2, [0, 1])
    with pytest.raises(EplbInputError, match="not ranks"):
        plan_placement(np.ones((1, 4)), 4, 2, failed_ranks=[2])
    with pytest.raises(EplbInputError, match="has no slot"):
        build_assignment_tables(np.array([[-1, 0, 0, 0]]), 2)
    with pytest.raises(EplbInputError, match="expected 0..1"):
        build_assignment_tables(np.array([[-2, 0, 1, 0]]), 2)
    # in the YAML plan (vLLM's -1); an expert only on unused slots is named
    plan = tmp_path / "plan.yaml"
    plan.write_text("num_slots: 4\ninitial_global_assignments:\n  0: [-1, 0, 1, 0]\n")
    assert MoeLoadBalancerConfig.from_yaml(plan).slot_to_expert([0], 2, 2).tolist() == [[-1, 0, 1, 0]]
    plan.write_text("num_slots: 4\ninitial_global_assignments:\n  0: [-1, 0, 2, 0]\n")
    with pytest.raises(EplbInputError, match=r"expert\(s\) \[1\] have no replica"):
        MoeLoadBalancerConfig.from_yaml(plan).slot_to_expert([0], 3, 2)


@pytest.mark.parametrize("geometry", [(12, 4, 16), (32, 8, 40), (64, 8, 80), (256, 32, 288), (256, 36, 288)],
                         ids=lambda g: f"E{g[0]}-EP{g[1]}-S{g[2]}")
def test_balanced_own_plan_beats_the_baselines_before_any_fallback(geometry):
    """The planner's own candidates (before it keeps a baseline that did better) on skewed loads (gamma 0.8,
    24 layers): never above the better of TensorRT-LLM's and DeepSeek's plans, lower on average, and within
    1% of the lower bound on average (measured 2026-12-06: 0.05-0.7% above it, the baselines 0.3-3.9%)."""
    from jax_eplb.planning import trtllm_plan
    from jax_eplb.planning._balanced import own_candidates
    from jax_eplb.planning._baselines import deepseek_plan

    num_experts, ep_size, num_slots = geometry
    load = np.random.default_rng(0).gamma(0.8, 1000.0, size=(24, num_experts)).round() + 1
    peak = lambda plan: rank_loads(load, plan, ep_size).max(axis=1)  # noqa: E731
    own = np.min([peak(plan) for plan in own_candidates(load, num_slots, ep_size)], axis=0)
    baseline = np.minimum(peak(trtllm_plan(load, num_slots, ep_size)), peak(deepseek_plan(load, num_slots, ep_size)))
    bound = lower_bound(load, num_slots, ep_size).max_rank_load
    assert np.all(own <= baseline * (1 + 1e-9))
    assert np.mean(own / baseline) < 0.999
    assert np.mean(own / bound) < 1.01
