"""Runner, datasets, extra options, statistics recording and the end-to-end workflow."""

import json
import re

import numpy as np
import pytest
import yaml

from jax_eplb import EplbInputError, MoeLoadBalancerConfig, load_report, load_trtllm_dump
from jax_eplb.cli import main
from jax_eplb.model import SeededWeights
from jax_eplb.serving import (Request, StatisticsRecorder, ThroughputSettings, initialize_distributed, load_dataset,
                              load_extra_options, prepare_dataset, run_throughput)
from jax_eplb.serving._workflow import WorkflowSettings, run_model_workflow


@pytest.fixture
def small_yaml(tmp_path, small):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small.RAW))
    return path


def serve(small, requests, ranks, plan=None, **kwargs):
    """``run_throughput`` of the small model (seed 0) on ``ranks`` emulated devices, quietly."""
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in ThroughputSettings.__dataclass_fields__}
    return run_throughput(small.config(), SeededWeights(0), requests, small_mesh(ranks),
                          ThroughputSettings(progress=False, **settings), plan=plan, log=lambda _: None, **kwargs)


def small_mesh(ranks):
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices("cpu")[:ranks]), ("ep",))


def requests_of(rows):
    return [Request(r["task_id"], tuple(r["input_ids"]), r["output_tokens"]) for r in rows]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- datasets and options

def test_prepare_dataset_round_trips(tmp_path):
    path = prepare_dataset(tmp_path / "d.jsonl", num_requests=10, input_mean=6, output_mean=3, input_stdev=2,
                           vocab_size=50, seed=1)
    requests = load_dataset(path, vocab_size=50, max_seq_len=64)
    assert [r.task_id for r in requests] == list(range(10))
    assert all(r.output_tokens == 3 and all(0 <= t < 50 for t in r.input_ids) for r in requests)
    assert len({len(r.input_ids) for r in requests}) > 1


@pytest.mark.parametrize("rows,match", [
    ([{"task_id": 0, "input_ids": [1, 2], "output_tokens": 30}], "exceeds the model's max_seq_len"),
    ([{"task_id": 0, "input_ids": [1, 99], "output_tokens": 2}], "outside the vocabulary"),
    ([{"task_id": 0, "input_ids": [1, 2], "output_tokens": 0}], "output_tokens"),
    ([{"task_id": 0, "output_tokens": 2}], "input_ids"),
    ([], "no requests"),
])
def test_bad_datasets(tmp_path, rows, match):
    with pytest.raises(EplbInputError, match=match):
        load_dataset(write_lines(tmp_path / "d.jsonl", rows), vocab_size=64, max_seq_len=24)


def test_dataset_text_prompts_and_bad_json(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"task_id": "a", "prompt": "hi", "output_tokens": 2}])
    assert load_dataset(path, 64, 24)[0].input_ids == (ord("h") % 64, ord("i") % 64)
    path.write_text("{not json\n")
    with pytest.raises(EplbInputError, match=r"d.jsonl:1: not JSON"):
        load_dataset(path, 64, 24)
    with pytest.raises(EplbInputError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl", 64, 24)


def test_extra_options_path_inline_and_nested(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"num_slots": 24, "layer_updates_per_iter": 0}))
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"moe_max_num_tokens": 64, "moe_load_balancer": "plan.yaml",
                                     "enable_attention_dp": True}))
    options = load_extra_options(extra)  # relative plan path: next to the options file
    assert options.moe_max_num_tokens == 64 and options.load_balancer.num_slots == 24
    assert options.ignored_keys == ("enable_attention_dp",)
    extra.write_text(yaml.safe_dump({"moe_config": {"max_num_tokens": 32, "load_balancer": {"num_slots": 20}}}))
    options = load_extra_options(extra)
    assert options.moe_max_num_tokens == 32 and options.load_balancer.num_slots == 20
    extra.write_text(yaml.safe_dump({"moe_max_num_tokens": -1}))
    with pytest.raises(EplbInputError, match="positive integer"):
        load_extra_options(extra)
    extra.write_text(yaml.safe_dump({"moe_load_balancer": {"num_slots": 20, "bogus": 1}}))
    with pytest.raises(EplbInputError, match="unknown key"):
        load_extra_options(extra)


# ----------------------------------------------------------------------------- recorder

def test_recorder_environment_and_window(tmp_path):
    env = {"EXPERT_STATISTIC_ITER_RANGE": "2-4", "EXPERT_STATISTIC_PATH": str(tmp_path / "s")}
    recorder = StatisticsRecorder.from_environment([1, 2], 2, env)
    assert StatisticsRecorder.from_environment([1], 2, {}) is None
    for it in range(6):
        recorder.begin_iteration(it)
        if recorder.wants(it):
            recorder.add(it, np.full((2, 3, 4), it))  # [Lm, R, X]
        if it == 4:
            assert recorder.written  # written when iteration `stop` starts
    stats = load_trtllm_dump(tmp_path / "s")
    assert (stats.iter_start, stats.num_iters, stats.layer_ids, stats.ep_size) == (2, 2, (1, 2), 3)
    np.testing.assert_array_equal(stats.counts[:, 0, 0], [2 * 3, 3 * 3])  # rank files summed
    again = StatisticsRecorder.from_environment([1, 2], 2, env)  # a re-run replaces the earlier dump whole
    for it in range(2, 5):
        again.begin_iteration(it)
        if again.wants(it):
            again.add(it, np.full((2, 2, 4), 10 * it))  # two ranks this time: no rank2 file may be left over
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["meta_info.json", "rank0.safetensors",
                                                                  "rank1.safetensors"]
    np.testing.assert_array_equal(load_trtllm_dump(tmp_path / "s").counts[:, 0, 0], [20 * 2, 30 * 2])
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(EplbInputError, match="not a statistics dump"):
        StatisticsRecorder.from_environment([1, 2], 2, env)
    for bad in ("5", "4-2", "a-b"):
        with pytest.raises(EplbInputError):
            StatisticsRecorder.from_environment([1], 2, {"EXPERT_STATISTIC_ITER_RANGE": bad,
                                                         "EXPERT_STATISTIC_PATH": str(tmp_path / "x")})


def test_distributed_initialisation_is_detected(monkeypatch):
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: calls.append(kw))
    assert not initialize_distributed(environ={})
    assert not initialize_distributed(environ={"SLURM_NTASKS": "1"})
    assert initialize_distributed(environ={"SLURM_NTASKS": "4"})
    assert initialize_distributed("host:1234", 2, 0, environ={})
    assert calls[-1] == {"coordinator_address": "host:1234", "num_processes": 2, "process_id": 0}


# ----------------------------------------------------------------------------- runner

def test_throughput_records_statistics_in_graph(tmp_path, small):
    rows = [{"task_id": i, "input_ids": list(range(1 + i % 5, 4 + i % 5 + i % 3)), "output_tokens": 2 + i % 4}
            for i in range(12)]
    config = small.config()
    recorder = StatisticsRecorder(tmp_path / "stats", 1, 5, config.moe_layer_ids, config.top_k)
    result = serve(small, requests_of(rows), 4, max_batch_size=8, recorder=recorder)
    result.write(str(tmp_path / "out.jsonl"), str(tmp_path / "r.json"))
    assert {k: len(v) for k, v in result.tokens.items()} == {r["task_id"]: r["output_tokens"] for r in rows}
    stats = load_trtllm_dump(tmp_path / "stats")
    assert (stats.iter_start, stats.num_iters, stats.ep_size, stats.num_experts) == (1, 4, 4, 16)
    assert tuple(stats.layer_ids) == (1, 2)
    # Iteration 1: the first batch's first decode: 8 rows active, top-4 -> 32 entries per layer.
    assert stats.counts[0].sum(axis=-1).tolist() == [32, 32]
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["output_tokens"] == sum(r["output_tokens"] for r in rows) and figures["iterations"] > 4
    lines = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {l["task_id"]: l["output_ids"] for l in lines} == result.tokens
    # Ctrl-C mid-window: what was recorded is written whole, marked partial
    recorder = StatisticsRecorder(tmp_path / "cut", 0, 6, config.moe_layer_ids, config.top_k)

    def interrupt(iteration, model):
        if iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        serve(small, requests_of(rows), 4, max_batch_size=8, recorder=recorder, before_iteration=interrupt)
    cut = load_trtllm_dump(tmp_path / "cut")
    assert cut.partial and (cut.iter_start, cut.num_iters) == (0, 3)
    assert json.loads((tmp_path / "cut" / "meta_info.json").read_text())["partial"] is True


def test_throughput_rejects_bad_input_before_work(tmp_path, small_yaml, capsys):
    dataset = write_lines(tmp_path / "d.jsonl", [{"task_id": 0, "input_ids": [1, 2], "output_tokens": 2}])
    base = ["bench", "--model", str(small_yaml), "throughput", "--dataset", str(dataset), "--no_progress",
            "--emulate_devices", "8"]
    cases = [
        (["--ep", "3"], "divisible by ep_size"),
        (["--ep", "16"], "needs 16 devices"),
        (["--ep", "2", "--transport", "ragged"], "needs GPUs"),
        (["--ep", "2", "--grouped_matmul", "pallas"], "needs GPUs (compiled Pallas)"),
        (["--ep", "2", "--prefill_chunk", "0"], "--prefill_chunk must be >= 1"),
        (["--ep", "2", "--enable_chunked_prefill"], "needs --max_num_tokens"),
        (["--ep", "2", "--extra_llm_api_options", str(tmp_path / "nope.yaml")], "does not exist"),
    ]
    for extra, match in cases:
        assert main(base + extra) == 2
        assert match in capsys.readouterr().err
    assert main(["bench", "--model", str(small_yaml), "throughput", "--ep", "2", "--dataset",
                 str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    long = write_lines(tmp_path / "long.jsonl", [{"task_id": 0, "input_ids": [1] * 20, "output_tokens": 10}])
    assert main(["bench", "--model", str(small_yaml), "throughput", "--ep", "2", "--dataset", str(long)]) == 2
    assert "max_seq_len" in capsys.readouterr().err
    bad_plan = tmp_path / "bad_plan.yaml"
    bad_plan.write_text(yaml.safe_dump({"moe_load_balancer": {"num_slots": 10}}))
    assert main(base + ["--ep", "2", "--extra_llm_api_options", str(bad_plan)]) == 2
    assert "num_slots (10) must be >=" in capsys.readouterr().err


def test_online_runner_keeps_tokens_and_records_slots(tmp_path, small):
    requests = requests_of([{"task_id": i, "input_ids": [(7 * i + j) % 64 for j in range(3 + i % 4)],
                             "output_tokens": 6} for i in range(8)])
    config = small.config()
    plain = serve(small, requests, 4, max_batch_size=8)
    plan = MoeLoadBalancerConfig.from_dict({"num_slots": 24, "layer_updates_per_iter": 1})
    recorder = StatisticsRecorder(tmp_path / "stats", 0, 6, config.moe_layer_ids, config.top_k)
    online = serve(small, requests, 4, plan, max_batch_size=8, recorder=recorder)
    assert online.tokens == plain.tokens
    assert online.figures["layer_updates"] > 0 and online.figures["slots_moved"] > 0
    assert online.slot_to_expert.shape == (2, 24)
    stats = load_trtllm_dump(tmp_path / "stats")  # slot ids with a balancer, as TensorRT-LLM
    assert stats.num_experts == 24 and stats.num_iters == 6
    assert stats.counts[1].sum(axis=-1).tolist() == [32, 32]  # 8 rows x top-4 per layer
    # A restarted server keeps its placement: state saved at exit, restored at start.
    state = tmp_path / "state"
    serve(small, requests, 4, plan, max_batch_size=8, online_state=str(state))
    logs = []
    second = run_throughput(config, SeededWeights(0), requests, small_mesh(4),
                            ThroughputSettings(max_batch_size=8, warmup=7, progress=False), plan=plan,
                            online_state=str(state), log=logs.append)
    assert any("restored" in line for line in logs)
    assert second.tokens == {k: v for k, v in plain.tokens.items() if k == 7}
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore(state.absolute())  # the second run's final state
    np.testing.assert_array_equal(np.asarray(saved["slot_to_expert"]), second.slot_to_expert)
    assert np.asarray(saved["statistics"]).shape == (2, 16)
    # a state saved for 24 slots is refused under a 32-slot plan, before any work
    wider = MoeLoadBalancerConfig.from_dict({"num_slots": 32, "layer_updates_per_iter": 1})
    with pytest.raises(EplbInputError, match="saved for 2 MoE layers, 16 experts, 24 slots.*32 slots"):
        run_throughput(config, SeededWeights(0), requests, small_mesh(4), plan=wider, online_state=str(state),
                       log=lambda line: pytest.fail(f"work started: {line}"))
    (tmp_path / "not_state").mkdir()
    with pytest.raises(EplbInputError, match="not an online balancer state"):
        run_throughput(config, SeededWeights(0), requests, small_mesh(4), plan=wider,
                       online_state=str(tmp_path / "not_state"))


def test_workflow_drops_imbalance_and_keeps_tokens(tmp_path, monkeypatch):
    """The README's main job on the embedded default model (smaller dataset)."""
    import jax_eplb.serving._workflow as workflow

    titled = []
    real_heatmap = workflow.save_heatmap
    monkeypatch.setattr(workflow, "save_heatmap", lambda *a, **k: titled.append(a[4]) or real_heatmap(*a, **k))
    summary = run_model_workflow(tmp_path, WorkflowSettings(num_requests=128, max_batch_size=128, output_len=16,
                                                            progress=False, compare_load_aware=True),
                                 log=lambda _: None)
    assert summary["tokens_identical"]
    assert summary["imbalance_before"] >= 3 * summary["imbalance_after"]
    assert summary["imbalance_after_load_aware"] <= summary["imbalance_after"]
    # The in-graph measurement is the same quantity as the recorded statistics' report.
    assert summary["in_graph_before"] == pytest.approx(summary["imbalance_before"], rel=1e-6)
    report = load_report(load_trtllm_dump(tmp_path / "expert_statistic_eplb"), ep_size=8)
    assert report.columns["imbalance-ratio"][-1] == pytest.approx(summary["imbalance_after"])
    assert (tmp_path / "load_heatmap.png").stat().st_size > 1000
    # the heatmap's titles give the printed (per-iteration) imbalance, not the window-summed one
    assert titled == [(summary["imbalance_before"], summary["imbalance_after"])]


def test_checkpoint_flow_through_the_cli(tmp_path, small_yaml, capsys):
    """create-checkpoint, then bench --model_path: same tokens as the same seed's random weights."""
    assert main(["create-checkpoint", "--model", str(small_yaml), "--output", str(tmp_path / "ckpt"),
                 "--seed", "3"]) == 0
    dataset = write_lines(tmp_path / "d.jsonl", [
        {"task_id": i, "input_ids": [(5 * i + j) % 64 for j in range(2 + i)], "output_tokens": 3} for i in range(4)])
    outputs = []
    for extra, traffic in ((["--model_path", str(tmp_path / "ckpt")], ["--report_traffic"]), (["--seed", "3"], [])):
        out = tmp_path / f"tokens{len(outputs)}.jsonl"
        assert main(["bench", "--model", str(small_yaml), *extra, "throughput", "--ep", "2", "--dataset",
                     str(dataset), "--emulate_devices", "8", "--no_progress", "--output_tokens", str(out),
                     *traffic]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 4
    printed = capsys.readouterr().out
    assert "throughput (output tok/s)" in printed
    assert printed.count("EP exchange per rank") == 1 and len(re.findall(r"decode +ragged +token", printed)) == 1


def test_inflight_batching_does_not_change_tokens(small):
    """Requests of different lengths refill freed rows; a row's cache is untouched while other
    rows prefill, so every request generates the same tokens at any batch size."""
    requests = requests_of([{"task_id": i, "input_ids": [(3 * i + j) % 64 for j in range(1 + i % 6)],
                             "output_tokens": 1 + (5 * i) % 7} for i in range(10)])
    runs = {batch: serve(small, requests, 2, max_batch_size=batch, traffic=batch == 4) for batch in (2, 4, 10)}
    assert runs[2].tokens == runs[4].tokens == runs[10].tokens  # traffic recording (batch 4) changes nothing
    _check_traffic_figures(runs[4].figures["traffic"], small.config(), tokens_per_rank={"decode": 2, "mixed": 2 * 6})
    assert "traffic" not in runs[2].figures
    phases = [r["phase"] for r in runs[2].per_iteration]
    assert phases.count("mixed") > 1  # rows were refilled mid-run, while others decoded
    assert runs[2].figures["iterations"] < sum(1 + (5 * i) % 7 for i in range(10))  # rows overlap


def _check_traffic_figures(traffic, config, tokens_per_rank):
    """all_to_all ships (R-1) blocks of fixed rows (2 ranks here); ragged ships at most that, and token
    dispatch at most the entries' rows."""
    hidden, k = config.hidden_size, config.top_k
    for phase, tokens in tokens_per_rank.items():
        modes = traffic[phase]
        for dispatch, rows, payload in (("token", tokens, k * 8), ("entry", tokens * k, 4)):
            fixed = modes[f"all_to_all/{dispatch}"]
            assert fixed["rows_sent"] == rows  # float32 activations; float32 results come back
            assert fixed["sent_mib"] * 2**20 == pytest.approx(rows * (hidden * 4 + payload) + rows * hidden * 4)
            assert fixed["receive_buffer_mib"] * 2**20 == 2 * rows * (hidden * 4 + payload)
            assert 0 < modes[f"ragged/{dispatch}"]["rows_sent"] <= rows
        assert modes["ragged/token"]["rows_sent"] <= modes["ragged/entry"]["rows_sent"]


def test_chunked_prefill_does_not_change_tokens(small):
    """Prompts prefilled a few tokens per iteration (while other rows decode) give the same tokens
    as whole-prompt prefill; more mixed iterations, none longer than the chunk."""
    requests = requests_of([{"task_id": i, "input_ids": [(7 * i + j) % 64 for j in range(1 + (3 * i) % 8)],
                             "output_tokens": 1 + i % 4} for i in range(9)])
    runs = {chunk: serve(small, requests, 2, max_batch_size=4, prefill_chunk=chunk) for chunk in (None, 3, 1)}
    assert runs[None].tokens == runs[3].tokens == runs[1].tokens
    mixed = {chunk: [r["phase"] for r in run.per_iteration].count("mixed") for chunk, run in runs.items()}
    assert mixed[None] < mixed[3] < mixed[1]
    assert runs[1].figures["output_tokens"] == runs[None].figures["output_tokens"]


def test_trtllm_chunked_prefill_flags_map_to_a_chunk(capsys):
    from argparse import Namespace

    from jax_eplb.cli import prefill_chunk

    flags = dict(enable_chunked_prefill=True, max_num_tokens=1024, max_batch_size=64, prefill_chunk=None)
    assert prefill_chunk(Namespace(**flags)) == 16  # the iteration's budget split over the batch rows
    assert prefill_chunk(Namespace(**{**flags, "max_num_tokens": 10})) == 1
    assert prefill_chunk(Namespace(**{**flags, "enable_chunked_prefill": False, "prefill_chunk": 7})) == 7
    assert "ignored" in capsys.readouterr().err  # --max_num_tokens without chunking has no effect here
    with pytest.raises(Exception, match="not both"):
        prefill_chunk(Namespace(**{**flags, "prefill_chunk": 7}))
