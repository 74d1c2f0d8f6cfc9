"""``auto``'s measurements: decided by the kernel's platform, each candidate within a time limit, several
processes settling their choices outside tracing in one agreed order, probes that fit in memory."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_eplb_kernels import _dispatch, _probe, dtype_tolerance, relative_close

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_choices(monkeypatch):
    choices = {}
    monkeypatch.setattr(_probe, "_choices", choices)
    monkeypatch.delenv("JAX_EPLB_KERNELS", raising=False)
    return choices


def constant(value, seconds=0.0, calls=None, name=""):
    def run():
        if calls is not None:
            calls.append(name)
        time.sleep(seconds)
        return jnp.asarray(value)
    return run


def test_auto_decides_by_the_kernels_platform_not_the_default_backend(monkeypatch, fresh_choices):
    calls = []
    trials = lambda: {"xla": constant([1], calls=calls, name="xla"), "mosaic_gpu": constant([1])}  # noqa: E731
    monkeypatch.setattr(_dispatch.jax, "default_backend", lambda: "gpu")  # a GPU host ...
    with _dispatch.on_platform("cpu"):  # ... running a CPU mesh: nothing measured
        assert _dispatch.resolve_implementation("auto", trials, "k") == "xla"
    assert calls == [] and fresh_choices == {}
    with _dispatch.on_platform("gpu"):
        assert _dispatch.resolve_implementation("auto", trials, "k") in ("xla", "mosaic_gpu")
    assert list(fresh_choices) == [("gpu", "k")] and calls  # keyed by the platform
    monkeypatch.setattr(_dispatch.jax, "default_backend", lambda: "cpu")
    with _dispatch.on_platform("gpu"):  # a GPU mesh decides, whatever the default backend says
        assert _dispatch.kernel_platform() == "gpu"
    assert _dispatch.kernel_platform() == "cpu"


def test_the_ep_block_on_a_cpu_mesh_measures_nothing_on_a_gpu_host(monkeypatch, fresh_choices, capsys, mesh_of):
    from jax_eplb import build_assignment_tables
    from jax_eplb.moe import ExpertWeights, MoEConfig, MoEOptions, RouterWeights, ep_moe_forward
    from jax_eplb.moe import slot_weights_from_logical

    monkeypatch.setattr(_dispatch.jax, "default_backend", lambda: "gpu")
    mesh = mesh_of(2)
    config = MoEConfig(hidden_size=8, expert_ffn_size=4, num_experts=4, top_k=2)
    tables = build_assignment_tables(np.arange(4), 4)
    logical = ExpertWeights(jnp.ones((4, 8, 4)), jnp.ones((4, 8, 4)), jnp.ones((4, 4, 8)))
    out = jax.jit(lambda x: ep_moe_forward(
        config, mesh, RouterWeights(jnp.ones((8, 4)), jnp.zeros((4,))),
        slot_weights_from_logical(logical, np.arange(4), mesh),
        x, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]),
        options=MoEOptions(record=("expert", "slot"))).out)(jnp.ones((4, 8)))
    assert out.shape == (4, 8) and fresh_choices == {} and capsys.readouterr().err == ""


def test_a_candidate_over_the_time_limit_is_out_and_the_caller_goes_on(monkeypatch, fresh_choices):
    monkeypatch.setattr(_probe, "CANDIDATE_LIMIT_S", 0.5)
    monkeypatch.setattr(_probe, "TIMED_RUNS", 1)
    hung = threading.Event()
    lines = []

    def hangs():  # a barrier that never opens
        hung.wait(30)
        return jnp.asarray([1])

    trials = lambda: {"xla": constant([1]), "hangs": hangs, "slow": constant([1], 0.8), "fast": constant([1])}  # noqa: E731
    start = time.perf_counter()
    chosen = _probe.fastest_correct(trials, "k", reference="xla", subject="toy", log=lines.append)
    hung.set()
    assert time.perf_counter() - start < 5
    assert chosen in ("xla", "fast")
    assert "hangs out (over the 0.5 s limit)" in lines[0] and "slow out (over the 0.5 s limit)" in lines[0]


def test_a_slightly_wrong_float32_candidate_is_out():
    """The gate's tolerance follows the dtype: float32 results must agree far closer than bfloat16's."""
    rng = np.random.default_rng(0)
    want = rng.normal(size=(64, 32)).astype(np.float32)
    slightly = want.copy()
    slightly[3, 5] += 0.01 * np.abs(want).max()  # one element 1% off
    assert relative_close(dtype_tolerance(np.float32))(want + 1e-6 * np.abs(want).max(), want)
    assert not relative_close(dtype_tolerance(np.float32))(slightly, want)
    assert relative_close(dtype_tolerance(jnp.bfloat16))(slightly, want)  # within bfloat16's rounding
    assert dtype_tolerance(np.float32) < dtype_tolerance(jnp.bfloat16) / 5
    lines = []
    trials = lambda: {"ragged_dot": lambda: jnp.asarray(want), "off": lambda: jnp.asarray(slightly)}  # noqa: E731
    names, figures = _probe.measure(_probe.Choice("k", trials, "ragged_dot", relative_close(dtype_tolerance("float32")),
                                                  "matmul", None, lines.append))
    assert figures["off"] == "differs from the reference" and isinstance(figures["ragged_dot"], float)


def two_processes(other):
    """A ``gather`` of two processes: this one's row and ``other(row)`` (process 1's)."""
    return lambda row: np.stack([np.asarray(row), other(np.asarray(row))])


def test_several_processes_settle_in_key_order_outside_tracing(monkeypatch, fresh_choices):
    monkeypatch.setattr(_probe, "TIMED_RUNS", 1)
    monkeypatch.setattr(_probe.jax, "process_count", lambda: 2)
    order, lines = [], []

    def trials_of(name):
        def trials():
            order.append(name)
            return {"xla": constant([1], 0.02), "fast": constant([1]), "fails_on_1": constant([1])}
        return trials

    def trace():  # reached in the order b, a (another process may reach a first)
        for name in ("b", "a", "b"):
            assert _probe.fastest_correct(trials_of(name), ("kernel", name), reference="xla", log=lines.append) == "xla"

    def process_1(row):  # process 1 agrees on the keys and candidates; its 'fails_on_1' failed
        if row.dtype == np.int64:
            return row
        return np.where(np.arange(row.size) == 1, np.inf, row)  # [xla, fails_on_1, fast]

    settled = _probe.settle_choices(trace, gather=two_processes(process_1))
    assert settled == [("kernel", "a"), ("kernel", "b")] and order == ["a", "b"]  # measured in key order, once
    assert fresh_choices == {("kernel", "a"): "fast", ("kernel", "b"): "fast"}
    assert all("fails_on_1 out (failed on process 1)" in line for line in lines)
    # settled choices are taken in the real trace, without measuring
    assert _probe.fastest_correct(trials_of("a"), ("kernel", "a"), reference="xla") == "fast" and order == ["a", "b"]
    # a choice first met in a trace with several processes is not measured there: the reference
    assert _probe.fastest_correct(trials_of("c"), ("kernel", "c"), reference="xla", log=lines.append) == "xla"
    assert order == ["a", "b"] and "not settled before tracing" in lines[-1]


def test_processes_that_need_different_choices_take_the_references(monkeypatch, fresh_choices):
    monkeypatch.setattr(_probe, "TIMED_RUNS", 1)
    measured = []
    trials = lambda: measured.append(1) or {"xla": constant([1], 0.02), "fast": constant([1])}  # noqa: E731
    trace = lambda: _probe.fastest_correct(trials, "k", reference="xla")  # noqa: E731
    _probe.settle_choices(trace, gather=two_processes(lambda row: row + 1))  # process 1 traced other keys
    assert fresh_choices == {"k": "xla"} and measured == []
    fresh_choices.clear()
    calls = iter([False, True])  # keys agree, the candidates differ (process 1 has no 'fast')
    _probe.settle_choices(trace, gather=two_processes(lambda row: row + next(calls) if row.dtype == np.int64 else row))
    assert fresh_choices == {"k": "xla"}


def test_agree_takes_the_fastest_that_ran_everywhere():
    names = ["xla", "a", "b"]
    assert _probe.agree(names, [[3.0, 1.0, 2.0]]) == "a"
    assert _probe.agree(names, [[3.0, 1.0, 2.0], [3.0, np.inf, 2.5]]) == "b"  # a failed on process 1
    assert _probe.agree(names, [[3.0, 1.0, 2.0], [3.0, 4.0, 2.5]]) == "b"  # by the slowest process
    assert _probe.agree(names, [[np.inf, np.inf, np.inf]]) == "xla"


PROBE_MEMORY = r"""
import json, resource
import jax, numpy as np
from jax.sharding import Mesh
from jax_eplb.moe import ExpertShapes, MoEOptions
from jax_eplb.moe._matmul_choice import matmul_trials, probe_shapes
from jax_eplb.moe._transport import transport_probe_shapes, transport_trials

mesh = Mesh(np.array(jax.devices()[:8]), ("ep",))
# DeepSeek-V3 at EP8 decode: 256 tokens per rank, top-8, H 7168, F 2048, 36 local slots, bfloat16
shapes = ExpertShapes(rows=256 * 8, hidden=7168, ffn=2048, local_slots=36, dtype="bfloat16")
jax.block_until_ready(jax.numpy.ones(8))
before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
built = [transport_trials(mesh, MoEOptions(), shapes, 8), matmul_trials(shapes, ["ragged_dot"])]
jax.effects_barrier()
for array in jax.live_arrays():
    array.block_until_ready()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown_mib": (peak - before) / 1024, "live_mib": sum(a.nbytes for a in jax.live_arrays()) / 2**20,
                  "matmul_probe": list(probe_shapes(shapes)), "transport_probe": list(transport_probe_shapes(shapes))}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
def test_probes_at_deepseek_v3_shapes_fit_in_a_gib_of_host_memory():
    """The transport probe's (8 ranks) and the grouped-matmul probe's inputs at DeepSeek-V3's layer shapes,
    built on CPU devices (what they allocate is host memory), grow the process by < 1 GiB (the float64 NumPy
    draws they replace took 34 GB per expert matrix); running them takes what the layer itself takes."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", PROBE_MEMORY], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["grown_mib"] < 1024 and figures["live_mib"] < 1024, figures
    slots, rows = figures["matmul_probe"][3], figures["matmul_probe"][0]
    assert 1 <= slots < 36 and rows == -(-2048 * slots // 36)  # rows per slot as served
    assert figures["transport_probe"][3] == 1 and figures["transport_probe"][0] == 2048  # the layer's rows
