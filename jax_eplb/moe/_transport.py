"""``transport="auto"``: which transport a mesh gets, measured once per mesh and layer shape.

On a single-process GPU mesh ``auto`` runs both transports on that mesh, once: a small adversarial
routing (every token to the last rank, some entries invalid) whose results must match, and a
uniform routing at the layer's shapes (tokens per rank, hidden size, local slots, dtype), timed.
``ragged`` (only the real rows travel) is taken where it matched and was faster; else
``all_to_all``. One line on stderr gives both figures. Users of JAX on GPUs report
``ragged_all_to_all`` far below NVLink bandwidth on some systems, so the time decides, not the byte
count. Elsewhere (CPU: XLA has no ``ragged_all_to_all``) and with several processes (a run needs
global arrays on every process; ``ragged`` can be chosen explicitly there) ``auto`` is
``all_to_all``. Explicit choices are never measured.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_eplb.moe._dispatch import all_to_all_moe
from jax_eplb.moe._matmul_choice import ExpertShapes
from jax_eplb.moe._types import MoEOptions
from jax_eplb.sharding import EP_AXIS, platform
from jax_eplb_kernels import fastest_correct, relative_close

PROBE_TOKENS, PROBE_TOP_K, PROBE_HIDDEN, PROBE_SLOTS = 8, 3, 16, 2  # per rank: the adversarial check
DEFAULT_SHAPES = ExpertShapes(rows=64 * PROBE_TOP_K, hidden=256, ffn=128, local_slots=PROBE_SLOTS, dtype="float32")


def resolve_transport(options: MoEOptions, mesh, shapes: ExpertShapes | None = None,
                      top_k: int = PROBE_TOP_K) -> MoEOptions:
    """``options`` with ``transport`` resolved (``auto`` -> ``ragged`` or ``all_to_all``).

    ``shapes``: one rank's expert compute (rows = tokens per rank x ``top_k``), what is timed."""
    if options.transport != "auto":
        return options
    chosen = "all_to_all"
    if platform(mesh) == "gpu" and jax.process_count() == 1:
        shapes = shapes or DEFAULT_SHAPES
        key = ("transport", tuple(d.id for d in mesh.devices.flat), options.dispatch, id(options.ragged_exchange),
               shapes, top_k)
        chosen = fastest_correct(
            lambda: transport_trials(mesh, options, shapes, top_k), key, reference="all_to_all", close=_close,
            subject=f"EP transport on {mesh.devices.size} devices ({shapes.rows // max(top_k, 1)} tokens x top-{top_k} "
                    f"per rank, hidden {shapes.hidden}, {shapes.dtype})")
    return dataclasses.replace(options, transport=chosen)


def transport_trials(mesh, options: MoEOptions, shapes: ExpertShapes, top_k: int) -> dict:
    """``{transport: run}``: each runs the adversarial check and the timed uniform routing on ``mesh``."""
    ranks = int(mesh.shape[EP_AXIS])
    check = _adversarial_inputs(ranks)
    timed = _uniform_inputs(ranks, shapes, top_k)
    runs = {}
    for transport in ("ragged", "all_to_all"):
        body = lambda x, w, s, g, u, d, transport=transport: all_to_all_moe(  # noqa: E731
            x, w, s, g, u, d, EP_AXIS, transport=transport, grouped_matmul="ragged_dot",
            ragged_all_to_all=options.ragged_exchange, dispatch=options.dispatch)[0]
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(EP_AXIS),) * 6, out_specs=P(EP_AXIS),
                                   check_vma=False))
        runs[transport] = lambda fn=fn: (fn(*check), fn(*timed))
    return runs


def _adversarial_inputs(ranks: int):
    """Every rank sends everything to the last rank; some entries invalid, some anywhere."""
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
    return (x, weights, jnp.asarray(slot_ids, jnp.int32), *experts)


def _uniform_inputs(ranks: int, shapes: ExpertShapes, top_k: int):
    """The layer's shapes, every entry to a uniformly drawn slot: a balanced plan's traffic."""
    rng = np.random.default_rng(1)
    tokens = ranks * max(shapes.rows // max(top_k, 1), 1)
    num_slots = ranks * shapes.local_slots
    x = jnp.asarray(rng.normal(size=(tokens, shapes.hidden)), shapes.dtype)
    weights = jnp.asarray(rng.random((tokens, top_k)) / top_k, jnp.float32)
    slot_ids = jnp.asarray(rng.integers(0, num_slots, size=(tokens, top_k)), jnp.int32)
    scale = 1 / np.sqrt(shapes.hidden)
    experts = [jnp.asarray(rng.normal(size=(num_slots,) + shape) * scale, shapes.dtype)
               for shape in ((shapes.hidden, shapes.ffn), (shapes.hidden, shapes.ffn), (shapes.ffn, shapes.hidden))]
    return (x, weights, slot_ids, *experts)


def _close(got, want) -> bool:
    """The adversarial outputs agree to float32 rounding, the timed ones to the dtype's."""
    (check_got, timed_got), (check_want, timed_want) = got, want
    return bool(np.allclose(np.asarray(check_got), np.asarray(check_want), rtol=1e-5, atol=1e-5)
                and relative_close(2e-2)(timed_got, timed_want))
