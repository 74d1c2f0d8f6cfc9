"""The sharded MoE transformer generates exactly what an independent dense single-device model does,
under any ep size and placement, and checkpoints restore onto any mesh and placement."""

import jax
import numpy as np
import pytest
from flax import nnx

from jax_eplb import EplbInputError, build_assignment_tables, plan_placement
from jax_eplb.model import (ModelConfig, MoETransformer, OrbaxCheckpoint, SeededWeights, create_random_checkpoint,
                            logical_experts, logical_weights, save_checkpoint, seeded_params)
from jax_eplb.moe import EPMoEBlock, PlacementTable, SlotParam


@pytest.mark.parametrize("ranks,placement,options", [
    (1, "identity", {}),
    (4, "random", {"moe_max_num_tokens": 8, "dispatch": "entry"}),  # the others: token dispatch
    (2, "random", {"grouped_matmul": "pallas_interpret"}),
    (2, "planned", {"replica_policy": "load_aware", "grouped_matmul": "ragged_dot"}),
])
def test_generation_matches_dense_reference(small, ranks, placement, options):
    config = small.config()
    rng = np.random.default_rng(ranks)
    lm, e = config.num_moe_layers, config.num_experts
    if placement == "identity":
        slot_to_expert = np.tile(np.arange(e), (lm, 1))
    elif placement == "random":
        slot_to_expert = small.random_placement(config, 24, rng)
    else:
        slot_to_expert = plan_placement(rng.lognormal(0, 1, (lm, e)), 24, ranks).slot_to_expert
    got = small.generate(small.build(config, ranks, slot_to_expert, **options), steps=5)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), seeded_params(config, 0))
    experts = logical_experts(config, 0)
    for prompt, tokens in zip(small.PROMPTS, got):
        want, seq = [], list(prompt)
        for _ in range(5):
            want.append(small.reference_next_token(config, params, experts, seq))
            seq.append(want[-1])
        assert tokens == want


def test_same_tokens_under_every_ep_size_and_placement(small):
    config = small.config()
    rng = np.random.default_rng(0)
    runs = [small.generate(small.build(config, ranks, small.random_placement(config, slots, rng)), steps=6)
            for ranks, slots in ((1, 16), (2, 16), (8, 32))]
    assert all(r == runs[0] for r in runs[1:])


def test_model_is_nnx_modules_with_the_block_owning_slots_and_tables(small):
    """The EP MoE block inside the model holds the slot-sharded experts and the placement tables."""
    config = small.config()
    runner = small.build(config, 4, small.identity_plus(config, 8))
    model = runner.model
    assert isinstance(model, MoETransformer) and isinstance(model.moe_block, EPMoEBlock)
    slots = nnx.state(model, SlotParam)
    tables = nnx.state(model, PlacementTable)
    gate = model.moe_block.w_gate.get_value()
    assert gate.shape == (config.num_moe_layers, 24, config.hidden_size, config.expert_ffn_size)
    assert gate.sharding.spec[1] == "ep"  # slot axis split over ranks
    assert len(jax.tree.leaves(slots)) == 3 and len(jax.tree.leaves(tables)) == 3
    np.testing.assert_array_equal(model.tables().slot_to_expert, small.identity_plus(config, 8))


def test_checkpoint_restores_onto_other_meshes_and_placements(small, tmp_path):
    config = small.config()
    create_random_checkpoint(tmp_path / "ckpt", config, seed=5)
    source = OrbaxCheckpoint(tmp_path / "ckpt")
    logical = logical_experts(config, 5)
    rng = np.random.default_rng(1)
    outputs = []
    for ranks, slots in ((2, 16), (8, 24)):
        slot_to_expert = small.random_placement(config, slots, rng)
        runner = small.build(config, ranks, slot_to_expert, weights=source)
        experts = runner.model.slot_experts()
        assert experts.gate.shape[1] == slots
        for layer in range(config.num_moe_layers):  # slot s holds its expert's logical weights
            np.testing.assert_array_equal(np.asarray(experts.down[layer]), logical.down[layer][slot_to_expert[layer]])
        outputs.append(small.generate(runner, steps=4))
    assert outputs[0] == outputs[1]
    # Seeded random weights placed directly equal the checkpoint's.
    assert small.generate(small.build(config, 2, np.tile(np.arange(16), (2, 1)), seed=5), steps=4) == outputs[0]
    with pytest.raises(EplbInputError, match="already exists"):  # real weights never replace a directory
        save_checkpoint(tmp_path / "ckpt", config, logical_weights(config, SeededWeights(1)))
    with pytest.raises(EplbInputError, match="different model"):
        OrbaxCheckpoint(tmp_path / "ckpt").params(small.config(hidden_size=64))


def test_set_placement_changes_nothing_but_the_layout(small):
    config = small.config()
    runner = small.build(config, 4, small.identity_plus(config, 8))
    before = small.generate(runner, steps=4)
    compiled = runner.compilations()
    rng = np.random.default_rng(3)
    new = small.random_placement(config, 24, rng)
    tables = build_assignment_tables(new, 16, runner.model.tables().max_replicas)
    runner.model.set_placement(tables, logical_experts(config, 0))
    assert small.generate(runner, steps=4) == before
    assert runner.compilations() == compiled  # same shapes: no recompilation
    np.testing.assert_array_equal(runner.model.tables().slot_to_expert, new)


@pytest.mark.parametrize("bad,match", [
    ({"first_k_dense": 3}, "first_k_dense"),
    ({"num_kv_heads": 3}, "multiple"),
    ({"dtype": "float16"}, "dtype"),
    ({"n_group": 5}, "divisible"),
    ({"colour": 1}, "unknown"),
])
def test_bad_model_configs(small, bad, match):
    raw = {"model": {**small.RAW["model"], **bad}}
    with pytest.raises(EplbInputError, match=match):
        ModelConfig.from_dict(raw, "bad.yaml")


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3_slice"])
def test_shipped_configs_build(name, mesh_of):
    """Shipped configs load and build with the advertised shapes (abstractly: no memory)."""
    from jax_eplb._assignment import default_slot_to_expert
    from jax_eplb.model import load_model_config

    config = load_model_config(name)
    assert config.num_experts >= 64 and config.top_k >= 4 and config.n_group > 1 and config.router == "deepseek"
    tables = build_assignment_tables(np.tile(default_slot_to_expert(config.num_experts, config.num_experts, 1),
                                             (config.num_moe_layers, 1)), config.num_experts)
    model = nnx.eval_shape(lambda: MoETransformer(config, mesh_of(1), tables, rngs=nnx.Rngs(0)))
    gate = model.moe_block.w_gate.get_value()
    assert gate.shape == (config.num_moe_layers, config.num_experts, config.hidden_size, config.expert_ffn_size)
    if name == "deepseek_v3_slice":
        assert (config.hidden_size, config.expert_ffn_size, config.num_experts, config.top_k) == (7168, 2048, 256, 8)
