"""Multi-host serving, as two processes of four CPU devices each (jax.distributed over localhost).

The same run in one process of eight devices is the reference: generated tokens, recorded
statistics and online-balancing figures must be identical (every process plans the same layers
from the same statistics and applies them at the same iteration; process 0 alone writes files).
"""

import os
import socket
import subprocess
import sys

import numpy as np

import jax_eplb

ONLINE = "moe_load_balancer:\n  num_slots: 80\n  layer_updates_per_iter: 1\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_command(out, *bench_flags, devices):
    return [sys.executable, "-m", "jax_eplb.cli", "bench", "--model", "tiny", *bench_flags, "throughput",
            "--ep", "8", "--emulate_devices", str(devices), "--dataset", str(out / "dataset.json"),
            "--max_batch_size", "8", "--extra_llm_api_options", str(out / "online.yaml")]


def run_env(stats_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # devices come from --emulate_devices
    env.update(EXPERT_STATISTIC_ITER_RANGE="2-6", EXPERT_STATISTIC_PATH=str(stats_dir))
    return env


def figures(text):
    keep = ("output tokens", "iterations", "avg per-rank imbalance", "layer updates", "slots moved", "bytes moved")
    return [line for line in text.splitlines() if line.startswith(keep)]


def test_two_processes_match_one(tmp_path):
    subprocess.run([sys.executable, "-m", "jax_eplb.cli", "prepare-dataset", "--output", str(tmp_path / "dataset.json"),
                    "token-norm-dist", "--num-requests", "16", "--input-mean", "8", "--output-mean", "6"],
                   check=True, capture_output=True, timeout=120)
    (tmp_path / "online.yaml").write_text(ONLINE)

    # lockstep in one process too: plans then land at the same iterations whatever the machine's load
    single = subprocess.run(bench_command(tmp_path, devices=8)
                            + ["--online_lockstep", "--output_tokens", str(tmp_path / "single.json")],
                            env=run_env(tmp_path / "stats_single"), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]

    port = free_port()
    procs = [subprocess.Popen(bench_command(tmp_path, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
                                            "2", "--process_id", str(i), devices=4)
                              + ["--output_tokens", str(tmp_path / f"multi_{i}.json")],
                              env=run_env(tmp_path / "stats_multi"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)

    assert (tmp_path / "multi_0.json").read_text() == (tmp_path / "single.json").read_text()
    assert not (tmp_path / "multi_1.json").exists()  # process 0 writes
    assert figures(outputs[0]) == figures(outputs[1]) == figures(single.stdout)
    assert any(line.startswith("slots moved") and not line.endswith(" 0") for line in figures(single.stdout))
    single_stats = jax_eplb.load_statistics(tmp_path / "stats_single")
    multi_stats = jax_eplb.load_statistics(tmp_path / "stats_multi")
    np.testing.assert_array_equal(multi_stats.counts, single_stats.counts)
    assert single_stats.counts.sum() > 0
