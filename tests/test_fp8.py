"""FP8 checkpoints stay FP8 on the devices: residency on the built model's arrays, the step's
dequantization against NumPy (partial edge blocks), equal tokens to the dequantize-at-load model
and to transformers, rebalancing that moves FP8 bytes, and ``jax-eplb memory``'s figures against
the arrays a built model really holds."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from jax_eplb import EplbInputError, build_assignment_tables, default_slot_to_expert, plan_placement
from jax_eplb._assignment import widest_replicas
from jax_eplb.hf import HuggingFaceCheckpoint, dequantize_blocks, quantize_blocks
from jax_eplb.model import ModelRunner, build_model, check_fits, device_memory
from jax_eplb.moe import FP8_DTYPE, BlockFp8, MoEOptions, SlotParam, dequantize
from jax_eplb.moe._fp8 import dequantize_numpy

from test_hf_models import FIXTURES, assert_matches, run

FP8_FIXTURE = FIXTURES / "deepseek_v3_fp8"  # hidden 144: every [*, 144] weight has partial 16-wide edge blocks


def _tables(config, slot_to_expert):
    return build_assignment_tables(slot_to_expert, config.num_experts,
                                   widest_replicas(config.num_experts, slot_to_expert.shape[1]))


def _plans(config, ranks):
    """(round-robin default layout, an EPLB plan with replicas), both ``[Lm, 2E]``."""
    e, lm = config.num_experts, config.num_moe_layers
    rng = np.random.default_rng(5)
    return (np.tile(default_slot_to_expert(e, 2 * e, ranks), (lm, 1)),
            plan_placement(rng.lognormal(0, 1.5, (lm, e)), 2 * e, ranks).slot_to_expert)


# ----------------------------------------------------------------------------- arithmetic


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), b0=st.sampled_from([16, 64, 128]),
       b1=st.sampled_from([32, 128]), seed=st.integers(0, 2**31 - 1))
def test_dequantize_matches_numpy_blocks_with_partial_edges(rows, cols, b0, b1, seed):
    """The step's dequantization (jitted) equals a plain loop over blocks, edge blocks partial."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(2, rows, cols)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.01, 2.0, size=(2, -(-rows // b0), -(-cols // b1))).astype(np.float32)
    weight = BlockFp8(values, scale, (b0, b1))
    got = np.asarray(jax.jit(dequantize, static_argnums=1)(weight, jnp.float32))
    np.testing.assert_array_equal(got, dequantize_numpy(weight))
    for i in (0, 1):  # the checkpoint reader's [out, in] dequantization agrees on the transpose
        np.testing.assert_array_equal(got[i].T, dequantize_blocks(values[i].T, scale[i].T, (b1, b0)))


def test_dequantize_leaves_plain_arrays_alone():
    x = jnp.ones((3, 4), jnp.bfloat16)
    assert dequantize(x, jnp.float32) is x


# ----------------------------------------------------------------------------- residency


def _leaves(model):
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def test_fp8_checkpoint_stays_fp8_on_the_devices(mesh_of):
    source = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32)
    config = source.config
    assert config.fp8_block == (128, 128)
    plan = _plans(config, 4)[1]
    model = build_model(config, mesh_of(4), _tables(config, plan), source)
    leaves = _leaves(model)
    fp8 = {k: v for k, v in leaves.items() if v.dtype == FP8_DTYPE}
    # every linear weight the checkpoint stores in FP8 is FP8 here, with a float32 scale beside it
    linear = ("wq']", "wkv_a']", "wkv_b']", "wo']", "gate']", "up']", "down']", "w_gate'", "w_up'", "w_down'")
    assert {k for k in leaves if any(name in k for name in linear) and "scale" not in k} == set(fp8)
    assert len(fp8) == 2 * 4 + 3 + 3 + 3  # attention x 2 stacks, dense MLP, shared experts, routed slots
    # what the checkpoint keeps in float (embedding, head, norms, router, bias) stays float
    for key in ("['embed']", "['lm_head']", "['moe_layers']['layers']['mlp']['router_kernel']"):
        assert leaves[key + ".value"].dtype == jnp.float32
    # routed slots: one byte per weight on each device, scales sharded with them
    slots = model.moe_block.w_gate.get_value()
    scale = model.moe_block.w_gate_scale.get_value()
    lm, s, h, f = slots.shape
    shard = slots.addressable_shards[0].data
    assert shard.dtype == FP8_DTYPE and shard.nbytes == lm * (s // 4) * h * f
    assert scale.shape == (lm, s, 2, 1) and scale.addressable_shards[0].data.shape == (lm, s // 4, 2, 1)
    # the values are the checkpoint's bytes (transposed), slot by slot
    stored = source.tensors.raw(f"model.layers.1.mlp.experts.{plan[0, 3]}.gate_proj.weight")
    np.testing.assert_array_equal(np.asarray(slots[0, 3]).view(np.uint8), stored.T.view(np.uint8))


def test_a_bf16_checkpoint_is_untouched(mesh_of):
    source = HuggingFaceCheckpoint(FIXTURES / "deepseek_v3", max_seq_len=32)
    assert source.config.fp8_block is None
    model = build_model(source.config, mesh_of(2), _tables(source.config, _plans(source.config, 2)[0]), source)
    leaves = _leaves(model)
    assert not [k for k, v in leaves.items() if v.dtype == FP8_DTYPE or "scale" in k]


def test_weight_dtype_float32_dequantizes_at_load(mesh_of):
    source = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32, weight_dtype="float32")
    assert source.config.fp8_block is None
    model = build_model(source.config, mesh_of(2), _tables(source.config, _plans(source.config, 2)[0]), source)
    assert {v.dtype for v in _leaves(model).values()} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("ranks,policy", [(2, "round_robin"), (4, "load_aware")])
def test_fp8_in_the_step_equals_dequantize_at_load_and_transformers(ranks, policy, mesh_of):
    """Both paths compute on equal weights: the same logits bit for bit and transformers' tokens,
    under an EPLB plan with replicas."""
    reference = np.load(FP8_FIXTURE / "reference.npz")
    outputs = []
    for weight_dtype in ("auto", "float32"):
        source = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32, weight_dtype=weight_dtype)
        model = build_model(source.config, mesh_of(ranks), _tables(source.config, _plans(source.config, ranks)[1]),
                            source, options=MoEOptions(replica_policy=policy))
        outputs.append(run(ModelRunner(model), reference, ranks))
        assert_matches(reference, *outputs[-1])
    for fp8_logits, loaded_logits in zip(outputs[0][0], outputs[1][0]):
        np.testing.assert_array_equal(fp8_logits, loaded_logits)


def test_online_rebalance_moves_fp8_bytes_and_keeps_the_tokens(mesh_of):
    """The slot writer moves FP8 values with their scales (from the memory-mapped FP8 master copy and
    between devices): the slots equal a model built under the new plan, the tokens stay
    transformers', and the bytes moved are about half of a bf16 model's."""
    from jax_eplb.online import SlotWriter

    ranks = 4
    reference = np.load(FP8_FIXTURE / "reference.npz")
    moved = {}
    for weight_dtype in ("auto", "bf16"):
        source = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32, weight_dtype=weight_dtype)
        config = source.config
        old, new = _plans(config, ranks)
        model = build_model(config, mesh_of(ranks), _tables(config, old), source)
        target = build_model(config, mesh_of(ranks), _tables(config, new), source).slot_experts()
        for from_devices in (True, False):
            model.set_placement(_tables(config, old), source)
            writer = SlotWriter(model.mesh, device_copies=from_devices)
            experts = model.slot_experts()
            moves = []
            for layer in range(config.num_moe_layers):
                experts, move = writer.move_layer(experts, source.expert_source(config), layer, old[layer], new[layer])
                moves.append(move)
            model.set_slot_experts(experts)
            model.set_tables(_tables(config, new))
            for got, want in zip(jax.tree.leaves(model.slot_experts()), jax.tree.leaves(target)):
                np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
            moved[weight_dtype] = sum(m.bytes_moved for m in moves)
            if weight_dtype == "auto":
                assert_matches(reference, *run(ModelRunner(model), reference, ranks))
    slots = int((old != new).sum())
    h, f = config.hidden_size, config.expert_ffn_size
    assert moved["bf16"] == slots * 3 * h * f * 2
    assert moved["auto"] == slots * (3 * h * f + 3 * 2 * 4)  # e4m3 values + three 2x1 float32 scale grids
    assert 0.5 <= moved["auto"] / moved["bf16"] < 0.51


# ----------------------------------------------------------------------------- memory


def _per_device_bytes(array) -> int:
    return array.addressable_shards[0].data.nbytes


@pytest.mark.parametrize("weight_dtype", ["auto", "bf16"])
def test_memory_report_equals_the_built_model_arrays(weight_dtype, mesh_of):
    ranks, batch = 4, 8
    source = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32, weight_dtype=weight_dtype)
    config = source.config
    plan = _plans(config, ranks)[1]
    model = build_model(config, mesh_of(ranks), _tables(config, plan), source)
    _, slots, rest = nnx.split(model, SlotParam, ...)
    memory = device_memory(config, ep_size=ranks, num_slots=plan.shape[1], max_batch_size=batch)
    assert memory.routed_expert_bytes == sum(_per_device_bytes(a) for a in jax.tree.leaves(slots))
    assert memory.replicated_bytes == sum(_per_device_bytes(a) for a in jax.tree.leaves(rest))
    cache = ModelRunner(model).new_cache(batch)
    assert memory.kv_cache_bytes == sum(_per_device_bytes(a) for a in jax.tree.leaves(cache))

    def fp8_elements(tree) -> int:  # one layer's (the fixture has one layer of each kind)
        return sum(a.size for a in jax.tree.leaves(tree) if a.dtype == FP8_DTYPE)

    moe_replicated = fp8_elements(nnx.split(model.moe_layers, SlotParam, ...)[2])
    largest_layer = max(fp8_elements(slots) // ranks + moe_replicated, fp8_elements(nnx.state(model.dense_layers)))
    assert memory.transient_bytes == (largest_layer * 4 if weight_dtype == "auto" else 0)  # dequantized to float32
    assert memory.total_bytes == sum(memory[:4])


def test_the_dequantizing_transient_stays_within_the_report(mesh_of):
    """XLA's scratch memory for the FP8 step exceeds the dequantize-at-load step's by no more than the
    reported transient (one layer's FP8 weights dequantized): the whole stack is never dequantized at once."""
    ranks, batch = 2, 4
    temps, memory = {}, {}
    for weight_dtype in ("auto", "float32"):
        source = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32, weight_dtype=weight_dtype)
        config = source.config
        model = build_model(config, mesh_of(ranks), _tables(config, _plans(config, ranks)[0]), source)
        runner = ModelRunner(model)
        runner.compile(batch, 8)
        temps[weight_dtype] = sum(c.memory_analysis().temp_size_in_bytes for c in runner._compiled.values())
        memory[weight_dtype] = device_memory(config, ep_size=ranks, num_slots=2 * config.num_experts,
                                             max_batch_size=batch)
    assert memory["auto"].transient_bytes > 0
    assert temps["auto"] - temps["float32"] <= memory["auto"].transient_bytes * len(runner._compiled)


def test_memory_meets_the_deepseek_bars():
    """DeepSeek-V3/R1 as shipped (FP8): weights <= 100 GiB per device at EP8/256 and <= 45 GiB at
    EP32/288; dequantized to bf16 the same build reports about 184 GiB."""
    import jax_eplb_configs
    from jax_eplb.hf import hf_model_config

    path = jax_eplb_configs.hf_config_path("deepseek_v3")
    gib = 2 ** 30

    def weights(weight_dtype, ep, slots):
        memory = device_memory(hf_model_config(path, weight_dtype=weight_dtype)[0], ep_size=ep, num_slots=slots)
        return (memory.routed_expert_bytes + memory.replicated_bytes) / gib

    assert weights("auto", 8, 256) <= 100
    assert weights("auto", 32, 288) <= 45
    assert 180 <= weights("bf16", 8, 256) <= 188


class _PretendDevice:
    device_kind = "pretend GPU"

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return {"bytes_limit": self.limit}


def test_too_little_device_memory_is_refused_in_one_line():
    source = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32)
    memory = device_memory(source.config, ep_size=2, num_slots=16, max_batch_size=4)
    with pytest.raises(EplbInputError, match=r"needs .* GiB per device .* pretend GPU has") as err:
        check_fits(memory, _PretendDevice(memory.total_bytes - 1), "serve")
    assert "\n" not in str(err.value)
    check_fits(memory, _PretendDevice(memory.total_bytes), "serve")  # exactly enough: fine
    check_fits(memory, jax.devices("cpu")[0], "serve")  # a device that reports no size: not checked


# ----------------------------------------------------------------------------- command line


def _cli(args, capsys):
    from jax_eplb.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_memory_command_json_and_table(capsys):
    code, out, _ = _cli(["memory", "--model_path", str(FP8_FIXTURE), "--ep_size", "4", "--num_slots", "16",
                         "--max_batch_size", "8", "--max_seq_len", "32", "--format", "json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["linear_weights"].startswith("FP8")
    config = HuggingFaceCheckpoint(FP8_FIXTURE, max_seq_len=32).config
    want = device_memory(config, ep_size=4, num_slots=16, max_batch_size=8)
    assert {k: report[k] for k in want._fields} == want._asdict()
    code, out, _ = _cli(["memory", "--model", "tiny", "--ep_size", "2"], capsys)
    assert code == 0 and "routed experts" in out and "total" in out


@pytest.mark.parametrize("args,match", [
    (["memory", "--model", "tiny", "--ep_size", "2", "--weight_dtype", "fp8"], "goes with Hugging Face"),
    (["memory", "--model_path", str(FIXTURES / "mixtral"), "--ep_size", "2", "--weight_dtype", "fp8"],
     "stores no FP8 weights"),
    (["memory", "--model", "tiny", "--ep_size", "3"], "divisible"),
    (["memory", "--ep_size", "2"], "one of the arguments"),
    (["bench", "--model", "tiny", "throughput", "--dataset", "x.jsonl", "--ep", "2", "--weight_dtype", "bf16"],
     "goes with a Hugging Face --model_path"),
])
def test_bad_weight_dtype_and_memory_inputs_are_one_line(args, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text(json.dumps({"task_id": 0, "input_ids": [1, 2], "output_tokens": 2}) + "\n")
    try:
        code, out, err = _cli(args, capsys)
    except SystemExit as exit_:
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unsupported_quantization_is_refused(tmp_path):
    config = json.loads((FP8_FIXTURE / "config.json").read_text())
    for quantization, match in (({"quant_method": "mxfp4"}, "not supported"),
                                ({"quant_method": "fp8", "weight_block_size": None}, "per-tensor"),
                                ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "e5m2")):
        (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
        with pytest.raises(EplbInputError, match=match):
            HuggingFaceCheckpoint.__new__(HuggingFaceCheckpoint).__init__(tmp_path)


def test_quantize_then_dequantize_round_trips_within_fp8_precision():
    weight = np.random.default_rng(0).normal(size=(200, 136)).astype(np.float32)
    values, scale = quantize_blocks(weight)
    back = dequantize_numpy(BlockFp8(values.T, scale.T, (128, 128))).T
    assert np.abs(back - weight).max() <= 0.07 * np.abs(weight).max()  # e4m3: 3 mantissa bits
