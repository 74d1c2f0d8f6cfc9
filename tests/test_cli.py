"""The command line through subprocess: report vs numpy, generate, bad input, demo."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jax_eplb import save_trtllm_dump

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(*args, ok=True):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def dump(tmp_path):
    counts = np.random.default_rng(1).integers(0, 100, size=(4, 5, 3, 8))  # [R, I, L, E]
    save_trtllm_dump(tmp_path / "stats", counts, layer_ids=[1, 2, 3], iter_start=20, num_experts_per_token=2)
    return tmp_path / "stats", counts


def numpy_report(expert_counts, ep_size):
    """Independent: TensorRT-LLM's metric definitions applied with plain numpy."""
    rank = expert_counts.reshape(*expert_counts.shape[:2], ep_size, -1).sum(-1)  # [I, L, R]
    mean = rank.mean(-1)
    return mean.mean(0), rank.std(-1, ddof=1).mean(0), (rank.max(-1) / mean - 1).mean(0)


def test_report_matches_numpy(dump):
    path, counts = dump
    out = run(SCRIPTS / "report_load_statistics.py", "--expert_statistic_path", path, "--format", "json").stdout
    rows = json.loads(out)
    mean, std, imb = numpy_report(counts.sum(0), 4)
    for i, layer in enumerate(["1", "2", "3"]):
        assert rows[layer]["mean"] == pytest.approx(mean[i])
        assert rows[layer]["std"] == pytest.approx(std[i])
        assert rows[layer]["imbalance-ratio"] == pytest.approx(imb[i])
    assert rows["average"]["imbalance-ratio"] == pytest.approx(imb.mean())
    table = run(SCRIPTS / "report_load_statistics.py", "--expert_statistic_path", path,
                "--iter_start", "21", "--iter_stop", "23").stdout
    assert table.splitlines()[1].split() == ["mean", "std", "imbalance-ratio"]
    assert table.splitlines()[-1].startswith("average")
    _, _, imb_window = numpy_report(counts.sum(0)[1:3], 4)
    assert float(table.splitlines()[-1].split()[-1]) == pytest.approx(imb_window.mean(), abs=1e-6)


def test_generate_then_projection(dump, tmp_path):
    path, counts = dump
    plan_path = tmp_path / "plan.yaml"
    run(SCRIPTS / "generate_eplb_config.py", "--expert_statistic_path", path, "--ep_size", "4",
        "--num_slots", "12", "--output_path", plan_path)
    plan = yaml.safe_load(plan_path.read_text())
    assert plan["num_slots"] == 12 and sorted(plan["initial_global_assignments"]) == [1, 2, 3]
    rows = json.loads(run("-m", "jax_eplb.cli", "report", "--expert_statistic_path", path,
                          "--projection_eplb_config_path", plan_path, "--ep_size", "4", "--format", "json").stdout)
    # Independent projection: split each expert's count evenly over its replicas.
    expert_counts = counts.sum(0)  # [I, L, E]
    for i, layer in enumerate([1, 2, 3]):
        slots = np.array(plan["initial_global_assignments"][layer])
        per_slot = expert_counts[:, i, slots] / np.bincount(slots, minlength=8)[slots]
        rank = per_slot.reshape(5, 4, 3).sum(-1)
        assert rows[str(layer)]["imbalance-ratio"] == pytest.approx((rank.max(-1) / rank.mean(-1) - 1).mean())
    base = json.loads(run("-m", "jax_eplb.cli", "report", "--expert_statistic_path", path, "--format", "json").stdout)
    assert rows["average"]["imbalance-ratio"] < base["average"]["imbalance-ratio"]
    # migration-aware re-plan on the same statistics moves nothing
    out = run("-m", "jax_eplb.cli", "generate", "--expert_statistic_path", path, "--ep_size", "4", "--num_slots",
              "12", "--output_path", tmp_path / "again.yaml", "--previous_config", plan_path).stdout
    assert "slots moved" in out and ": 0 of 36" in out


@pytest.mark.parametrize("extra,match", [
    (["--num_slots", "10"], "divisible"),
    (["--iter_start", "100"], "iteration window"),
    (["--previous_config", "missing.yaml"], "missing.yaml"),
])
def test_generate_bad_input_writes_nothing(dump, tmp_path, extra, match):
    path, _ = dump
    out_path = tmp_path / "never.yaml"
    proc = run("-m", "jax_eplb.cli", "generate", "--expert_statistic_path", path, "--ep_size", "4",
               "--output_path", out_path, *extra, ok=False)
    assert proc.returncode == 2
    assert match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out_path.exists()


def test_synthetic_demo_runs_offline_workflow(tmp_path):
    out = run("-m", "jax_eplb.cli", "demo", "--synthetic", "--output_dir", tmp_path / "demo").stdout
    assert "lower" in out and (tmp_path / "demo" / "load_heatmap.png").stat().st_size > 1000
    before_after = [float(l.split()[-1]) for l in out.splitlines() if l.startswith("average ")]
    assert before_after[0] > 3 * before_after[1]


def test_example_own_model_runs():
    """scripts/example_own_model.py: a user's Flax layer with our block, a YAML plan, a plan swap."""
    out = run(SCRIPTS / "example_own_model.py", "--ep", "4").stdout.splitlines()
    assert out[0].startswith("plan ") and "32 slots on 4 ranks" in out[0]
    assert out[1].endswith("output unchanged: True; compiled programs: 1")
