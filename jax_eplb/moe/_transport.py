"""``transport="auto"``: which transport a mesh gets, measured once per mesh and layer shape.

On a single-process GPU mesh of more than one rank ``auto`` runs both transports on that mesh, once:
a small adversarial routing (every token to the last rank, some entries invalid) whose results must
match, and a uniform routing at the layer's tokens per rank, hidden size, top-k and dtype, timed.
The timed inputs are computed on the devices (``hashed_uniform``, sharded over ``ep``), with one local slot
of at most ``PROBE_FFN`` columns per rank: the exchange is what differs between the two, the expert
compute is the same in both, so the probe holds a few MB per device instead of the layer's experts.
``ragged`` (only the real rows travel) is taken where it matched and was faster; else
``all_to_all``. One line on stderr gives both figures. Users of JAX on GPUs report
``ragged_all_to_all`` far below NVLink bandwidth on some systems, so the time decides, not the byte
count. Elsewhere ``auto`` is ``all_to_all``: on CPU (XLA has no ``ragged_all_to_all``), at one rank
(nothing travels) and with several processes (a run needs global arrays on every process;
``ragged`` can be chosen explicitly there). Explicit choices are never measured.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_eplb.moe._dispatch import all_to_all_moe
from jax_eplb.moe._matmul_choice import ExpertShapes, hashed_bits, hashed_uniform
from jax_eplb.moe._types import MoEOptions
from jax_eplb.sharding import EP_AXIS, num_ranks as mesh_ranks, platform
from jax_eplb_kernels import dtype_tolerance, fastest_correct, relative_close

PROBE_TOKENS, PROBE_TOP_K, PROBE_HIDDEN, PROBE_SLOTS = 8, 3, 16, 2  # per rank: the adversarial check
PROBE_FFN = 256  # columns of the timed probe's one local slot per rank
DEFAULT_SHAPES = ExpertShapes(rows=64 * PROBE_TOP_K, hidden=256, ffn=128, local_slots=PROBE_SLOTS, dtype="float32")


def resolve_transport(options: MoEOptions, mesh, shapes: ExpertShapes | None = None,
                      top_k: int = PROBE_TOP_K) -> MoEOptions:
    """``options`` with ``transport`` resolved (``auto`` -> ``ragged`` or ``all_to_all``).

    ``shapes``: one rank's expert compute (rows = tokens per rank x ``top_k``), what is timed."""
    if options.transport != "auto":
        return options
    chosen = "all_to_all"
    if platform(mesh) == "gpu" and jax.process_count() == 1 and mesh_ranks(mesh) > 1:
        shapes = shapes or DEFAULT_SHAPES
        key = ("transport", platform(mesh), tuple(d.id for d in mesh.devices.flat), options.dispatch,
               id(options.ragged_exchange), shapes, top_k)
        chosen = fastest_correct(
            lambda: transport_trials(mesh, options, shapes, top_k), key, reference="all_to_all", close=_close,
            subject=f"EP transport on {mesh.devices.size} devices ({shapes.rows // max(top_k, 1)} tokens x top-{top_k} "
                    f"per rank, hidden {shapes.hidden}, {shapes.dtype})")
    return dataclasses.replace(options, transport=chosen)


def transport_probe_shapes(shapes: ExpertShapes) -> ExpertShapes:
    """What the timed probe runs per rank: the layer's rows, hidden size and dtype; one slot of <= PROBE_FFN."""
    return shapes._replace(local_slots=1, ffn=min(shapes.ffn, PROBE_FFN))


def transport_trials(mesh, options: MoEOptions, shapes: ExpertShapes, top_k: int) -> dict:
    """``{transport: run}``: each runs the adversarial check and the timed uniform routing on ``mesh``."""
    ranks = mesh_ranks(mesh)
    check = _adversarial_inputs(ranks)
    timed = uniform_inputs(mesh, transport_probe_shapes(shapes), top_k)
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


def uniform_inputs(mesh, shapes: ExpertShapes, top_k: int):
    """``shapes`` per rank, every entry to a uniformly drawn slot (a balanced plan's traffic): x ``[T, H]``,
    weights and slot ids ``[T, k]``, experts ``[S, ...]``, computed on the devices, sharded over ``ep``."""
    ranks = mesh_ranks(mesh)
    tokens = ranks * max(shapes.rows // max(top_k, 1), 1)
    num_slots = ranks * shapes.local_slots
    dtype = jnp.dtype(shapes.dtype)

    def draw():
        scale = 1 / np.sqrt(shapes.hidden)
        h, f = shapes.hidden, shapes.ffn
        experts = [hashed_uniform((num_slots,) + s, seed, scale, dtype)
                   for seed, s in enumerate(((h, f), (h, f), (f, h)), 4)]
        slot_ids = (hashed_bits((tokens, top_k), 3) % jnp.uint32(num_slots)).astype(jnp.int32)
        weights = (hashed_uniform((tokens, top_k), 2, 0.5, jnp.float32) + 0.5) / top_k
        return (hashed_uniform((tokens, h), 1, 1.0, dtype), weights, slot_ids, *experts)

    return jax.jit(draw, out_shardings=NamedSharding(mesh, P(EP_AXIS)))()


def _close(got, want) -> bool:
    """The adversarial outputs agree to float32 rounding, the timed ones to the dtype's."""
    (check_got, timed_got), (check_want, timed_want) = got, want
    return bool(np.allclose(np.asarray(check_got), np.asarray(check_want), rtol=1e-5, atol=1e-5)
                and relative_close(dtype_tolerance(timed_want.dtype))(timed_got, timed_want))
