"""The routers against the NumPy routers written from the papers (conftest.numpy_route), and hand-worked cases."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from conftest import numpy_route

from jax_eplb.moe import MoEConfig, RouterWeights, route


def margins(config, kernel, bias, x) -> np.ndarray:
    """Per token, how far the choice is from a tie (float64): rows closer than float32's rounding may pick
    differently in float32 and are left out of the comparison."""
    logits = x.astype(np.float64) @ kernel.astype(np.float64) + (bias if config.router == "topk_softmax" else 0.0)
    scores = 1 / (1 + np.exp(-logits)) if config.router == "deepseek" else logits
    choice = scores + (bias if config.router == "deepseek" else 0.0)
    gaps = np.abs(np.diff(np.sort(choice, -1), axis=-1)).min(-1)
    if config.router == "deepseek":  # and the groups' scores
        grouped = np.sort(choice.reshape(len(x), config.n_group, -1), -1)[..., -2:].sum(-1)
        gaps = np.minimum(gaps, np.abs(np.diff(np.sort(grouped, -1), axis=-1)).min(-1, initial=np.inf))
    return gaps


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["softmax", "deepseek", "topk_softmax"]),
       st.sampled_from([(8, 2, 4, 2), (16, 4, 4, 2), (12, 3, 3, 1)]), st.booleans(), st.floats(0.5, 3.0),
       st.integers(0, 2**31 - 1))
def test_route_equals_the_numpy_router(router, shape, renormalize, scale, seed):
    experts, top_k, n_group, topk_group = shape
    config = MoEConfig(hidden_size=8, expert_ffn_size=4, num_experts=experts, top_k=top_k, router=router,
                       n_group=n_group if router == "deepseek" else 1,
                       topk_group=topk_group if router == "deepseek" else 1, renormalize=renormalize,
                       routed_scaling_factor=scale if router == "deepseek" else 1.0)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    kernel = rng.normal(size=(8, experts)).astype(np.float32)
    bias = (rng.normal(size=experts) * 0.3).astype(np.float32)
    logit_bias = jnp.asarray(bias) if router == "topk_softmax" else None  # gpt-oss: a bias on the logits
    got = route(config, RouterWeights(jnp.asarray(kernel), jnp.asarray(bias), logit_bias), jnp.asarray(x))
    ids, weights = numpy_route(config, kernel, bias, x)
    clear = margins(config, kernel, bias, x) > 1e-5
    assert clear.sum() >= 16
    np.testing.assert_array_equal(np.asarray(got.expert_ids)[clear], ids[clear])
    np.testing.assert_allclose(np.asarray(got.weights)[clear], weights[clear], rtol=2e-6, atol=1e-7)


def test_deepseek_router_hand_worked():
    """4 experts in 2 groups, top-2 from the best group: the bias moves the choice, not the weights."""
    config = MoEConfig(hidden_size=4, expert_ffn_size=2, num_experts=4, top_k=2, router="deepseek", n_group=2,
                       topk_group=1, routed_scaling_factor=2.0)
    logits = np.array([[2.0, 1.0, 0.0, 3.0]], np.float32)  # sigmoid: .881 .731 .5 .953
    bias = np.array([0.0, 0.0, 0.5, 0.0], np.float32)  # group 1 biased: .5+.5 + .953 = 1.953 > 1.612
    got = route(config, RouterWeights(jnp.eye(4, dtype=jnp.float32), jnp.asarray(bias)), jnp.asarray(logits))
    assert sorted(np.asarray(got.expert_ids)[0].tolist()) == [2, 3]
    plain = 1 / (1 + np.exp(-np.array([0.0, 3.0])))
    np.testing.assert_allclose(sorted(np.asarray(got.weights)[0]), sorted(2.0 * plain / plain.sum()), rtol=1e-6)
    unnormalized = route(dataclasses.replace(config, renormalize=False),
                         RouterWeights(jnp.eye(4, dtype=jnp.float32), jnp.asarray(bias)), jnp.asarray(logits))
    np.testing.assert_allclose(sorted(np.asarray(unnormalized.weights)[0]), sorted(2.0 * plain), rtol=1e-6)
