"""``transport="auto"``: which transport a mesh gets, decided once per mesh by a probe.

On a GPU mesh ``auto`` means ``ragged`` (only the real rows travel), but only after a one-time
probe on that mesh passed: a small adversarial routing (every token to the last rank, some
entries invalid) through both transports, results compared. A ragged transport that does not
compile or differs falls back to ``all_to_all`` with one warning. Elsewhere (CPU: XLA has no
``ragged_all_to_all``) ``auto`` is ``all_to_all``, and so it is with several processes (multi-host:
a probe whose outcome differed between processes would give them different programs; choose
``ragged`` explicitly there). Explicit choices are never probed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_eplb.moe._dispatch import all_to_all_moe
from jax_eplb.moe._types import MoEOptions
from jax_eplb.sharding import EP_AXIS, platform
from jax_eplb_kernels import probe_passes

PROBE_TOKENS, PROBE_TOP_K, PROBE_HIDDEN, PROBE_SLOTS = 8, 3, 16, 2  # per rank


def resolve_transport(options: MoEOptions, mesh) -> MoEOptions:
    """``options`` with ``transport`` resolved (``auto`` -> ``ragged`` or ``all_to_all``)."""
    if options.transport != "auto":
        return options
    chosen = "all_to_all"
    if platform(mesh) == "gpu" and jax.process_count() == 1:
        key = ("ragged transport", tuple(d.id for d in mesh.devices.flat), options.dispatch,
               id(options.ragged_exchange))
        if probe_passes(lambda: _ragged_matches_all_to_all(mesh, options), key, subject="EP", fallback="all_to_all"):
            chosen = "ragged"
    return dataclasses.replace(options, transport=chosen)


def _ragged_matches_all_to_all(mesh, options: MoEOptions) -> bool:
    """Both transports on ``mesh`` for a routing where every rank sends everything to the last rank."""
    ranks = int(mesh.shape[EP_AXIS])
    rng = np.random.default_rng(0)
    tokens = ranks * PROBE_TOKENS
    x = jnp.asarray(rng.normal(size=(tokens, PROBE_HIDDEN)), jnp.float32)
    weights = jnp.asarray(rng.random((tokens, PROBE_TOP_K)), jnp.float32)
    last = (ranks - 1) * PROBE_SLOTS
    slot_ids = last + rng.integers(0, PROBE_SLOTS, size=(tokens, PROBE_TOP_K))
    slot_ids[::5, 0] = ranks * PROBE_SLOTS  # invalid entries route nowhere
    slot_ids[1::4, 1] = rng.integers(0, ranks * PROBE_SLOTS, size=slot_ids[1::4, 1].shape)
    experts = [jnp.asarray(rng.normal(size=(ranks * PROBE_SLOTS,) + shape) * 0.3, jnp.float32)
               for shape in ((PROBE_HIDDEN, 8), (PROBE_HIDDEN, 8), (8, PROBE_HIDDEN))]
    outs = []
    for transport in ("ragged", "all_to_all"):
        body = lambda x, w, s, g, u, d, transport=transport: all_to_all_moe(  # noqa: E731
            x, w, s, g, u, d, EP_AXIS, transport=transport, grouped_matmul="ragged_dot",
            ragged_all_to_all=options.ragged_exchange, dispatch=options.dispatch)[0]
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(EP_AXIS),) * 6, out_specs=P(EP_AXIS),
                                   check_vma=False))
        outs.append(np.asarray(fn(x, weights, jnp.asarray(slot_ids, jnp.int32), *experts)))
    return bool(np.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5))
