"""Decoder layers (Flax NNX) and stacks of identical layers run by ``lax.scan``.

Axis legend: B batch rows, T tokens per row, H hidden, L layers of a stack.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_eplb._assignment import AssignmentTables
from jax_eplb.model._config import ModelConfig
from jax_eplb.model._layers import Attention, RMSNorm
from jax_eplb.model._mla import MLAttention
from jax_eplb.moe import MLP, EPMoEBlock, MoEOptions, MoEOutput


ATTENTIONS = {"gqa": Attention, "mla": MLAttention}


def layer_runs(config: ModelConfig) -> list[tuple[str, int, int]]:
    """Maximal runs of consecutive decoder layers of one kind, in decoder order:
    ``(kind, start, stop)`` with kind ``dense`` or ``moe`` and [start, stop) indices into that
    kind's stack (DeepSeek-V3: ``[("dense", 0, 3), ("moe", 0, 58)]``)."""
    runs: list[tuple[str, int, int]] = []
    count = {"dense": 0, "moe": 0}
    moe = set(config.moe_layer_ids)
    for layer in range(config.num_layers):
        kind = "moe" if layer in moe else "dense"
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], count[kind] + 1)
        else:
            runs.append((kind, count[kind], count[kind] + 1))
        count[kind] += 1
    return runs


class DecoderLayer(nnx.Module):
    """Pre-norm attention + pre-norm MLP, each with a residual. The MLP is dense (``moe_tables``
    None) or the EP MoE block with this layer's placement."""

    def __init__(self, config: ModelConfig, mesh, moe_tables: AssignmentTables | None = None, *,
                 options: MoEOptions = MoEOptions(), rngs: nnx.Rngs):
        c, dt = config, config.jnp_dtype
        self.attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dt)
        self.attention = ATTENTIONS[c.attention](c, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dt)
        if moe_tables is None:
            self.mlp = MLP(c.hidden_size, c.dense_ffn_size, dtype=dt, weight_block=c.weight_block, rngs=rngs)
        else:
            self.mlp = EPMoEBlock(c.moe, mesh, moe_tables, options=options, dtype=dt, weight_block=c.weight_block,
                                  rngs=rngs)

    def __call__(self, x, cache, *, positions, token_mask, window=None) -> tuple[jax.Array, object, MoEOutput | None]:
        """x ``[B, T, H]`` -> (x, updated attention cache, the MoE block's output or None); ``window``:
        this layer's attention window (a traced scalar, 0 = none; None: the model has no windows)."""
        extra = {} if window is None else {"window": window}
        out, cache = self.attention(self.attention_norm(x), positions, cache, token_mask, **extra)
        x = x + out
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MLP):
            return x + self.mlp(h).astype(x.dtype), cache, None
        b, t, hidden = x.shape
        result = self.mlp(h.reshape(b * t, hidden), token_mask.reshape(-1))
        return x + result.out.reshape(b, t, hidden), cache, result._replace(out=None)


class LayerStack(nnx.Module):
    """``num_layers`` identical layers whose variables are stacked on a leading ``[L]`` axis.

    ``__call__`` runs them with ``lax.scan`` over (variables, per-layer cache): the layer is traced
    and compiled once whatever L. Built from ``make_layer(i)`` for each layer index (under
    ``nnx.eval_shape`` this only records shapes). ``windows``: each layer's attention window (0 =
    none; gpt-oss alternates), scanned alongside as data; None: no layer has one.
    """

    def __init__(self, make_layer: Callable[[int], nnx.Module], num_layers: int,
                 windows: tuple[int, ...] | None = None):
        self.windows = tuple(windows) if windows and any(windows) else None
        layers = [make_layer(i) for i in range(num_layers)]
        graphdef, _ = nnx.split(layers[0])
        states = [nnx.state(layer) for layer in layers]
        self.layers = nnx.merge(graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))

    def __call__(self, x, cache, *, start: int = 0, stop: int | None = None, **kwargs):
        """x -> (x, stacked cache, stacked per-layer outputs) of layers ``[start, stop)`` (``cache``
        holds just those layers); ``kwargs`` go to every layer."""
        graphdef, state = nnx.split(self.layers)
        if start or stop is not None:
            state = jax.tree.map(lambda leaf: leaf[start:stop], state)
        windows = None if self.windows is None else jnp.asarray(self.windows[start:stop], jnp.int32)

        def body(x, inputs):
            layer_state, layer_cache, window = inputs
            extra = {} if window is None else {"window": window}
            x, layer_cache, aux = nnx.merge(graphdef, layer_state)(x, layer_cache, **kwargs, **extra)
            return x, (layer_cache, aux)

        x, (cache, aux) = jax.lax.scan(body, x, (state, cache, windows))
        return x, cache, aux
