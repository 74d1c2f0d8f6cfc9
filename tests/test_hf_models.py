"""Hugging Face checkpoints (tests/fixtures/hf, written by transformers: scripts/make_hf_fixtures.py)
served on the ep mesh give transformers' own outputs: prefill logits within 2e-5 (relative to the
largest logit) and identical greedy tokens, for every architecture, ep size, placement, replica
policy and transport; a new placement swapped in keeps them and recompiles nothing."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jax_eplb import EplbInputError, build_assignment_tables, default_slot_to_expert, plan_placement
from jax_eplb._assignment import widest_replicas
from jax_eplb.hf import HuggingFaceCheckpoint, create_hf_checkpoint, dequantize_blocks, quantize_blocks
from jax_eplb.model import ModelRunner, build_model
from jax_eplb.moe import MoEOptions

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
NAMES = ("deepseek_v3", "deepseek_v3_fp8", "qwen3_moe", "mixtral", "glm4_moe", "kimi_k2", "gpt_oss", "gpt_oss_mxfp4")
# (fixture, ep, placement, replica policy, transport): every ep size, placement, policy and transport
# appears with several architectures.
CASES = [
    ("deepseek_v3", 1, "identity", "round_robin", "all_to_all"),
    ("deepseek_v3", 2, "planned", "load_aware", "all_to_all"),
    ("deepseek_v3", 4, "planned", "round_robin", "ragged"),
    ("deepseek_v3_fp8", 1, "identity", "round_robin", "all_to_all"),
    ("deepseek_v3_fp8", 8, "planned", "load_aware", "all_to_all"),
    ("qwen3_moe", 4, "planned", "load_aware", "all_to_all"),
    ("qwen3_moe", 8, "planned", "round_robin", "ragged"),
    ("mixtral", 2, "identity", "round_robin", "all_to_all"),
    ("mixtral", 8, "planned", "load_aware", "all_to_all"),
    ("glm4_moe", 2, "planned", "round_robin", "ragged"),
    ("kimi_k2", 8, "planned", "load_aware", "ragged"),
    ("gpt_oss", 4, "identity", "round_robin", "all_to_all"),
    ("gpt_oss_mxfp4", 8, "planned", "load_aware", "ragged"),
]  # the newer models also through `bench` at ep 4, without and with a plan: test_bench_serves_transformers_tokens


def run(runner, reference, ranks):
    """transformers' prompts through the runner: (prefill logits [P][len, V], greedy tokens [P, 16])."""
    prompts, lengths = reference["prompts"].astype(np.int32), reference["lengths"]
    count, width = prompts.shape
    batch = -(-count // ranks) * ranks  # pad with idle rows to a multiple of ep
    tokens = np.zeros((batch, width), np.int32)
    tokens[:count] = prompts
    rows = np.zeros(batch, np.int64)
    rows[:count] = lengths
    out = runner.prefill(tokens, rows, runner.new_cache(batch), return_logits=True)
    logits = [np.asarray(out.logits[i, :n]) for i, n in enumerate(lengths)]
    generated = [np.asarray(out.next_token)]
    positions, active = rows.copy(), rows > 0
    for _ in range(reference["tokens"].shape[1] - 1):
        out = runner.decode(np.asarray(out.next_token), positions, active, out.cache)
        positions += active
        generated.append(np.asarray(out.next_token))
    return logits, np.stack(generated, axis=1)[:count]


def assert_matches(reference, logits, tokens):
    for i, got in enumerate(logits):
        want = reference["logits"][i, :len(got)]
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()  # <= 2.5e-6 measured
    np.testing.assert_array_equal(tokens, reference["tokens"])


def placements(config, ranks, kind):
    """identity ([Lm, E]) or two different EPLB plans with replicas ([Lm, 2E])."""
    e, lm = config.num_experts, config.num_moe_layers
    if kind == "identity":
        return [np.tile(np.arange(e), (lm, 1))]
    rng = np.random.default_rng(ranks)
    return [np.tile(default_slot_to_expert(e, 2 * e, ranks), (lm, 1)),
            plan_placement(rng.lognormal(0, 1.5, (lm, e)), 2 * e, ranks).slot_to_expert]


@pytest.mark.parametrize("name,ranks,kind,policy,transport", CASES)
def test_outputs_equal_transformers(name, ranks, kind, policy, transport, mesh_of, ragged_emulation):
    source = HuggingFaceCheckpoint(FIXTURES / name, max_seq_len=32)
    reference = np.load(FIXTURES / name / "reference.npz")
    config = source.config
    plans = placements(config, ranks, kind)
    width = widest_replicas(config.num_experts, plans[0].shape[1])
    options = MoEOptions(replica_policy=policy, transport=transport,
                         ragged_exchange=ragged_emulation if transport == "ragged" else None)
    model = build_model(config, mesh_of(ranks), build_assignment_tables(plans[0], config.num_experts, width), source,
                        options=options)
    runner = ModelRunner(model)
    assert_matches(reference, *run(runner, reference, ranks))
    compiled = runner.compilations()
    for plan in plans[1:]:  # another placement while serving: same outputs, no new program
        model.set_placement(build_assignment_tables(plan, config.num_experts, width), source)
        assert_matches(reference, *run(runner, reference, ranks))
        assert runner.compilations() == compiled


def test_fixture_layouts_cover_the_architectures():
    """What the fixtures exercise (so a regenerated fixture cannot quietly lose it)."""
    configs = {name: HuggingFaceCheckpoint(FIXTURES / name).config for name in NAMES}
    assert configs["deepseek_v3"].attention == "mla" and configs["deepseek_v3"].q_lora_rank is not None
    assert configs["deepseek_v3"].yarn_factor == 40 and configs["deepseek_v3"].dense_layer_ids == [0]
    assert configs["deepseek_v3_fp8"].q_lora_rank is None and configs["deepseek_v3_fp8"].hidden_size % 128
    assert HuggingFaceCheckpoint(FIXTURES / "deepseek_v3_fp8").tensors.block_size == (128, 128)
    assert configs["qwen3_moe"].qk_norm and configs["qwen3_moe"].tie_word_embeddings
    assert configs["qwen3_moe"].moe_layer_ids == [1, 3] and configs["qwen3_moe"].dense_layer_ids == [0, 2]
    assert (FIXTURES / "qwen3_moe" / "model.safetensors.index.json").is_file()
    assert configs["mixtral"].router == "softmax" and configs["mixtral"].dense_layer_ids == []
    glm = configs["glm4_moe"]
    assert glm.attention_bias and glm.qk_norm and glm.rotary_dim == glm.head_dim // 2 and glm.dense_layer_ids == [0]
    assert glm.router == "deepseek" and glm.num_shared_experts == 1
    kimi = configs["kimi_k2"]
    assert kimi.n_group == 1 and kimi.yarn_beta_fast == kimi.yarn_beta_slow == 1 and kimi.num_experts == 12
    for name in ("gpt_oss", "gpt_oss_mxfp4"):
        oss = configs[name]
        assert oss.sliding_window_layers == (0, 2) and oss.attention_sinks and oss.attention_out_bias
        assert oss.expert_bias and oss.router_logit_bias and oss.activation == "clamped_swiglu"
        assert not oss.yarn_truncate and oss.swiglu_limit == 0.5
    assert HuggingFaceCheckpoint(FIXTURES / "gpt_oss_mxfp4").layout.fused_experts == "mxfp4"


def quantize_mxfp4(values):
    """float ``[..., K]`` -> MXFP4 (blocks ``[..., K/32, 16]``, scales ``[..., K/32]``): each block's scale
    makes its largest magnitude at most 6, values round to the nearest e2m1 code, low nibble first."""
    from jax_eplb.hf._mxfp4 import FP4_VALUES

    grouped = np.asarray(values, np.float32).reshape(*np.shape(values)[:-1], -1, 32)
    largest = np.abs(grouped).max(axis=-1)
    exponent = np.where(largest > 0, np.ceil(np.log2(np.maximum(largest, 1e-30) / 6.0)), 0).astype(np.int32)
    codes = np.abs((grouped / np.ldexp(np.float32(1), exponent)[..., None])[..., None] - FP4_VALUES).argmin(-1)
    pairs = codes.astype(np.uint8).reshape(*codes.shape[:-1], 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8), (exponent + 127).astype(np.uint8)


def test_mxfp4_hand_worked_and_round_trip():
    """MXFP4: low nibble first, e2m1 codes, exponent biased by 127 (hand-worked); quantizing a block
    whose values are e2m1 numbers times a power of two gives them back exactly."""
    from jax_eplb.hf._mxfp4 import dequantize_mxfp4

    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x92  # low nibble 2 (1.0), high nibble 9 (-0.5)
    blocks[0, 15] = 0x7F  # low 15 (-6.0), high 7 (6.0)
    got = dequantize_mxfp4(blocks, np.array([129], np.uint8))  # 2^(129 - 127) = 4
    want = np.zeros(32, np.float32)
    want[[0, 1, 30, 31]] = [4.0, -2.0, -24.0, 24.0]
    np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(0)
    from jax_eplb.hf._mxfp4 import FP4_VALUES

    powers = np.float32(2.0) ** rng.integers(-3, 4, (3, 2))  # one per block of 32
    exact = FP4_VALUES[rng.integers(0, 16, (3, 64))] * powers.repeat(32, 1)
    exact[:, ::32] = 6 * powers  # each block's largest magnitude is 6 * 2^k
    np.testing.assert_array_equal(dequantize_mxfp4(*quantize_mxfp4(exact)), exact)
    with pytest.raises(EplbInputError, match="do not match"):
        dequantize_mxfp4(np.zeros((2, 16), np.uint8), np.zeros((3,), np.uint8))


def test_fp8_blocks_dequantize_with_partial_edges():
    """Hand-worked: a 3x5 weight in 2x2 blocks has a 2x3 scale grid; edge blocks are partial."""
    weight = np.arange(15, dtype=np.float32).reshape(3, 5)
    scale = np.array([[1, 2, 3], [10, 20, 30]], np.float32)
    want = weight * np.array([[1, 1, 2, 2, 3]] * 2 + [[10, 10, 20, 20, 30]], np.float32)
    np.testing.assert_array_equal(dequantize_blocks(weight, scale, (2, 2)), want)
    with pytest.raises(EplbInputError, match="weight_scale_inv has shape"):
        dequantize_blocks(weight, scale[:, :2], (2, 2), "w")
    rng = np.random.default_rng(0)
    value = rng.normal(size=(200, 130)).astype(np.float32)
    fp8, scale_inv = quantize_blocks(value)
    assert fp8.dtype.name == "float8_e4m3fn" and scale_inv.shape == (2, 2)
    back = dequantize_blocks(fp8, scale_inv, (128, 128))
    assert np.abs(back - value).max() <= 0.07 * np.abs(value).max()  # e4m3: 3 mantissa bits


def copy_fixture(tmp_path, name="mixtral"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "not supported; supported: \\['deepseek_v3', 'glm4_moe', 'gpt_oss', 'kimi_k2', "
                              "'mixtral', 'qwen3_moe'\\]"),
    ({"sliding_window": 4096}, "sliding_window=4096 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"some_new_field": 1}, "not implemented by jax_eplb's mixtral model"),
    ({"num_local_experts": 0}, "num_local_experts must be an integer >= 1"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, "rope type 'linear'"),
    ({"hidden_size": 96}, "has shape"),
])
def test_bad_configs_are_one_clear_error(tmp_path, change, match):
    directory = copy_fixture(tmp_path)
    edit_config(directory, **change)
    with pytest.raises(EplbInputError, match=match):
        HuggingFaceCheckpoint(directory).check()


@pytest.mark.parametrize("name,change,match", [
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.01}},
     "gives 0 rotary dims"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                      "original_max_position_embeddings": 64}}, "rope type 'yarn'"),
    ("kimi_k2", {"architectures": ["KimiK25ForConditionalGeneration"]}, "kimi_k2 with architectures"),
    ("kimi_k2", {"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
    ("gpt_oss", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types must list 3"),
    ("gpt_oss", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "layer_types"),
    ("gpt_oss", {"experts_per_token": 3}, "experts_per_token and num_experts_per_tok differ"),
    ("gpt_oss", {"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization 'bitsandbytes'"),
    ("gpt_oss_mxfp4", {"hidden_size": 96}, "has shape"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "truncate": False,
                                         "original_max_position_embeddings": 4096}}, "truncate false"),
])
def test_bad_configs_of_the_newer_models(tmp_path, name, change, match):
    directory = copy_fixture(tmp_path, name)
    edit_config(directory, **change)
    with pytest.raises(EplbInputError, match=match):
        HuggingFaceCheckpoint(directory).check()


def test_bad_checkpoint_files_are_one_clear_error(tmp_path):
    directory = copy_fixture(tmp_path)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(EplbInputError, match="not valid JSON"):
        HuggingFaceCheckpoint(directory)
    (directory / "config.json").unlink()
    with pytest.raises(EplbInputError, match="no config.json"):
        HuggingFaceCheckpoint(directory)
    directory = copy_fixture(tmp_path / "truncated")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(EplbInputError, match="model.safetensors"):
        HuggingFaceCheckpoint(directory).check()
    sharded = copy_fixture(tmp_path / "sharded", "qwen3_moe")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(EplbInputError, match="lists shard\\(s\\) that do not exist"):
        HuggingFaceCheckpoint(sharded)
    missing = copy_fixture(tmp_path / "missing", "qwen3_moe")
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EplbInputError, match="experts.3.up_proj.weight' is missing"):
        HuggingFaceCheckpoint(missing).check()


def test_create_checkpoint_in_hf_layout_round_trips(tmp_path, mesh_of):
    """create-checkpoint --hf_config: a random FP8 checkpoint our loader reads and serves."""
    path = create_hf_checkpoint(FIXTURES / "deepseek_v3" / "config.json", tmp_path / "ckpt", num_layers=2,
                                num_experts=8, fp8=True, seed=3, dtype="float32", log=lambda _: None)
    source = HuggingFaceCheckpoint(path, max_seq_len=16)
    source.check()
    config = source.config
    assert (config.num_layers, config.num_experts, config.moe_layer_ids) == (2, 8, [1])
    assert any(name.endswith("weight_scale_inv") for name in source.tensors.names())
    (tmp_path / "theirs").mkdir()  # a directory create-checkpoint did not write is never replaced
    (tmp_path / "theirs" / "model.safetensors").write_bytes(b"")
    with pytest.raises(EplbInputError, match="not a checkpoint create-checkpoint wrote"):
        create_hf_checkpoint(FIXTURES / "deepseek_v3" / "config.json", tmp_path / "theirs", log=lambda _: None)
    tables = build_assignment_tables(np.tile(np.arange(8), (1, 2)), 8, 9)
    model = build_model(config, mesh_of(2), tables, source)
    slots = model.moe_block.w_gate.get_value()  # served in FP8: one byte per routed-expert weight on each device
    assert slots.dtype.itemsize == 1 and slots.addressable_shards[0].data.nbytes == slots.size // 2
    runner = ModelRunner(model)
    out = runner.prefill(np.array([[1, 2, 3], [4, 5, 0]], np.int32), np.array([3, 2]), runner.new_cache(2))
    assert np.asarray(out.next_token).shape == (2,) and int(np.asarray(out.rank_load).sum()) == 5 * config.top_k


def test_create_checkpoint_of_gpt_oss(tmp_path):
    """A random gpt-oss-120b checkpoint, shrunk (its layer types cut to the layers kept), passes its
    own header check and loads: experts fused, bf16, not MXFP4; FP8 is refused."""
    path = create_hf_checkpoint("gpt_oss_120b", tmp_path / "ckpt", num_layers=2, num_experts=4, vocab_size=64,
                                log=lambda _: None)
    source = HuggingFaceCheckpoint(path, max_seq_len=16)
    source.check()
    assert (source.config.num_layers, source.config.num_experts) == (2, 4)
    assert source.config.sliding_window_layers == (0,) and source.layout.fused_experts == "bf16"
    gate = source.rows(0, np.array([1])).gate
    assert gate.shape == (1, 2881, 2880) and np.abs(gate).max() > 0
    with pytest.raises(EplbInputError, match="MXFP4 experts, not FP8"):
        create_hf_checkpoint("gpt_oss_120b", tmp_path / "fp8", fp8=True, log=lambda _: None)


def test_workflow_on_a_checkpoint_through_the_cli(tmp_path, monkeypatch, capsys):
    """The TensorRT-LLM workflow on a real-architecture checkpoint: record statistics (decoder-layer
    keys 1, 2), report, generate a plan, serve it statically and online (experts read back from the
    memory-mapped checkpoint): tokens identical throughout."""
    from jax_eplb import load_trtllm_dump
    from jax_eplb.cli import main

    checkpoint = str(FIXTURES / "deepseek_v3")
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"task_id": i, "input_ids": [(7 * i + j) % 128 for j in range(3 + i % 5)],
                                           "output_tokens": 6}) + "\n" for i in range(12)))
    bench = ["bench", "--model", "deepseek-ai/DeepSeek-V3-tiny", "--model_path", checkpoint, "throughput", "--ep", "4",
             "--emulate_devices", "8", "--dataset", str(dataset), "--no_progress"]
    monkeypatch.setenv("EXPERT_STATISTIC_ITER_RANGE", "0-100")
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", str(tmp_path / "stats"))
    assert main(bench + ["--output_tokens", str(tmp_path / "plain.jsonl")]) == 0
    monkeypatch.delenv("EXPERT_STATISTIC_ITER_RANGE")
    assert "MTP layer(s) (index >= 3) skipped" in capsys.readouterr().out
    stats = load_trtllm_dump(tmp_path / "stats")
    assert stats.layer_ids == (1, 2) and stats.num_experts == 16
    assert main(["report", "--expert_statistic_path", str(tmp_path / "stats")]) == 0
    assert main(["generate", "--expert_statistic_path", str(tmp_path / "stats"), "--ep_size", "4", "--num_slots", "24",
                 "--output_path", str(tmp_path / "plan.yaml")]) == 0
    (tmp_path / "static.yaml").write_text(f"moe_load_balancer: {tmp_path / 'plan.yaml'}\n")
    (tmp_path / "online.yaml").write_text("moe_load_balancer:\n  num_slots: 24\n  layer_updates_per_iter: 1\n")
    for name in ("static", "online"):
        assert main(bench + ["--extra_llm_api_options", str(tmp_path / f"{name}.yaml"),
                             "--output_tokens", str(tmp_path / f"{name}.jsonl")]) == 0
        assert (tmp_path / f"{name}.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()
    assert "slots moved (total)" in capsys.readouterr().out


def test_experts_are_read_per_shard_and_once_per_process(mesh_of):
    """Streaming load: each process reads the experts of its own slots only, a replicated expert once."""
    source = HuggingFaceCheckpoint(FIXTURES / "mixtral", max_seq_len=32)
    reads = []
    original = source.tensors.stored
    source.tensors.stored = lambda name, shape: (reads.append(name), original(name, shape))[1]
    config = source.config
    plan = np.tile(np.concatenate([np.arange(8), np.arange(8)]), (config.num_moe_layers, 1))  # every expert twice
    experts = source.slot_experts(config, mesh_of(4), plan)
    want = [f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight" for l in range(config.num_moe_layers)
            for e in range(8) for w in ("w1", "w3", "w2")]
    assert sorted(reads) == sorted(want)  # every expert once, though each sits in two slots on two ranks
    np.testing.assert_array_equal(np.asarray(experts.gate[1, 8]), np.asarray(experts.gate[1, 0]))


def test_fused_experts_are_read_row_by_row(mesh_of, monkeypatch):
    """gpt-oss stores each layer's experts in one tensor: loading reads each expert's rows of it once
    (a replicated expert too), never the whole tensor (the [E, 2F] / [E, H] biases are read whole)."""
    from jax_eplb.hf._safetensors import ExpertRows

    reads = []
    row = ExpertRows.__getitem__
    monkeypatch.setattr(ExpertRows, "__getitem__", lambda self, i: (reads.append((self.name, int(i))), row(self, i))[1])
    monkeypatch.setattr(ExpertRows, "__array__", lambda *_, **__: pytest.fail("a whole fused tensor was read"))
    source = HuggingFaceCheckpoint(FIXTURES / "gpt_oss_mxfp4", max_seq_len=32)
    config = source.config
    plan = np.tile(np.concatenate([np.arange(8), np.arange(8)]), (config.num_moe_layers, 1))  # every expert twice
    experts = source.slot_experts(config, mesh_of(4), plan)
    names = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
    want = [(f"model.layers.{l}.mlp.experts.{n}", e) for l in range(3) for e in range(8) for n in names]
    assert sorted(reads) == sorted(want)
    np.testing.assert_array_equal(np.asarray(experts.down[2, 9]), np.asarray(experts.down[2, 1]))
    np.testing.assert_array_equal(np.asarray(source.rows(2, np.array([1])).down[0]), np.asarray(experts.down[2, 1]))


def test_text_prompts_use_the_checkpoint_tokenizer(tmp_path):
    """A dataset's ``prompt`` text is tokenized with the checkpoint's tokenizer.json; prepare-dataset
    turns a text file into a dataset with the same ids."""
    from tokenizers import Tokenizer

    from jax_eplb.cli import main
    from jax_eplb.serving import load_dataset, read_bench_inputs

    checkpoint = FIXTURES / "qwen3_moe"
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    text = "the lazy dog moves hot experts"
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"task_id": "a", "prompt": text, "output_tokens": 4}) + "\n")
    inputs = read_bench_inputs("qwen", str(dataset), 2, model_path=str(checkpoint), environ={})
    assert inputs.requests[0].input_ids == tuple(tokenizer.encode(text).ids)
    assert 0 not in inputs.requests[0].input_ids  # every word is in the vocabulary (id 0 is unknown)
    assert inputs.config.max_seq_len == 16  # the longest request (6 + 4), rounded up to 16
    (tmp_path / "prompts.txt").write_text(f"{text}\n\nthe quick brown fox\n")
    assert main(["prepare-dataset", "--output", str(tmp_path / "t.jsonl"), "--tokenizer", str(checkpoint), "text",
                 "--file", str(tmp_path / "prompts.txt"), "--output-tokens", "4"]) == 0
    requests = load_dataset(tmp_path / "t.jsonl", 128, 64)
    assert [r.input_ids for r in requests] == [tuple(tokenizer.encode(t).ids) for t in (text, "the quick brown fox")]


def deepseek_yarn_frequencies(dim, base, factor, original, beta_fast, beta_slow):
    """DeepSeek-V3's ``precompute_freqs_cis`` frequencies, transcribed with plain math/numpy."""
    import math

    def correction_dim(rotations):
        return dim * (math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base)))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    smooth = 1 - np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    return freqs * (smooth + (1 - smooth) / factor)


@pytest.mark.parametrize("dim,original,beta_fast,beta_slow", [(64, 4096, 32, 1), (16, 64, 32, 1), (32, 1000, 32, 1),
                                                              (32, 4096, 1, 1)])
def test_yarn_follows_deepseek(dim, original, beta_fast, beta_slow):
    """YaRN frequencies and softmax scale as DeepSeek's inference code computes them (the correction
    range floored / ceiled; Kimi-K2's beta_fast = beta_slow = 1 gives an empty range at dim 32)."""
    import dataclasses

    from jax_eplb.model import ModelConfig
    from jax_eplb.model._rope import inv_frequencies, softmax_scale

    base = HuggingFaceCheckpoint(FIXTURES / "deepseek_v3").config
    config = dataclasses.replace(base, qk_rope_head_dim=dim, head_dim=dim, yarn_original_max_position=original,
                                 yarn_beta_fast=float(beta_fast), yarn_beta_slow=float(beta_slow))
    assert isinstance(config, ModelConfig)
    want = deepseek_yarn_frequencies(dim, 10000.0, 40.0, original, beta_fast, beta_slow)
    np.testing.assert_allclose(np.asarray(inv_frequencies(config, dim)), want, rtol=2e-6)
    mscale = 0.1 * 1.0 * np.log(40.0) + 1.0
    assert softmax_scale(config, 192) == pytest.approx(192 ** -0.5 * mscale ** 2)
    short = dataclasses.replace(config, max_position_embeddings=original, max_seq_len=32)  # as transformers: YaRN
    np.testing.assert_allclose(np.asarray(inv_frequencies(short, dim)), want, rtol=2e-6)  # whatever the length
    assert softmax_scale(short, 192) == pytest.approx(192 ** -0.5 * mscale ** 2)
    plain = dataclasses.replace(config, yarn_factor=None)
    np.testing.assert_allclose(np.asarray(inv_frequencies(plain, dim)), 10000.0 ** (-np.arange(dim // 2) / (dim // 2)),
                               rtol=1e-6)


def test_plan_for_another_expert_count_is_refused_before_work(tmp_path, capsys):
    from jax_eplb.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text("initial_global_assignments:\n" + "".join(f"  {l}: {list(range(8)) * 2}\n" for l in (1, 2))
                    + "num_slots: 16\n")
    (tmp_path / "extra.yaml").write_text(f"moe_load_balancer: {plan}\n")
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"task_id": 0, "input_ids": [1, 2], "output_tokens": 2}) + "\n")
    assert main(["bench", "--model", "m", "--model_path", str(FIXTURES / "deepseek_v3"), "throughput", "--ep", "2",
                 "--emulate_devices", "8", "--dataset", str(dataset), "--extra_llm_api_options",
                 str(tmp_path / "extra.yaml"), "--output_tokens", str(tmp_path / "out.jsonl")]) == 2
    assert "places 8 distinct experts" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("name", ["glm4_moe", "kimi_k2", "gpt_oss", "gpt_oss_mxfp4"])
def test_bench_serves_transformers_tokens(name, tmp_path, capsys):
    """``jax-eplb bench --model_path`` at ep 4, without and with an EPLB plan (load_aware replica
    choice): every request's greedy tokens are transformers' own."""
    from jax_eplb import plan_config_from_slots
    from jax_eplb.cli import main

    reference = np.load(FIXTURES / name / "reference.npz")
    config = HuggingFaceCheckpoint(FIXTURES / name, max_seq_len=32).config
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"task_id": i, "input_ids": [int(t) for t in prompt[:n]],
                                           "output_tokens": reference["tokens"].shape[1]}) + "\n"
                               for i, (prompt, n) in enumerate(zip(reference["prompts"], reference["lengths"]))))
    plan = placements(config, 4, "planned")[1]
    plan_config_from_slots(plan, config.moe_layer_ids).to_yaml(tmp_path / "plan.yaml")
    (tmp_path / "options.yaml").write_text(f"moe_load_balancer: {tmp_path / 'plan.yaml'}\n")
    bench = ["bench", "--model", name, "--model_path", str(FIXTURES / name), "throughput", "--ep", "4",
             "--emulate_devices", "8", "--dataset", str(dataset), "--max_seq_len", "32", "--replica_policy",
             "load_aware", "--no_progress"]
    runs = [("plain", []), ("planned", ["--extra_llm_api_options", str(tmp_path / "options.yaml")])]
    if name.startswith("gpt_oss"):  # online rebalancing: experts taken out of the fused (MXFP4) layer tensors
        (tmp_path / "online.yaml").write_text(f"moe_load_balancer:\n  num_slots: {2 * config.num_experts}\n"
                                              f"  layer_updates_per_iter: 1\n")
        runs.append(("online", ["--extra_llm_api_options", str(tmp_path / "online.yaml"), "--online_lockstep"]))
    for run, extra in runs:
        assert main(bench + extra + ["--output_tokens", str(tmp_path / f"{run}.jsonl")]) == 0
        lines = [json.loads(line) for line in (tmp_path / f"{run}.jsonl").read_text().splitlines()]
        tokens = {line["task_id"]: line["output_ids"] for line in lines}
        assert [tokens[i] for i in range(len(lines))] == reference["tokens"].tolist()
    out = capsys.readouterr().out
    assert f"{config.num_experts * 2} slots" in out
    if name.startswith("gpt_oss"):
        assert "slots moved (total)" in out


@pytest.mark.parametrize("hf_config,ep,slots,expert_bytes", [
    ("gpt_oss_120b", 8, 128, (2 * 2881 * 2880 + 2881 * 2880) * 2),  # bias rows; MXFP4 dequantized to bf16
    ("glm4_5", 8, 160, 3 * 5120 * 1536 * 2),
    ("kimi_k2", 32, 416, 3 * 7168 * 2048 + 3 * 56 * 16 * 4),  # FP8 values + float32 128x128 block scales
])
def test_memory_of_the_shipped_configs(hf_config, ep, slots, expert_bytes):
    """``jax-eplb memory``'s routed-expert bytes per device, hand-worked: slots per rank x MoE layers x one expert."""
    import jax_eplb_configs
    from jax_eplb.hf import hf_model_config
    from jax_eplb.model import device_memory

    config = hf_model_config(jax_eplb_configs.hf_config_path(hf_config))[0]
    memory = device_memory(config, ep_size=ep, num_slots=slots)
    assert memory.routed_expert_bytes == slots // ep * config.num_moe_layers * expert_bytes
    assert config.num_moe_layers == {"gpt_oss_120b": 36, "glm4_5": 89, "kimi_k2": 60}[hf_config]
