"""Shared-expert balancing: a token's shared-expert row computed on the rank the split gives it leaves the
outputs those of a dense single-device MoE with shared experts, and lowers the busiest rank's rows
(``rank_rows``: routed entries plus shared rows; ``rank_load`` stays the routed entries)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_eplb import build_assignment_tables, plan_placement
from jax_eplb.moe import ExpertWeights, MoEConfig, MoEOptions, RouterWeights, ep_moe_forward, slot_weights_from_logical
from jax_eplb.moe._replica_choice import _shared_destinations

E, H, F = 8, 16, 8


def weights(seed, shared_width):
    k = jax.random.split(jax.random.key(seed), 8)
    logical = ExpertWeights(*(jax.random.normal(k[i], s) * 0.3 for i, s in
                              enumerate([(E, H, F), (E, H, F), (E, F, H)])))
    shared = ExpertWeights(*(jax.random.normal(k[3 + i], s) * 0.3 for i, s in
                             enumerate([(H, shared_width), (H, shared_width), (shared_width, H)])))
    router = RouterWeights(jax.random.normal(k[6], (H, E)), jnp.zeros((E,)))
    return logical, shared, router


def forward(mesh, config, logical, shared, router, x, slot_to_expert, mask=None, **options):
    tables = build_assignment_tables(slot_to_expert, E, max_replicas=slot_to_expert.size - E + 1)
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    fn = jax.jit(functools.partial(ep_moe_forward, config, mesh, options=MoEOptions(**options), shared=shared))
    return fn(router, slots, x, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]),
              token_mask=mask)


def assert_close(out, ref):
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 1e-5, err


@pytest.mark.parametrize("ranks,shared_width,dispatch,chunk", [(2, F, "token", None), (4, 12, "entry", 16),
                                                                (8, 2 * F, "token", 16)])
def test_balanced_shared_experts_equal_the_dense_reference(ranks, shared_width, dispatch, chunk, mesh_of, dense_moe,
                                                            ragged_emulation):
    """On and off, all_to_all and (emulated) ragged transport, a shared FFN of 1, 1.5 (zero-padded) and 2 pieces,
    chunked, with masked tokens (they output zeros)."""
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2, num_shared_experts=1,
                       shared_ffn_size=shared_width)
    logical, shared, router = weights(ranks, shared_width)
    x = jax.random.normal(jax.random.key(11), (32, H))
    mask = jnp.arange(32) % 5 != 1
    slot_to_expert = plan_placement(np.random.default_rng(ranks).lognormal(0, 1, (1, E)), 16, ranks).slot_to_expert[0]
    ref = dense_moe(config, router, logical, x, shared=list(shared)) * mask[:, None]
    outs = {}
    for balance, transport in (("on", "all_to_all"), ("on", "ragged"), ("off", "all_to_all")):
        result = forward(mesh_of(ranks), config, logical, shared, router, x, slot_to_expert, mask,
                         replica_policy="load_aware", shared_expert_balance=balance, transport=transport,
                         ragged_exchange=ragged_emulation if transport == "ragged" else None, dispatch=dispatch,
                         moe_max_num_tokens=chunk)
        assert_close(result.out, ref)
        outs[balance, transport] = result
    pieces = -(-shared_width // F)
    for result in outs.values():  # routed entries, and rows computed: those plus every valid token's shared pieces
        assert int(result.rank_load.sum()) == int(mask.sum()) * 2
        assert int(result.rank_rows.sum()) == int(mask.sum()) * (2 + pieces)
    own = np.asarray(mask).reshape(ranks, -1).sum(axis=1) * pieces  # unbalanced: each rank its own tokens'
    np.testing.assert_array_equal(outs["off", "all_to_all"].rank_rows, outs["off", "all_to_all"].rank_load + own)


def test_balancing_lowers_the_busiest_rank(mesh_of):
    """Every token picks experts 0 and 1, both on rank 0 only: with its shared rows elsewhere rank 0 computes fewer
    rows than routed + own shared rows (what it computes unbalanced)."""
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=2, num_shared_experts=1)
    logical, shared, router = weights(3, F)
    router = RouterWeights(jnp.zeros((H, E)).at[:, 0].set(4.0).at[:, 1].set(3.0), router.correction_bias)
    x = jnp.abs(jax.random.normal(jax.random.key(4), (32, H))) + 0.1
    slot_to_expert = np.array([0, 1, 2, 3, 4, 5, 6, 7])  # 4 ranks x 2 slots, no replica
    runs = {b: forward(mesh_of(4), config, logical, shared, router, x, slot_to_expert, replica_policy="load_aware",
                       shared_expert_balance=b) for b in ("on", "off")}
    np.testing.assert_array_equal(runs["off"].rank_rows, [72, 8, 8, 8])  # each rank its own 8 tokens' rows
    # rank 0 gives its 8 away, the others take 8/3 each (the rounded running sum: 11, 10, 11)
    np.testing.assert_array_equal(runs["on"].rank_rows, [64, 11, 10, 11])
    np.testing.assert_array_equal(runs["on"].rank_load, runs["off"].rank_load)  # the routed entries: [64, 0, 0, 0]
    assert_close(runs["on"].out, runs["off"].out)


def test_shared_destinations_hand_worked():
    # ranks bring 3, 3, 3 rows; quotas 1, 4, 4: rank 0 keeps its first token, gives one each to ranks 1 and 2
    own, quota = jnp.array([3, 3, 3]), jnp.array([1, 4, 4])
    mask = jnp.array([True, False, True, True])  # rank 0's tokens (one masked)
    np.testing.assert_array_equal(np.asarray(_shared_destinations(mask, own, quota, 0)), [0, 3, 1, 2])
    np.testing.assert_array_equal(np.asarray(_shared_destinations(jnp.array([True] * 3), own, quota, 1)), [1, 1, 1])
    # ranks 0 and 1 both give: rank 1's rows come after rank 0's in the takers' order
    own, quota = jnp.array([3, 3, 0]), jnp.array([2, 2, 2])
    np.testing.assert_array_equal(np.asarray(_shared_destinations(jnp.array([True] * 3), own, quota, 0)), [0, 0, 2])
    np.testing.assert_array_equal(np.asarray(_shared_destinations(jnp.array([True] * 3), own, quota, 1)), [1, 1, 2])


def test_shared_balance_option_is_checked():
    with pytest.raises(ValueError, match="needs replica_policy='load_aware'"):
        MoEOptions(shared_expert_balance="on")
    with pytest.raises(ValueError, match="shared_expert_balance must be one of"):
        MoEOptions(replica_policy="load_aware", shared_expert_balance="yes")


def test_throughput_settings_check_the_shared_balance():
    from jax_eplb import EplbInputError
    from jax_eplb.serving import ThroughputSettings

    with pytest.raises(EplbInputError, match="needs --replica_policy load_aware"):
        ThroughputSettings(shared_expert_balance="on")
    with pytest.raises(EplbInputError, match="shared expert balance must be one of"):
        ThroughputSettings(shared_expert_balance="maybe")
    assert ThroughputSettings(replica_policy="load_aware").moe_options(()).shared_expert_balance == "auto"
