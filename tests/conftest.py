"""Test setup: 8 CPU-emulated devices, set before JAX is imported anywhere.

On a GPU machine the GPU stays the default backend (the kernel GPU tests use it); mesh tests
fall back to the emulated CPU devices when there are fewer accelerators than ranks.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"


@pytest.fixture
def real_loads():
    """[L, E] DeepSeek-V3 loads from the shared data set; skipped where it is absent."""
    path = SHARED_DATA / "prefill_in1024.json"
    if not path.exists():
        pytest.skip("shared DeepSeek-V3 statistics not present")
    from jax_eplb import load_sglang_json

    return load_sglang_json(path).total()
