"""Running a ``MoETransformer``: its jitted step and the host-side inputs of each kind of step.

The step is ``jax.jit`` over (the model's NNX state, tokens, positions, mask, cache) with the
model's graph static: table and weight *values* are arguments, so a new placement reuses the
compiled program. The cache is donated. Shapes (batch, tokens per row) are compiled ahead of
time by ``compile`` so timed runs exclude compilation.

Axis legend: B batch rows, P prompt (chunk) tokens per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_eplb.model._sampling import Sampling
from jax_eplb.model._transformer import KVCache, MoETransformer, StepOutput
from jax_eplb.sharding import over_ranks
from jax_eplb_kernels import settle_choices


def _step(graphdef, return_logits: bool, state, tokens, positions, mask, cache, sampling=None) -> StepOutput:
    return nnx.merge(graphdef, state)(tokens, positions, mask, cache, return_logits=return_logits, sampling=sampling)


class ModelRunner:
    """Prefill, decode and mixed (in-flight batching) steps of ``model``."""

    def __init__(self, model: MoETransformer):
        self.model = model
        # A fresh callable per runner, so compilations() counts this runner's programs only.
        self._step = jax.jit(functools.partial(_step), static_argnums=(0, 1), donate_argnames=("cache",))
        self._compiled = {}  # (batch, length, sampling) -> ahead-of-time compiled step

    def compilations(self) -> int:
        """Programs compiled so far by the jitted step (ahead-of-time ones not counted)."""
        return self._step._cache_size()

    def new_cache(self, batch: int) -> KVCache:
        return self.model.init_cache(batch)

    def _run(self, tokens, positions, mask, cache, return_logits: bool = False,
             sampling: Sampling | None = None) -> StepOutput:
        shard = over_ranks(self.model.mesh)
        tokens, positions, mask = (jax.device_put(np.asarray(a), shard) for a in (tokens, positions, mask))
        if sampling is not None:
            sampling = Sampling(*(jax.device_put(np.asarray(a), shard) for a in sampling))
        graphdef, state = nnx.split(self.model)
        compiled = None if return_logits else self._compiled.get((*tokens.shape, sampling is not None))
        if compiled is not None:
            return compiled(state, tokens, positions, mask, cache, sampling)
        return self._step(graphdef, return_logits, state, tokens, positions, mask, cache, sampling)

    def mixed(self, prompts, lengths, decode_tokens, decode_positions, decoding, cache: KVCache,
              starts=None, return_logits: bool = False, sampling: Sampling | None = None) -> StepOutput:
        """One iteration with both phases (in-flight batching): rows with ``lengths > 0`` prefill
        ``prompts`` ``[B, P]`` (a whole prompt, or with ``starts`` ``[B]`` a chunk of one that begins
        at that position: chunked prefill; a row's next token is that of its chunk's last token);
        rows with ``decoding`` ``[B]`` decode one token (``decode_tokens``/``decode_positions``
        ``[B]``) in column 0; other rows are idle. ``sampling``: per-row ``Sampling`` (None: greedy)."""
        tokens = np.array(prompts, np.int32)
        column = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        mask = column < np.asarray(lengths)[:, None]
        positions = column + (0 if starts is None else np.asarray(starts, np.int32)[:, None])
        rows = np.flatnonzero(np.asarray(decoding))
        tokens[rows, 0] = np.asarray(decode_tokens)[rows]
        positions[rows, 0] = np.asarray(decode_positions)[rows]
        mask[rows, 0] = True
        return self._run(tokens, positions, mask, cache, return_logits, sampling)

    def prefill(self, tokens, lengths, cache: KVCache, return_logits: bool = False) -> StepOutput:
        """tokens ``[B, P]`` right-padded, lengths ``[B]`` (0 = empty row)."""
        idle = np.zeros(len(lengths), np.int32)
        return self.mixed(tokens, lengths, idle, idle, idle.astype(bool), cache, return_logits=return_logits)

    def decode(self, tokens, positions, active, cache: KVCache, sampling: Sampling | None = None) -> StepOutput:
        """tokens, positions, active: ``[B]``; one new token per active row."""
        def column(a, dtype):
            return np.asarray(a, dtype)[:, None]

        return self._run(column(tokens, np.int32), column(positions, np.int32), column(active, bool), cache,
                         sampling=sampling)

    def compile(self, batch: int, prefill_len: int, sampling: bool = False) -> None:
        """Compiles the prefill and decode shapes ahead of time (so timing excludes compilation);
        ``sampling``: the sampling programs too (a server's requests may ask for temperature)."""
        shard = over_ranks(self.model.mesh)
        graphdef, state = nnx.split(self.model)
        abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)  # noqa: E731
        state, cache = jax.tree.map(abstract, (state, self.new_cache(batch)))
        row = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=shard)  # noqa: E731
        row_sampling = Sampling(row(jnp.float32), row(jnp.float32), row(jnp.uint32), row(jnp.int32))
        programs = {}
        for length in (prefill_len, 1):
            tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=shard)
            mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=shard)
            for sampled in (False, True) if sampling else (False,):
                programs[(batch, length, sampled)] = (state, tokens, tokens, mask, cache,
                                                      row_sampling if sampled else None)
        if jax.process_count() > 1:  # 'auto' choices made outside tracing, in one order, agreed by all processes
            settle_choices(lambda: [jax.eval_shape(functools.partial(_step, graphdef, False), *args)
                                    for args in programs.values()])
        for key, args in programs.items():
            self._compiled[key] = self._step.lower(graphdef, False, *args).compile()
