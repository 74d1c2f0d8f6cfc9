"""The GPU code paths lower for CUDA here, on a CPU machine (cross-platform lowering), on every JAX line.

Compiled Pallas and ``ragged_all_to_all`` cannot run on XLA:CPU, but JAX can lower a function
for another platform without one: these tests build the Mosaic GPU and Triton IR of every Pallas
kernel and the StableHLO of the EP block's GPU configurations (ragged transport, ragged_dot,
Pallas routing) for CUDA, so a change that breaks the GPU lowering fails in CI, not first on a
GPU. Pallas asks which GPU it lowers for: from JAX 0.11 on there is no answer without one unless
an abstract device (an H100) is set, which ``lower_for_cuda`` does on every line. The paths
``auto`` can take on JAX >= 0.11 lower without a DeprecationWarning. What is left for a GPU
(``scripts/gpu_check.sh``): the compile to machine code, the results, the speed, and tokamax's
kernels (tokamax picks them from the concrete device).
"""

import contextlib
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_eplb import build_assignment_tables
from jax_eplb.moe import MoEConfig, MoEOptions, ep_moe_forward, slot_weights_from_logical
from jax_eplb_kernels.grouped_matmul import tile_grouped_matmul_pallas
from jax_eplb_kernels.histogram import HistogramBlockSizes, histogram_mosaic_gpu, histogram_pallas
from jax_eplb_kernels.slot_routing import RoutingBlockSizes, route_mosaic_gpu, route_pallas

TRITON_CALL = "xla.gpu.triton"
MOSAIC_GPU_CALL = "@mosaic_gpu"
H100 = "NVIDIA H100 80GB HBM3"
# Explicit Triton choices: JAX >= 0.11 warns that the backend is deprecated (auto never takes them there).
explicit_triton = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def h100():
    """An abstract H100 for Pallas to lower for (JAX >= 0.11 needs one without a GPU; older lines read it too)."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    device = AbstractDevice(device_kind=H100, num_cores=132, platform="cuda")
    return use_abstract_mesh(AbstractMesh((1,), ("gpu",), (AxisType.Auto,), abstract_device=device))


@pytest.fixture
def triton_sees_h100(monkeypatch):
    """Inside shard_map the context mesh is the (CPU) mesh of the shard_map, not an abstract H100, so on
    JAX >= 0.11 the Triton lowering is told the GPU kind directly (Mosaic GPU lowers for sm90 by default).
    The module that answers moved: ``jax._src.pallas.triton.gpu_info`` (0.11, 0.12.0), ``jax._src.gpu_info``
    (0.12.1 on); JAX < 0.11 reads no device kind when lowering Triton for CUDA."""
    import importlib

    for name in ("jax._src.gpu_info", "jax._src.pallas.triton.gpu_info"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "get_device_kind"):
            monkeypatch.setattr(module, "get_device_kind", lambda: H100)
            if hasattr(getattr(module, "get_gpu_info", None), "cache_clear"):
                module.get_gpu_info.cache_clear()


def lower_for_cuda(fn, *args, abstract_gpu: bool = True, no_deprecations: bool = False) -> str:
    with (h100() if abstract_gpu else contextlib.nullcontext()), warnings.catch_warnings():
        if no_deprecations:
            warnings.simplefilter("error", DeprecationWarning)
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def mosaic_gpu_kernels(text: str) -> int:
    return sum(MOSAIC_GPU_CALL in line and "custom_call" in line for line in text.splitlines())


@pytest.mark.parametrize("method", ["scan", "per_bin"])
@pytest.mark.parametrize("num_ids,num_bins", [(65_536, 256), (8_388_608, 288), (1000, 384), (77, 5)])
def test_mosaic_gpu_histogram_lowers_for_cuda_without_deprecations(num_ids, num_bins, method):
    from jax_eplb_kernels import MosaicHistogramBlockSizes

    ids = jax.ShapeDtypeStruct((num_ids,), jnp.int32)
    sizes = MosaicHistogramBlockSizes(method=method)
    text = lower_for_cuda(lambda x: histogram_mosaic_gpu(x, num_bins, sizes), ids, no_deprecations=True)
    assert mosaic_gpu_kernels(text) == 1 and TRITON_CALL not in text


@pytest.mark.parametrize("num_experts,num_slots", [(256, 288), (8, 8), (64, 80)])
def test_mosaic_gpu_slot_routing_lowers_for_cuda_without_deprecations(num_experts, num_slots):
    args = (jax.ShapeDtypeStruct((4096, 8), jnp.int32), jax.ShapeDtypeStruct((num_experts,), jnp.int32),
            jax.ShapeDtypeStruct((num_experts, num_slots - num_experts + 1), jnp.int32))
    text = lower_for_cuda(lambda ids, count, slots: route_mosaic_gpu(ids, count, slots, 3, num_slots), *args,
                          no_deprecations=True)
    assert mosaic_gpu_kernels(text) == 1 and TRITON_CALL not in text


def test_mosaic_gpu_slot_routing_refuses_tables_beyond_one_copy():
    args = (jnp.zeros((8, 2), jnp.int32), jnp.ones((384,), jnp.int32), jnp.zeros((384, 129), jnp.int32))
    with pytest.raises(ValueError, match="one TMA copy"):
        route_mosaic_gpu(*args, 0, 512)


def triton_kernels(text: str) -> list[str]:
    """Names of the Triton kernels in lowered text, one per kernel definition."""
    return sorted(re.search(r'name = "([^"]+)"', line).group(1) for line in text.splitlines() if TRITON_CALL in line)


@explicit_triton
@pytest.mark.parametrize("method", ["outer", "compare"])
@pytest.mark.parametrize("num_ids,num_bins", [(65_536, 256), (8_388_608, 288), (1000, 384), (77, 5)])
def test_histogram_kernel_lowers_for_cuda(method, num_ids, num_bins):
    ids = jax.ShapeDtypeStruct((num_ids,), jnp.int32)
    text = lower_for_cuda(lambda x: histogram_pallas(x, num_bins, HistogramBlockSizes(method=method)), ids)
    assert triton_kernels(text) == [f"routing_histogram_{method}"]


@explicit_triton
@pytest.mark.parametrize("num_experts,num_slots", [(256, 288), (8, 8), (384, 512)])
def test_slot_routing_kernel_lowers_for_cuda(num_experts, num_slots):
    args = (jax.ShapeDtypeStruct((4096, 8), jnp.int32), jax.ShapeDtypeStruct((num_experts,), jnp.int32),
            jax.ShapeDtypeStruct((num_experts, num_slots - num_experts + 1), jnp.int32))
    text = lower_for_cuda(lambda ids, count, slots: route_pallas(ids, count, slots, 3, num_slots,
                                                                 block_sizes=RoutingBlockSizes()), *args)
    assert triton_kernels(text) == ["expert_to_slot_routing"]


@explicit_triton
@pytest.mark.parametrize("k,n,groups", [(7168, 2048, 288), (2048, 7168, 36), (16, 16, 3)])
def test_tile_grouped_matmul_lowers_for_cuda(k, n, groups):
    """DeepSeek-V3 gate/up and down shapes (bf16), and the smallest Triton dot."""
    args = (jax.ShapeDtypeStruct((37 * 64, k), jnp.bfloat16), jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((37,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    text = lower_for_cuda(lambda x, w, g, u: tile_grouped_matmul_pallas(x, w, g, u, tile=64), *args)
    assert triton_kernels(text) == ["tile_grouped_matmul"]


@explicit_triton
@pytest.mark.parametrize("policy,matmul", [("round_robin", "ragged_dot"), ("load_aware", "pallas")])
def test_ep_block_gpu_configuration_lowers_for_cuda(policy, matmul, triton_sees_h100):
    """ep=8 (emulated devices), ragged_all_to_all, Pallas routing and histograms, either grouped matmul."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("ep",))
    config = MoEConfig(hidden_size=16, expert_ffn_size=8, num_experts=8, top_k=2)
    rng = np.random.default_rng(0)
    slot_to_expert = rng.permutation(np.concatenate([np.arange(8), rng.integers(0, 8, 8)]))
    tables = build_assignment_tables(slot_to_expert, 8)
    k = jax.random.split(jax.random.key(0), 4)
    from jax_eplb.moe import ExpertWeights, RouterWeights

    logical = ExpertWeights(*(jax.random.normal(k[i], s) for i, s in enumerate([(8, 16, 8), (8, 16, 8), (8, 8, 16)])))
    router = RouterWeights(jax.random.normal(k[3], (16, 8)), jnp.zeros((8,)))
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    options = MoEOptions(replica_policy=policy, moe_max_num_tokens=16, record=("slot", "expert_total"),
                         transport="ragged", grouped_matmul=matmul, kernel_implementation="pallas")
    forward = functools.partial(ep_moe_forward, config, mesh, options=options)
    text = lower_for_cuda(forward, router, slots, jnp.zeros((64, 16)), jnp.asarray(tables.replica_count[0]),
                          jnp.asarray(tables.expert_slots[0]), abstract_gpu=False)
    chunks = 2  # 8 tokens per rank, moe_max_num_tokens 16 over 8 ranks -> 2 chunks
    assert text.count("ragged_all_to_all") >= 2 * chunks  # dispatch and combine per chunk
    kernels = set(triton_kernels(text))
    assert {"expert_to_slot_routing", "routing_histogram_outer"} <= kernels  # routing runs as Pallas, not XLA
    assert ("tile_grouped_matmul" in kernels) == (matmul == "pallas")
    assert ("ragged_dot" in text) == (matmul == "ragged_dot")


@pytest.mark.parametrize("policy", ["round_robin", "load_aware"])
def test_ep_block_paths_auto_can_take_on_new_jax_lower_without_deprecations(policy):
    """What ``auto`` can pick on JAX >= 0.11 - ragged transport, Mosaic GPU histograms and routing,
    ragged_dot - lowered for CUDA with DeprecationWarning an error."""
    from jax.sharding import Mesh

    from jax_eplb.moe import ExpertWeights, RouterWeights

    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("ep",))
    config = MoEConfig(hidden_size=16, expert_ffn_size=8, num_experts=8, top_k=2)
    slot_to_expert = np.concatenate([np.arange(8), np.arange(8)])
    tables = build_assignment_tables(slot_to_expert, 8)
    logical = ExpertWeights(jnp.ones((8, 16, 8)), jnp.ones((8, 16, 8)), jnp.ones((8, 8, 16)))
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    options = MoEOptions(replica_policy=policy, record=("slot", "expert_total"), transport="ragged",
                         grouped_matmul="ragged_dot", kernel_implementation="mosaic_gpu")
    forward = functools.partial(ep_moe_forward, config, mesh, options=options)
    text = lower_for_cuda(forward, RouterWeights(jnp.ones((16, 8)), jnp.zeros((8,))), slots, jnp.zeros((64, 16)),
                          jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]),
                          abstract_gpu=False, no_deprecations=True)
    assert mosaic_gpu_kernels(text) >= 1 and TRITON_CALL not in text and "ragged_all_to_all" in text


@explicit_triton
def test_model_step_lowers_for_cuda_with_gpu_options(triton_sees_h100):
    """The tiny model's jitted step (scanned layers, KV cache, 8 ranks) with the ragged transport and
    the Pallas grouped matmul, lowered for CUDA, greedy and sampling."""
    from flax import nnx
    from jax.sharding import Mesh

    from jax_eplb import default_slot_to_expert
    from jax_eplb.model import ModelRunner, SeededWeights, build_model, load_model_config

    config = load_model_config("tiny")
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("ep",))
    slot_to_expert = np.tile(default_slot_to_expert(config.num_experts, 80, 8), (config.num_moe_layers, 1))
    model = build_model(config, mesh, build_assignment_tables(slot_to_expert, config.num_experts), SeededWeights(0),
                        options=MoEOptions(transport="ragged", grouped_matmul="pallas", record=("slot",)))
    runner = ModelRunner(model)
    cache = runner.new_cache(16)
    tokens = jnp.zeros((16, 1), jnp.int32)
    graphdef, state = nnx.split(model)
    text = runner._step.trace(graphdef, False, state, tokens, tokens, tokens == 0,
                              cache).lower(lowering_platforms=("cuda",)).as_text()
    assert "ragged_all_to_all" in text
    assert "tile_grouped_matmul" in triton_kernels(text)
    # the server's sampling step (temperature / top-p per row) lowers for CUDA too
    from jax_eplb.model import Sampling

    rows = lambda dtype, value: jnp.full((16,), value, dtype)  # noqa: E731
    sampling = Sampling(rows(jnp.float32, 0.7), rows(jnp.float32, 0.9), rows(jnp.uint32, 3), rows(jnp.int32, 0))
    text = runner._step.trace(graphdef, False, state, tokens, tokens, tokens == 0, cache,
                              sampling).lower(lowering_platforms=("cuda",)).as_text()
    assert "sort" in text and "ragged_all_to_all" in text


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the stop on a machine without a GPU")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh spends no device time when JAX sees no GPU: one line, exit 2, within 60 s."""
    import os
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path / "out"), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path))
    start = time.perf_counter()
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert time.perf_counter() - start < 60 and done.returncode == 2, done.stdout + done.stderr
    stops = [line for line in done.stdout.splitlines() if line.startswith("gpu_check: stopped")]
    assert stops == ["gpu_check: stopped: JAX's backend is 'cpu', not 'gpu'"]
    assert not (tmp_path / "out" / "smoke.txt").exists()  # nothing after the assertion ran
