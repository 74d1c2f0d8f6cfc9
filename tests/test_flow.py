"""The load-aware split (runtime and its NumPy model) against the LP optimum, and the flow planner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.optimize import linprog

from jax_eplb import EplbInputError, build_assignment_tables, load_sglang_json, plan_placement
from jax_eplb._metrics import rank_loads
from jax_eplb.moe import balanced_shares, replica_quotas, replica_shares
from jax_eplb.planning import (balanced_plan, flow_plan, per_iteration_imbalance, sample_iterations,
                               split_rank_loads, trtllm_plan)

from conftest import SHARED_DATA


def lp_peak(plan, counts, ep_size, shared_rows=0.0):
    """Independent: the lowest max rank load any split of ``counts`` [E] over ``plan`` [S] allows (an LP:
    one variable per slot, the expert's entries it takes; minimise t with every rank's sum <= t).
    ``shared_rows``: N rows per serving rank that any serving rank may compute (one more variable per rank)."""
    num_slots, num_experts = plan.size, counts.size
    serving = (plan.reshape(ep_size, -1) >= 0).any(axis=1)
    width = num_slots + ep_size + 1  # slots, then each rank's shared rows, then t
    cost = np.zeros(width)
    cost[-1] = 1.0
    per_expert = np.zeros((num_experts + 1, width))
    per_expert[plan[plan >= 0], np.flatnonzero(plan >= 0)] = 1.0
    per_expert[num_experts, num_slots:num_slots + ep_size] = 1.0
    per_rank = np.zeros((ep_size, width))
    per_rank[np.arange(num_slots) // (num_slots // ep_size), np.arange(num_slots)] = 1.0
    per_rank[np.arange(ep_size), num_slots + np.arange(ep_size)] = 1.0
    per_rank[:, -1] = -1.0
    bounds = ([(0, None) if e >= 0 else (0, 0) for e in plan] + [(0, None) if on else (0, 0) for on in serving]
              + [(0, None)])
    totals = np.append(counts, shared_rows * serving.sum())
    result = linprog(cost, A_ub=per_rank, b_ub=np.zeros(ep_size), A_eq=per_expert, b_eq=totals, bounds=bounds)
    assert result.status == 0
    return result.fun


@st.composite
def split_cases(draw):
    """A plan [S] holding every expert (some slots maybe unused) and a few batches of counts [K, E]."""
    num_experts, ep_size, per_rank = draw(st.integers(2, 8)), draw(st.integers(2, 5)), draw(st.integers(1, 4))
    num_slots = ep_size * per_rank
    if num_slots < num_experts:
        num_slots, per_rank = num_experts * ep_size, num_experts
    extra = draw(st.lists(st.integers(-1, num_experts - 1), min_size=num_slots - num_experts,
                          max_size=num_slots - num_experts))
    plan = np.array(draw(st.permutations(list(range(num_experts)) + extra)))
    scale = draw(st.sampled_from([3, 60, 5000]))
    counts = np.array(draw(st.lists(st.lists(st.integers(0, scale), min_size=num_experts, max_size=num_experts),
                                    min_size=1, max_size=3)), dtype=float)
    return plan, counts, ep_size


@settings(max_examples=40, deadline=None)
@given(split_cases(), st.sampled_from([0.0, 0.0, 3.0, 50.0]))
def test_split_between_lp_optimum_and_even_split(case, shared_rows):
    plan, counts, ep_size = case
    split = split_rank_loads(plan, counts, ep_size, shared_rows=shared_rows)[0].max(axis=1)  # [K]
    even = split_rank_loads(plan, counts, ep_size, passes=0, shared_rows=shared_rows)[0].max(axis=1)
    serving = (plan.reshape(ep_size, -1) >= 0).any(axis=1)
    even_by_hand = np.array([(rank_loads(c[None], plan[None], ep_size)[0] + shared_rows * serving).max()
                             for c in counts])
    np.testing.assert_allclose(even, even_by_hand)
    for k, batch in enumerate(counts):
        optimum = lp_peak(plan, batch, ep_size, shared_rows)
        assert optimum - 1e-6 * max(optimum, 1) <= split[k] <= even[k] + 1e-9 * max(even[k], 1)


def test_split_close_to_lp_optimum_on_random_plans():
    rng = np.random.default_rng(0)
    excess, excess_shared = [], []
    for _ in range(60):
        num_experts, ep_size = 12, 4  # 4 slots per rank
        plan = rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, 4)]))
        batch = rng.multinomial(400, rng.dirichlet(np.ones(num_experts))).astype(float)
        excess.append(split_rank_loads(plan, batch[None], ep_size)[0, 0].max() / lp_peak(plan, batch, ep_size) - 1)
        excess_shared.append(split_rank_loads(plan, batch[None], ep_size, shared_rows=25)[0, 0].max()
                             / lp_peak(plan, batch, ep_size, 25) - 1)
    assert np.mean(excess) < 1e-3 and np.max(excess) < 0.01
    assert np.mean(excess_shared) < 1e-3 and np.max(excess_shared) < 0.01


LP_CLAIM = {(256, 32, 288): (1e-3, 5e-3), (256, 36, 288): (1e-3, 5e-3),  # (experts, ranks, slots): mean, max
            (64, 8, 80): (1e-2, 2.5e-2)}  # 10 slots per rank, many links: measurably above the optimum


@pytest.mark.parametrize("geometry", list(LP_CLAIM), ids=lambda g: f"E{g[0]}-EP{g[1]}-S{g[2]}")
@pytest.mark.parametrize("kind", ["balanced", "flow", "trtllm", "random"])
def test_split_near_lp_optimum_on_every_plan_kind(kind, geometry):
    """The claim (README, docs/benchmarks.md): the split is within 0.001 of the LP optimum on average at
    DeepSeek-V3's EP32/288 and EP36/288, whichever plan the runtime serves; at EP8 with 80 slots (the demo's
    geometry) within 1%. Skewed loads (gamma 0.8), 256 decode tokens per rank x top-8, unseen iterations."""
    num_experts, ep_size, num_slots = geometry
    rng = np.random.default_rng(7)
    load = rng.gamma(0.8, 100.0, size=(1, num_experts))
    entries = 256 * ep_size * 8
    plans = {
        "balanced": lambda: balanced_plan(load, num_slots, ep_size)[0],
        "flow": lambda: flow_plan(load, sample_iterations(load, entries, num_samples=8), num_slots, ep_size)[0],
        "trtllm": lambda: trtllm_plan(load, num_slots, ep_size)[0],
        "random": lambda: rng.permutation(np.concatenate([np.arange(num_experts),
                                                          rng.integers(0, num_experts, num_slots - num_experts)])),
    }
    plan = plans[kind]()
    excess = [split_rank_loads(plan, batch[None], ep_size)[0, 0].max() / lp_peak(plan, batch, ep_size) - 1
              for batch in sample_iterations(load, entries, num_samples=8, seed=11)[:, 0]]
    mean_bound, max_bound = LP_CLAIM[geometry]
    assert np.mean(excess) < mean_bound and np.max(excess) < max_bound, (np.mean(excess), np.max(excess))


def test_split_reaches_lp_optimum_along_a_chain_of_ranks():
    """12 ranks in a line, neighbours linked by a replicated expert, single experts' load rising along
    the line: the load must flow 11 links deep (slow for damped passes: 8 passes are far off)."""
    ranks, links = 12, 11
    plan = []
    for rank in range(ranks):  # rank r: its single expert, link r - 1, link r (a second single replica at the ends)
        row = [links + rank] + ([rank - 1] if rank else []) + ([rank] if rank < links else [])
        plan += row + [links + rank] * (3 - len(row))
    plan = np.array(plan)
    counts = np.concatenate([np.full(links, 60.0), 4.0 * np.arange(ranks)])
    optimum = lp_peak(plan, counts, ranks)
    assert split_rank_loads(plan, counts[None], ranks)[0, 0].max() <= optimum * (1 + 1e-3)
    assert split_rank_loads(plan, counts[None], ranks, passes=8)[0, 0].max() > optimum * 1.02


def test_shared_rows_hand_worked():
    # 2 ranks [e0, e1 | e2, e3], e0 has all 10 entries; 3 shared rows per rank: rank 1 takes all 6 -> [10, 6].
    np.testing.assert_allclose(split_rank_loads(np.array([0, 1, 2, 3]), np.array([[10.0, 0, 0, 0]]), 2,
                                                shared_rows=3)[0, 0], [10.0, 6.0])
    # [e0, e1 | e0, e2], counts 10, 6, 2: routed alone levels at 9 / 9; with 3 shared rows each, 12 / 12.
    plan, counts = np.array([0, 1, 0, 2]), np.array([[10.0, 6.0, 2.0]])
    np.testing.assert_allclose(split_rank_loads(plan, counts, 2)[0, 0], [9.0, 9.0], rtol=1e-6)
    np.testing.assert_allclose(split_rank_loads(plan, counts, 2, shared_rows=3)[0, 0], [12.0, 12.0], rtol=1e-4)
    # an unused rank (slots -1) takes no shared rows
    np.testing.assert_allclose(split_rank_loads(np.array([0, 1, 0, 2, -1, -1]), counts, 3, shared_rows=3)[0, 0],
                               [12.0, 12.0, 0.0], rtol=1e-4)


@jax.jit
def _jitted_split(counts, replica_count, expert_slots):
    """The runtime's shares and quotas at the twin test's fixed geometry (3 ranks x 3 slots)."""
    return (replica_shares(counts, replica_count, expert_slots, 3, 3),
            replica_quotas(counts, replica_count, expert_slots, 3, 3))


@settings(max_examples=12, deadline=None)
@given(st.data())
def test_runtime_split_equals_numpy_model_and_rounds_exactly(data):
    """The runtime's shares (JAX, float32) are the planner's model, whatever the table's padded width
    (the serving engine pads M to S - E + 1); its integer quotas sum to each expert's count with every
    quota within one of its share. Fixed sizes: one compile per width."""
    num_experts, ep_size, per_rank = 6, 3, 3
    extra = data.draw(st.lists(st.integers(0, num_experts - 1), min_size=3, max_size=3))
    plan = np.array(data.draw(st.permutations(list(range(num_experts)) + extra)))
    counts = np.array(data.draw(st.lists(st.integers(0, 400), min_size=num_experts, max_size=num_experts)))
    width = data.draw(st.sampled_from([4, 6]))  # 4 = S - E + 1: every plan of the geometry fits
    tables = build_assignment_tables(plan, num_experts, max_replicas=width)
    args = (jnp.asarray(counts), jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]),
            per_rank, ep_size)
    shares, quotas = (np.asarray(a) for a in _jitted_split(*args[:3]))
    slots = tables.expert_slots[0]
    runtime = np.zeros(ep_size)
    np.add.at(runtime, slots[slots >= 0] // per_rank, shares[slots >= 0])
    # float32 in the step vs float64 here: 6e-7 relative measured over 300 random cases
    np.testing.assert_allclose(runtime, split_rank_loads(plan, counts[None], ep_size)[0, 0], rtol=5e-6, atol=1e-4)
    np.testing.assert_array_equal(quotas.sum(axis=1), counts)
    assert np.all(quotas >= 0) and np.all(np.abs(quotas - shares) < 1 + 1e-4)
    assert np.all(quotas[slots < 0] == 0)


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_runtime_split_with_shared_rows_equals_numpy_model(data):
    """Shared-expert balancing: the runtime's routed shares plus shared rows per rank are the NumPy model's
    (``split_rank_loads(..., shared_rows=N)``), also with no spare slot (S = E) and with a rank serving nothing."""
    num_experts, ep_size, per_rank = 6, 3, 3
    extra = data.draw(st.lists(st.integers(-1, num_experts - 1), min_size=3, max_size=3))
    plan = np.array(data.draw(st.permutations(list(range(num_experts)) + extra)))
    if data.draw(st.booleans()):  # one rank serves nothing, its experts elsewhere
        plan = np.array([0, 1, 2, 3, 4, 5, -1, -1, -1])
    counts = np.array(data.draw(st.lists(st.integers(0, 400), min_size=num_experts, max_size=num_experts)))
    shared = data.draw(st.sampled_from([1, 5, 120]))  # 0 shared rows: the routed split's own passes (momentum)
    tables = build_assignment_tables(plan, num_experts, max_replicas=4)
    serving = (plan.reshape(ep_size, -1) >= 0).any(axis=1)
    split = _jitted_balanced(jnp.asarray(counts), jnp.asarray(tables.replica_count[0]),
                             jnp.asarray(tables.expert_slots[0]), jnp.asarray(shared * serving))
    slots = tables.expert_slots[0]
    runtime = np.asarray(split.shared, np.float64)
    np.add.at(runtime, slots[slots >= 0] // per_rank, np.asarray(split.replica)[slots >= 0])
    model = split_rank_loads(plan, counts[None], ep_size, shared_rows=shared)[0, 0]
    np.testing.assert_allclose(runtime, model, rtol=5e-6, atol=1e-4)  # 2e-7 relative measured
    np.testing.assert_allclose(np.asarray(split.shared).sum(), shared * serving.sum(), rtol=1e-5)


@jax.jit
def _jitted_balanced(counts, replica_count, expert_slots, shared_rows):
    return balanced_shares(counts, replica_count, expert_slots, shared_rows, 3, 3)


def test_runtime_split_without_spare_slots_moves_only_shared_rows():
    """S = E (no replica to split): the shared rows still level the ranks."""
    plan = np.arange(6)
    tables = build_assignment_tables(plan, 6)
    split = jax.jit(balanced_shares, static_argnums=(4, 5))(
        jnp.array([30, 0, 0, 0, 0, 0]), jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]),
        jnp.array([10, 10, 10]), 2, 3)
    np.testing.assert_allclose(np.asarray(split.shared), [0.0, 15.0, 15.0], atol=1e-3)  # rank 0: 30 routed


def test_runtime_split_on_a_real_plan_equals_numpy_model():
    """A DeepSeek-V3-sized plan (EP32, 288 slots, the serving engine's padded table width): the runtime's rank loads
    are the NumPy model's, and close to the LP optimum."""
    rng = np.random.default_rng(3)
    load = rng.gamma(0.8, 1000.0, size=(1, 256))
    plan = plan_placement(load, 288, 32, "flow").slot_to_expert[0]
    counts = rng.multinomial(32 * 256 * 8, load[0] / load.sum())
    tables = build_assignment_tables(plan, 256, max_replicas=288 - 256 + 1)
    shares = np.asarray(jax.jit(replica_shares, static_argnums=(3, 4))(
        jnp.asarray(counts), jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), 9, 32))
    slots = tables.expert_slots[0]
    runtime = np.zeros(32)
    np.add.at(runtime, slots[slots >= 0] // 9, shares[slots >= 0])
    model = split_rank_loads(plan, counts[None], 32)[0, 0]
    np.testing.assert_allclose(runtime, model, rtol=1e-4)
    assert model.max() <= lp_peak(plan, counts.astype(float), 32) * (1 + 2e-3)


# ----------------------------------------------------------------- the flow planner


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(8, 12, 4), (6, 12, 3), (10, 16, 4)]))
def test_flow_plans_are_valid_and_keep_the_mean_balance(seed, geometry):
    num_experts, num_slots, ep_size = geometry
    rng = np.random.default_rng(seed)
    load = rng.gamma(0.7, 100.0, size=(2, num_experts)).round()
    samples = sample_iterations(load, 300, num_samples=8, seed=seed)
    plan = flow_plan(load, samples, num_slots, ep_size)
    balanced = balanced_plan(load, num_slots, ep_size)
    for layer in range(2):
        assert set(plan[layer]) == set(range(num_experts)) and plan[layer].shape == (num_slots,)
    limit = np.maximum(rank_loads(load, trtllm_plan(load, num_slots, ep_size), ep_size).max(axis=1),
                       rank_loads(load, balanced, ep_size).max(axis=1))
    assert np.all(rank_loads(load, plan, ep_size).max(axis=1) <= limit * (1 + 1e-9))
    # the winner never has a worse mean on the iterations it was chosen for
    assert np.all(per_iteration_imbalance(plan, samples, ep_size) <= per_iteration_imbalance(balanced, samples, ep_size)
                  + 1e-12)
    again = flow_plan(load, samples, num_slots, ep_size, previous=plan)
    np.testing.assert_array_equal(again, plan)  # a plan as good as the new one stays in place


def test_flow_through_plan_placement_with_failed_ranks_and_bad_samples():
    load = np.random.default_rng(3).gamma(0.7, 100.0, size=(2, 8)).round()
    plan = plan_placement(load, 16, 4, "flow", failed_ranks=[1])
    assert np.all(plan.slot_to_expert[:, 4:8] == -1)
    assert all(set(row[row >= 0]) == set(range(8)) for row in plan.slot_to_expert)
    with pytest.raises(EplbInputError, match="samples must be"):
        plan_placement(load, 16, 4, "flow", samples=np.ones((3, 2, 7)))
    with pytest.raises(EplbInputError, match="samples must be"):
        plan_placement(load, 16, 4, "flow", samples=-np.ones((3, 2, 8)))


def test_flow_beats_balanced_per_iteration_on_real_data():
    """DeepSeek-V3 decode loads at EP36 / 288 slots, 256 tokens x top-8 per rank: plans made from one
    set of noise-model iterations, judged on another."""
    path = SHARED_DATA / "decode_in1000out1000.json"
    if not path.exists():
        pytest.skip("shared DeepSeek-V3 statistics not present")
    load = load_sglang_json(path).total()[[0, 29, 57]]
    entries = 36 * 256 * 8
    train, test = sample_iterations(load, entries, seed=0), sample_iterations(load, entries, seed=1)
    flow = per_iteration_imbalance(flow_plan(load, train, 288, 36), test, 36)
    balanced = per_iteration_imbalance(balanced_plan(load, 288, 36), test, 36)
    assert np.all(flow < 0.7 * balanced) and flow.mean() < 0.035


def test_generate_flow_from_recorded_iterations_or_the_noise_model(tmp_path, capsys):
    from jax_eplb import MoeLoadBalancerConfig, save_trtllm_dump
    from jax_eplb.cli import main

    rng = np.random.default_rng(2)
    for iterations, said in ((8, "planning for 8 of the 8 recorded iterations"), (2, "noise model")):
        counts = rng.integers(0, 60, size=(4, iterations, 2, 8))  # [R, I, L, E]
        save_trtllm_dump(tmp_path / f"stats{iterations}", counts, layer_ids=[3, 4], iter_start=1,
                         num_experts_per_token=2)
        out = tmp_path / f"plan{iterations}.yaml"
        assert main(["generate", "--expert_statistic_path", str(tmp_path / f"stats{iterations}"), "--ep_size", "4",
                     "--num_slots", "12", "--algorithm", "flow", "--output_path", str(out)]) == 0
        printed = capsys.readouterr().out
        assert said in printed and "per-iteration imbalance" in printed
        plan = MoeLoadBalancerConfig.from_yaml(out)
        assert plan.num_slots == 12 and sorted(plan.initial_global_assignments) == [3, 4]
        assert all(sorted(set(row)) == list(range(8)) for row in plan.initial_global_assignments.values())
