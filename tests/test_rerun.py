"""Each command of the workflow run twice over the same outputs: the second run succeeds and what is
there afterwards is its output (not the first run's); outputs that are not ours are refused before work;
every option's default is in ``--help``."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jax_eplb import MoeLoadBalancerConfig, load_trtllm_dump, save_trtllm_dump
from jax_eplb.cli import build_parser, main

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def ok(argv):
    assert main([str(a) for a in argv]) == 0


def refused(capsys, argv, match):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    return err[0]


def test_prepare_dataset_and_generate_twice(tmp_path, capsys):
    dataset = tmp_path / "dataset.json"
    for seed in (0, 1):
        ok(["prepare-dataset", "--output", dataset, "--seed", seed, "token-norm-dist", "--num-requests", 4,
            "--input-mean", 5, "--output-mean", 2, "--input-stdev", 1])
        rows = [json.loads(line) for line in dataset.read_text().splitlines()]
        assert len(rows) == 4
        if seed == 0:
            first = rows
    assert rows != first  # the second seed's dataset, not the first's

    counts = np.random.default_rng(3).integers(0, 60, size=(4, 3, 2, 8))  # [R, I, L, E]
    save_trtllm_dump(tmp_path / "stats", counts, layer_ids=[1, 2], iter_start=0, num_experts_per_token=2)
    plan = tmp_path / "plan.yaml"
    for num_slots in (8, 12):
        ok(["generate", "--expert_statistic_path", tmp_path / "stats", "--ep_size", 4, "--num_slots", num_slots,
            "--output_path", plan])
        assert MoeLoadBalancerConfig.from_yaml(plan).num_slots == num_slots
    out = subprocess.run([sys.executable, SCRIPTS / "generate_eplb_config.py", "--expert_statistic_path",
                          tmp_path / "stats", "--ep_size", "4", "--num_slots", "16", "--output_path", plan],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert MoeLoadBalancerConfig.from_yaml(plan).num_slots == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "plan.yaml", "stats"]  # no leftovers

    refused(capsys, ["generate", "--expert_statistic_path", tmp_path / "stats", "--output_path", tmp_path],
            "is a directory")
    refused(capsys, ["generate", "--expert_statistic_path", tmp_path / "stats", "--output_path",
                     plan / "below.yaml"], "cannot create files")
    assert MoeLoadBalancerConfig.from_yaml(plan).num_slots == 16  # a refused run leaves the old output


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anything: no unwritable file to test with")
def test_unwritable_outputs_are_refused_before_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "plan.yaml").write_text("old\n")
    (locked / "plan.yaml").chmod(0o444)
    locked.chmod(0o555)
    try:
        refused(capsys, ["generate", "--expert_statistic_path", tmp_path / "missing", "--output_path",
                         locked / "plan.yaml"], "is not writable")
        refused(capsys, ["prepare-dataset", "--output", locked / "new.json", "token-norm-dist", "--num-requests",
                         2, "--input-mean", 3, "--output-mean", 2], "cannot create files")
    finally:
        locked.chmod(0o755)


def test_create_checkpoint_twice_replaces_only_its_own(tmp_path, capsys, small):
    hf = tmp_path / "hf"
    shrink = ["--num_layers", 2, "--num_experts", 4, "--vocab_size", 64, "--dtype", "float32"]
    weights = []
    for seed in (0, 1):
        ok(["create-checkpoint", "--hf_config", "qwen3_30b_a3b", *shrink, "--output", hf, "--seed", seed])
        from safetensors.numpy import load_file

        tensors = {}
        for shard in sorted(hf.glob("*.safetensors")):
            tensors.update(load_file(shard))
        weights.append(tensors["model.embed_tokens.weight"])
    assert not np.array_equal(*weights)  # the second seed's weights are there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small.RAW))
    orbax = tmp_path / "ckpt"
    for seed in (0, 2):
        ok(["create-checkpoint", "--model", tmp_path / "small.yaml", "--output", orbax, "--seed", seed])
        assert f"seed: {seed}" in (orbax / ".jax_eplb_random_checkpoint").read_text().replace('"seed"', "seed")

    real = tmp_path / "real"  # somebody's checkpoint, not one create-checkpoint wrote
    real.mkdir()
    (real / "config.json").write_text("{}")
    line = refused(capsys, ["create-checkpoint", "--hf_config", "deepseek_v3", *shrink, "--output", real],
                   "is not a checkpoint create-checkpoint wrote")
    assert "remove it or give a new directory" in line
    assert sorted(p.name for p in real.iterdir()) == ["config.json"]
    refused(capsys, ["create-checkpoint", "--model", "tiny", "--output", tmp_path / "small.yaml"],
            "is not a directory")


def test_synthetic_demo_twice(tmp_path):
    out = tmp_path / "demo"
    for _ in range(2):
        ok(["demo", "--synthetic", "--output_dir", out])
    assert load_trtllm_dump(out / "expert_statistic").num_iters == 20
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no staging left


def test_bench_twice_over_its_outputs_and_statistics(tmp_path, monkeypatch, small):
    """bench throughput with recording, twice: tokens, figures and the statistics dump are the second run's."""
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small.RAW))
    monkeypatch.setenv("EXPERT_STATISTIC_ITER_RANGE", "0-3")
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", str(tmp_path / "stats"))
    files = {name: tmp_path / name for name in ("dataset.json", "tokens.jsonl", "report.json")}
    tokens = []
    for seed in (0, 1):
        ok(["prepare-dataset", "--output", files["dataset.json"], "--model", tmp_path / "small.yaml", "--seed",
            seed, "token-norm-dist", "--num-requests", 3 + seed, "--input-mean", 4, "--output-mean", 3])
        ok(["bench", "--model", tmp_path / "small.yaml", "throughput", "--ep", 2, "--emulate_devices", 8,
            "--dataset", files["dataset.json"], "--no_progress", "--output_tokens", files["tokens.jsonl"],
            "--report_json", files["report.json"]])
        tokens.append(files["tokens.jsonl"].read_text())
        assert json.loads(files["report.json"].read_text())["requests"] == 3 + seed
        assert load_trtllm_dump(tmp_path / "stats").num_iters == 3
    assert tokens[0] != tokens[1]  # other prompts, other tokens: the file is the second run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "report.json", "small.yaml", "stats",
                                                          "tokens.jsonl"]


def _options(parser, name="jax-eplb"):
    """(command, action) for every option of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _options(sub, f"{name} {sub_name}")
        elif action.option_strings:
            yield name, parser, action


def test_help_states_every_default(capsys):
    missing = []
    for command, parser, action in _options(build_parser()):
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or default == ():
            continue
        entry = " ".join(parser._get_formatter()._format_action(action).split())  # as --help prints it
        if "default" not in entry or str(default) not in entry:
            missing.append(f"{command} {action.option_strings[0]} (default {default!r})")
    assert not missing, missing
    assert main(["bench", "--model", "m", "throughput", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    assert "--transport {auto,all_to_all,ragged} MoE exchange" in printed
    assert printed.split("--transport {auto,all_to_all,ragged}")[1].split(" --")[0].endswith("(default: auto)")
