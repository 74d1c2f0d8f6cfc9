"""Kimi-K2 (``model_type`` ``kimi_k2``): DeepSeek-V3's architecture under another model type (384
experts in one group, query compression, YaRN) and DeepSeek-V3's tensor names. Read as
``deepseek_v3``: every key means the same; a checkpoint that names another architecture than
``DeepseekV3ForCausalLM`` (Kimi-K2.5's vision-language wrapper, Kimi-Linear) is refused.
"""

from __future__ import annotations

from jax_eplb._errors import EplbInputError
from jax_eplb.hf import _deepseek_v3
from jax_eplb.hf._config import ConfigReader

MODEL_TYPE = "kimi_k2"
LAYOUT = _deepseek_v3.LAYOUT
ARCHITECTURE = "DeepseekV3ForCausalLM"


def model_fields(reader: ConfigReader) -> tuple[dict, list[str]]:
    architectures = reader.raw.get("architectures") or [ARCHITECTURE]
    if architectures != [ARCHITECTURE]:
        raise EplbInputError(f"{reader.source}: kimi_k2 with architectures {architectures} is not supported "
                             f"(Kimi-K2's is [{ARCHITECTURE!r}]: DeepSeek-V3's modules)")
    return _deepseek_v3.model_fields(reader)
