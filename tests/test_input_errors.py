"""Bad input is one line on stderr and exit 2, before any work, with nothing written; inputs
TensorRT-LLM users pass (projection configs with ep_size, plan files as extra options) work."""

import json

import numpy as np
import pytest
import yaml

from jax_eplb import EplbInputError, save_trtllm_dump
from jax_eplb.cli import main
from jax_eplb.serving import load_dataset, load_extra_options


@pytest.fixture
def files(tmp_path, small):
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small.RAW))
    (tmp_path / "d.jsonl").write_text(json.dumps({"task_id": 0, "input_ids": [1, 2], "output_tokens": 2}) + "\n")
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    (tmp_path / "folder").mkdir()
    counts = np.random.default_rng(0).integers(0, 40, size=(2, 3, 2, 8))  # [R, I, L, E]
    save_trtllm_dump(tmp_path / "dump", counts, layer_ids=[1, 2], iter_start=0, num_experts_per_token=2)
    (tmp_path / "sglang.json").write_text(json.dumps({"logical_count": counts.sum(axis=(0, 1)).tolist()}))
    return tmp_path


def one_line_error(capsys, argv, match):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], lines
    assert "model small:" not in captured.out  # no model was built: the error came before any work
    return lines[0]


def _model_yaml(files, **change):
    raw = yaml.safe_load((files / "small.yaml").read_text())
    raw["model"].update(change)
    (files / "m.yaml").write_text(yaml.safe_dump(raw))
    return str(files / "m.yaml")


@pytest.mark.parametrize("change,match", [
    ({"first_k_dense": "1"}, "first_k_dense must be an integer, got '1'"),
    ({"rope_theta": "abc"}, "rope_theta must be a number"),
    ({"hidden_size": -32}, "hidden_size must be a positive integer"),
    ({"renormalize": "no"}, "renormalize must be true or false"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be > 0"),
])
def test_model_fields_of_the_wrong_type(files, capsys, change, match):
    path = _model_yaml(files, **change)
    line = one_line_error(capsys, ["bench", "--model", path, "throughput", "--ep", "2", "--dataset",
                                   str(files / "d.jsonl"), "--emulate_devices", "8"], match)
    assert "m.yaml" in line


def test_sizes_outputs_and_files_where_they_are_wrong(files, capsys):
    bench = ["bench", "--model", str(files / "small.yaml"), "throughput", "--dataset", str(files / "d.jsonl"),
             "--emulate_devices", "8"]
    for extra, match in [
        (["--ep", "0"], "--ep must be >= 1, got 0"), (["--ep", "-2"], "--ep must be >= 1, got -2"),
        (["--ep", "2", "--max_batch_size", "0"], "--max_batch_size must be >= 1"),
        (["--ep", "2", "--emulate_devices", "-1"], "--emulate_devices must be >= 1"),
        (["--ep", "2", "--report_json", str(files / "folder")], "is a directory"),
        (["--ep", "2", "--output_tokens", str(files / "binary" / "t.jsonl")], "cannot create files"),
        (["--ep", "2", "--tp", "4"], "--tp 4 must equal --ep 2"),
        (["--ep", "2", "--backend", "tensorrt"], "--backend 'tensorrt'"),
        (["--ep", "2", "--kv_cache_free_gpu_mem_fraction", "1.5"], "must be in (0, 1]"),
        (["--ep", "2", "--extra_llm_api_options", str(files / "folder")], "is not a file"),
        (["--ep", "2", "--extra_llm_api_options", str(files / "binary")], "not a text (YAML) file"),
    ]:
        one_line_error(capsys, bench + extra, match)
    bench[bench.index("--dataset") + 1] = str(files / "binary")
    one_line_error(capsys, bench + ["--ep", "2"], "not a text (JSON lines) file")
    one_line_error(capsys, ["bench", "--model", str(files / "folder"), "throughput", "--ep", "2", "--dataset",
                            str(files / "d.jsonl")], "is not a file")
    one_line_error(capsys, ["prepare-dataset", "--output", str(files / "p.jsonl"), "--vocab_size", "0",
                            "token-norm-dist", "--num_requests", "2", "--input_mean", "3", "--output_mean", "2"],
                   "--vocab_size must be >= 1")
    one_line_error(capsys, ["prepare-dataset", "--output", str(files / "folder"), "token-norm-dist",
                            "--num_requests", "2", "--input_mean", "3", "--output_mean", "2"], "is a directory")
    one_line_error(capsys, ["demo", "--num_slots", "70", "--output_dir", str(files / "demo")], "divisible")
    one_line_error(capsys, ["demo", "--output_dir", str(files / "binary")], "not a directory")
    one_line_error(capsys, ["generate", "--expert_statistic_path", str(files / "dump"), "--num_groups", "0",
                            "--output_path", str(files / "p.yaml")], "--num_groups must be >= 1")
    one_line_error(capsys, ["report", "--expert_statistic_path", str(files / "dump"), "--ep_size", "0"],
                   "--ep_size must be >= 1")
    one_line_error(capsys, ["generate", "--expert_statistic_path", str(files / "dump"), "--ep_sise", "2",
                            "--output_path", str(files / "p.yaml")], "unrecognized arguments: --ep_sise 2")
    assert not (files / "demo").exists() and not (files / "p.yaml").exists() and not (files / "p.jsonl").exists()


def test_yaml_errors_name_file_and_line(files, capsys):
    plan = files / "plan.yaml"
    plan.write_text("num_slots: 8\ninitial_global_assignments:\n  1: [0, 1, 2, 3, 4, 5, 6, 7]\n"
                    "  1: [7, 6, 5, 4, 3, 2, 1, 0]\n")
    line = one_line_error(capsys, ["report", "--expert_statistic_path", str(files / "dump"),
                                   "--projection_eplb_config_path", str(plan)], "duplicate key 1")
    assert "plan.yaml:4:" in line
    plan.write_text("num_slots: [8\n")
    assert "plan.yaml:2:" in one_line_error(capsys, ["generate", "--expert_statistic_path", str(files / "dump"),
                                                     "--previous_config", str(plan), "--output_path",
                                                     str(files / "p.yaml")], "malformed YAML")


def test_statistics_without_a_rank_split_need_ep_size(files, capsys):
    one_line_error(capsys, ["report", "--expert_statistic_path", str(files / "sglang.json")], "give --ep_size")
    one_line_error(capsys, ["generate", "--expert_statistic_path", str(files / "sglang.json"), "--output_path",
                            str(files / "p.yaml")], "give --ep_size")
    assert main(["report", "--expert_statistic_path", str(files / "sglang.json"), "--ep_size", "2",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["average"]["imbalance-ratio"] > 0


def test_projection_config_with_ep_size(files, capsys):
    """TensorRT-LLM's projection YAML carries the plan's ep_size: read and used."""
    slots = {1: [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3], 2: [7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4]}
    plan = files / "projection.yaml"
    plan.write_text(yaml.safe_dump({"ep_size": 4, "num_slots": 12, "initial_global_assignments": slots}))
    argv = ["report", "--expert_statistic_path", str(files / "dump"), "--format", "json",
            "--projection_eplb_config_path", str(plan)]
    assert main(argv) == 0
    with_key = json.loads(capsys.readouterr().out)
    plan_without = files / "plain.yaml"
    plan_without.write_text(yaml.safe_dump({"num_slots": 12, "initial_global_assignments": slots}))
    assert main(argv[:-1] + [str(plan_without), "--ep_size", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == with_key
    one_line_error(capsys, argv + ["--ep_size", "2"], "says ep_size 4 but --ep_size is 2")
    # without ep_size anywhere: the recorded 2 ranks split 12 slots, so that is used; 10 slots do not split
    slots10 = {k: v[:10] for k, v in slots.items()}
    plan_without.write_text(yaml.safe_dump({"num_slots": 10, "initial_global_assignments": slots10}))
    assert main(argv[:-1] + [str(plan_without)]) == 0  # 10 slots over the recorded 2 ranks
    capsys.readouterr()
    plan_without.write_text(yaml.safe_dump({"num_slots": 9, "initial_global_assignments":
                                            {k: v[:9] for k, v in slots.items()}}))
    one_line_error(capsys, argv[:-1] + [str(plan_without)], "9 slots do not split over 2 ranks")


def test_extra_options_are_read_or_refused(files):
    plan = {"num_slots": 24, "layer_updates_per_iter": 0}
    extra = files / "extra.yaml"
    extra.write_text(yaml.safe_dump(plan))  # a plan file passed directly
    options = load_extra_options(extra)
    assert options.load_balancer.num_slots == 24 and "taken as the moe_load_balancer config" in options.notes[0]
    extra.write_text(yaml.safe_dump({"moe_load_balancr": "plan.yaml"}))  # a typo must not run without EPLB
    with pytest.raises(EplbInputError, match=r"unknown option\(s\) \['moe_load_balancr'\]"):
        load_extra_options(extra)
    extra.write_text(yaml.safe_dump({"cuda_graph_config": {"max_batch_size": 8}, "moe_config": {"backend": "WIDEEP"},
                                     "moe_load_balancer": plan}))
    options = load_extra_options(extra)  # TensorRT-LLM options with no meaning here: noted
    assert options.ignored_keys == ("cuda_graph_config", "moe_config.backend")
    extra.write_text("")
    with pytest.raises(EplbInputError, match="empty"):
        load_extra_options(extra)


def test_duplicate_task_ids_are_refused(files):
    rows = [{"task_id": 3, "input_ids": [1], "output_tokens": 1}, {"task_id": 3, "input_ids": [2], "output_tokens": 1}]
    (files / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EplbInputError, match="task_id 3"):
        load_dataset(files / "dup.jsonl", vocab_size=64, max_seq_len=24)


def test_tokamax_without_tokamax_names_the_extra(files, capsys, monkeypatch):
    import jax_eplb.moe._tokamax as experts

    if experts.tokamax_unavailable() is None:  # installed here: pretend it is not
        monkeypatch.setattr(experts.importlib.util, "find_spec", lambda name: None)
    bench = ["bench", "--model", str(files / "small.yaml"), "throughput", "--ep", "2", "--dataset",
             str(files / "d.jsonl"), "--emulate_devices", "8", "--grouped_matmul", "tokamax"]
    line = one_line_error(capsys, bench, "--grouped_matmul tokamax: tokamax")
    assert "pip install 'jax-eplb[gpu]'" in line


def test_serve_refuses_bad_input_before_work(files, capsys, monkeypatch):
    import socket

    serve = ["serve", str(files / "small.yaml"), "--emulate_devices", "8"]
    for argv, match in [
        ([*serve, "--ep_size", "3"], "must be divisible"),
        ([*serve, "--ep_size", "2", "--tp_size", "4"], "--tp_size 4 must equal --ep_size 2"),
        ([*serve, "--ep_size", "2", "--max_batch_size", "0"], "--max_batch_size must be >= 1"),
        ([*serve, "--ep_size", "2", "--port", "70000"], "--port must be <= 65535"),
        ([*serve, "--ep_size", "2", "--online_state", str(files / "state")], "--online_state needs an online"),
        ([*serve, "--ep_size", "2", "--max_seq_len", "1"], "--max_seq_len must be >= 2"),
        ([*serve, "--ep_size", "2", "--extra_llm_api_options", str(files / "missing.yaml")], "missing.yaml"),
        ([*serve, "--ep_size", "2", "--grace_period", "-1"], "--grace_period must be >= 0"),
    ]:
        one_line_error(capsys, argv, match)
    with socket.socket() as taken:  # a port another program holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        one_line_error(capsys, [*serve, "--ep_size", "2", "--port", str(taken.getsockname()[1])], "cannot listen on")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else find_spec(name, *a))
    one_line_error(capsys, [*serve, "--ep_size", "2"], "pip install 'jax-eplb[serve]'")


HIDE_FASTAPI = r"""
import importlib.util, sys

class Missing:  # FastAPI is not installed: finding and importing it both fail
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fastapi":
            raise ModuleNotFoundError(f"No module named {name!r}")

find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "fastapi" else find_spec(name, *a)
sys.meta_path.insert(0, Missing())
from jax_eplb.cli import main
sys.exit(main(["serve", "tiny", "--ep_size", "2", "--emulate_devices", "2"]))
"""


def test_serve_without_the_extra_is_one_line_not_a_traceback():
    """``pip install -e .`` (no serve extra) then ``jax-eplb serve``: one line naming the extra, exit 2."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HIDE_FASTAPI], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "error: jax-eplb serve needs fastapi: pip install 'jax-eplb[serve]'", done.stderr
