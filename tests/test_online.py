"""Online balancing: TensorRT-LLM's schedule, decayed device statistics, slot rewrites that keep
greedy tokens identical, never recompile, and a state that survives a restart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_eplb.model import SeededWeights
from jax_eplb.online import OnlineBalancer, OnlineSchedule, update_groups


# ----------------------------------------------------------------------------- schedule

def test_schedule_hand_worked_cases():
    groups = update_groups(58, 2)  # ceil(58/2) = 29 groups of 2, first == last size -> one empty step
    assert len(groups) == 30 and groups[-1] == () and groups[0] == (0, 29) and groups[28] == (28, 57)
    groups = update_groups(59, 1)  # 59 groups of 1 -> + empty step
    assert len(groups) == 60 and groups[:3] == [(0,), (1,), (2,)] and groups[-1] == ()
    groups = update_groups(59, 2)  # 30 groups: first (0, 30), last (29,): sizes differ, no empty step
    assert len(groups) == 30 and groups[0] == (0, 30) and groups[-1] == (29,)
    assert update_groups(5, 2) == [(0, 3), (1, 4), (2,)]
    schedule = OnlineSchedule(5, 2, warmup_iters=4)
    assert [schedule.due(i) for i in range(9)] == [(), (), (), (), (0, 3), (1, 4), (2,), (0, 3), (1, 4)]
    with pytest.raises(ValueError):
        update_groups(4, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 80), st.integers(1, 10))
def test_schedule_updates_every_layer_once_per_period(layers, k):
    groups = update_groups(layers, k)
    flat = [l for g in groups for l in g]
    assert sorted(flat) == list(range(layers))
    assert max(len(g) for g in groups) <= k


# ----------------------------------------------------------------------------- balancer

def generate(small, runner, balancer, steps):
    """Greedy decode of the small prompts with the balancer's hooks around every step."""
    if balancer is None:
        return small.generate(runner, steps=steps)
    return small.generate(runner, steps=steps, before_step=balancer.before_step,
                          after_step=lambda out: balancer.observe(out.expert_totals))


def source_of(config):
    return SeededWeights(0).expert_source(config)


@pytest.mark.parametrize("ranks,k,overlap", [(4, 2, True), (8, 1, False)])
def test_tokens_identical_before_during_after_updates(small, ranks, k, overlap):
    config = small.config()
    plain = generate(small, small.build(config, ranks, small.identity_plus(config, 0)), None, 10)
    runner = small.build(config, ranks, small.identity_plus(config, 8), record=("expert_total",))
    model, source = runner.model, source_of(config)
    balancer = OnlineBalancer(model, source, k, overlap=overlap, migration_tolerance=0.0, device_copies=True)
    assert generate(small, runner, balancer, 10) == plain
    balancer.finish()
    applied = [r for r in balancer.reports if r.layers_applied]
    assert applied and sum(r.slots_moved for r in applied) > 0  # the placement really changed
    # Every slot holds exactly its expert's logical weights after all the partial rewrites.
    experts = model.slot_experts()
    for layer in range(config.num_moe_layers):
        for leaf, host in zip(experts, source.experts):
            np.testing.assert_array_equal(np.asarray(leaf[layer]), host[layer][balancer.slot_to_expert[layer]])
    np.testing.assert_array_equal(model.tables().slot_to_expert, balancer.slot_to_expert)
    # Rebalance programs: the host-row write and one per rank shift of device copies, never one per
    # plan; the serving step compiled only for its two shapes.
    assert balancer.writer.compilations() <= 1 + ranks
    assert sum(r.slots_from_devices for r in applied) > 0  # resident experts were copied on device
    assert runner.compilations() == 2


def test_lockstep_applies_each_plan_one_iteration_later_even_when_planning_is_slow(small):
    """What multi-host needs: every process applies the same plans at the same iteration."""
    import time

    config = small.config()
    model = small.build(config, 2, small.identity_plus(config, 4), record=("expert_total",)).model
    balancer = OnlineBalancer(model, source_of(config), 1, overlap=True, lockstep=True, migration_tolerance=0.0)
    plan = balancer._plan
    balancer._plan = lambda *a: (time.sleep(0.2), plan(*a))[1]  # slower than an iteration here
    rng = np.random.default_rng(1)
    for iteration in range(5):
        balancer.observe(jnp.asarray(rng.integers(0, 9, (config.num_moe_layers, config.num_experts)), jnp.int32))
        balancer.before_step(iteration)
    reports = balancer.reports
    assert sum(bool(r.layers_planned) for r in reports) >= 3
    for before, now in zip(reports, reports[1:]):
        assert now.layers_applied == before.layers_planned
    assert reports[0].layers_applied == ()


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**31 - 1))
def test_slot_writer_fills_slots_from_device_copies_or_the_host(ranks, seed):
    """Every rewritten slot ends up holding its new expert's master weights, whether it was copied
    from a stable slot on a device (local or by ppermute) or written from the host master."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jax_eplb.moe import ExpertWeights
    from jax_eplb.online import SlotWriter

    rng = np.random.default_rng(seed)
    mesh = Mesh(np.array(jax.devices("cpu")[:ranks]), ("ep",))
    num_experts, num_slots, layers = 6, ranks * (8 // ranks + 1), 2
    master = ExpertWeights(*(rng.normal(size=(layers, num_experts) + shape).astype(np.float32)
                             for shape in ((3, 2), (3, 2), (2, 3))))
    old = np.stack([rng.permutation(np.concatenate([np.arange(num_experts),
                                                    rng.integers(0, num_experts, num_slots - num_experts)]))
                    for _ in range(layers)])
    new = old.copy()
    changed = rng.choice(num_slots, size=rng.integers(1, num_slots), replace=False)
    new[1, changed] = rng.integers(0, num_experts, changed.size)
    sharding = NamedSharding(mesh, P(None, "ep"))
    for from_devices in (True, False):
        experts = jax.tree.map(lambda m: jax.device_put(np.take_along_axis(
            m, old.reshape(old.shape + (1,) * (m.ndim - 2)), axis=1), sharding), master)
        writer = SlotWriter(mesh, device_copies=from_devices)
        experts = writer.warm_up(experts)  # no-ops that compile every rank shift
        assert writer.compilations() == (ranks if from_devices else 0)
        experts, move = writer.move_layer(experts, master, 1, old[1], new[1])
        for leaf, host in zip(experts, master):
            np.testing.assert_array_equal(np.asarray(leaf[1]), host[1][new[1]])
            np.testing.assert_array_equal(np.asarray(leaf[0]), host[0][old[0]])  # other layers untouched
        assert move.slots_moved == int((old[1] != new[1]).sum())
        stable = old[1] == new[1]
        resident = sum(int(np.any(stable & (old[1] == e))) for e in new[1][~stable])
        assert move.slots_from_devices == (resident if from_devices else 0)
        assert writer.compilations() <= (ranks if from_devices else 0) + 1  # + the host write, nothing new


def test_decayed_statistics_and_reset(small):
    config = small.config()
    model = small.build(config, 2, small.identity_plus(config, 0), record=("expert_total",)).model
    balancer = OnlineBalancer(model, source_of(config), 1, overlap=False)
    rng = np.random.default_rng(0)
    counts = [rng.integers(0, 5, (2, 16)) for _ in range(3)]  # [Lm, E]
    want = np.zeros((2, 16))
    for c in counts:
        balancer.observe(jnp.asarray(c, jnp.int32))
        want = 0.95 * want + c
    np.testing.assert_allclose(np.asarray(balancer.statistics), want, rtol=1e-6)
    report = balancer.before_step(0)  # layer 0 due: planned, applied, its statistics reset
    assert report.layers_applied == (0,)
    np.testing.assert_array_equal(np.asarray(balancer.statistics)[0], 0)
    np.testing.assert_allclose(np.asarray(balancer.statistics)[1], want[1], rtol=1e-6)


def test_balanced_layer_is_not_touched(small):
    """Migration-aware: when the current placement is as good as a new plan, nothing moves."""
    config = small.config()
    model = small.build(config, 2, small.identity_plus(config, 0), record=("expert_total",)).model
    balancer = OnlineBalancer(model, source_of(config), 2, overlap=False)
    balancer.observe(jnp.ones((2, 16), jnp.int32))  # uniform load: identity is already optimal
    report = balancer.before_step(0)
    assert report.layers_applied == (0, 1) and report.slots_moved == 0
    trtllm = OnlineBalancer(model, source_of(config), 2, overlap=False, algorithm="trtllm", migration_aware=False)
    trtllm.observe(jnp.ones((2, 16), jnp.int32))
    assert trtllm.before_step(0).slots_moved > 0  # from scratch, the same loads reshuffle slots


def test_state_survives_a_restart(small, tmp_path):
    config = small.config()
    runner = small.build(config, 4, small.identity_plus(config, 8), record=("expert_total",))
    source = source_of(config)
    balancer = OnlineBalancer(runner.model, source, 2, overlap=False, migration_tolerance=0.0)
    before = generate(small, runner, balancer, 4)
    balancer.save_state(tmp_path / "state")
    restarted = small.build(config, 4, small.identity_plus(config, 8), record=("expert_total",))
    fresh = OnlineBalancer(restarted.model, source, 2, overlap=False)
    fresh.restore_state(tmp_path / "state")
    np.testing.assert_array_equal(fresh.slot_to_expert, balancer.slot_to_expert)
    np.testing.assert_array_equal(restarted.model.tables().expert_slots, runner.model.tables().expert_slots)
    np.testing.assert_allclose(np.asarray(fresh.statistics), np.asarray(balancer.statistics))
    assert generate(small, restarted, None, 4) == before


def test_flow_planner_online_plans_for_one_iteration(small, monkeypatch):
    """``flow`` online: the noise model gets one iteration's entries (statistics undone of the decay)
    and the plan it returns is applied like any other."""
    import jax_eplb.online._balancer as balancer_module

    config = small.config()
    model = small.build(config, 2, small.identity_plus(config, 8), record=("expert_total",)).model
    balancer = OnlineBalancer(model, source_of(config), 2, overlap=False, algorithm="flow")
    seen = []
    real = balancer_module.plan_placement
    monkeypatch.setattr(balancer_module, "plan_placement",
                        lambda *a, **k: seen.append(k["entries_per_iteration"]) or real(*a, **k))
    counts = np.random.default_rng(0).integers(0, 40, (2, 16))  # the same step three times
    for _ in range(3):
        balancer.observe(jnp.asarray(counts, jnp.int32))
    report = balancer.before_step(0)
    np.testing.assert_allclose(seen[0], counts.sum(axis=1), rtol=1e-5)
    assert report.layers_applied == (0, 1)
    np.testing.assert_array_equal(model.tables().slot_to_expert, balancer.slot_to_expert)
    assert all(set(row) == set(range(16)) for row in balancer.slot_to_expert)
