#!/usr/bin/env python
"""Your own Flax model with jax_eplb's EP MoE block: your attention, our block on an ``ep`` mesh,
a placement loaded from a TensorRT-LLM YAML plan, and a new plan swapped in at run time.

Runs on CPU-emulated devices when the machine has fewer accelerators than ``--ep``.

  python scripts/example_own_model.py [--ep 4] [--plan plan.yaml]
"""

import argparse
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jax_eplb import MoeLoadBalancerConfig, plan_config_from_slots, plan_placement  # noqa: E402
from jax_eplb.moe import EPMoEBlock, ExpertWeights, MoEConfig, MoEOptions  # noqa: E402
from jax_eplb.sharding import ep_mesh  # noqa: E402
from jax_eplb.cli import HelpWithDefaults

H, E, TOP_K, LAYER = 32, 16, 2, 0


class MyDecoderLayer(nnx.Module):
    """Anyone's attention + jax_eplb's expert-parallel MoE block."""

    def __init__(self, mesh, tables, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(H, rngs=rngs), nnx.RMSNorm(H, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=4, in_features=H, decode=False, rngs=rngs)
        config = MoEConfig(hidden_size=H, expert_ffn_size=16, num_experts=E, top_k=TOP_K)
        self.moe = EPMoEBlock(config, mesh, tables, options=MoEOptions(record=("slot",)), rngs=rngs)

    def __call__(self, x):  # x [B, T, H]; B*T divisible by ep
        x = x + self.attention(self.norm1(x), mask=nnx.make_causal_mask(x[..., 0]))
        b, t, h = x.shape
        moe = self.moe(self.norm2(x).reshape(b * t, h))  # tokens are split over the ep ranks
        return x + moe.out.reshape(b, t, h), moe.rank_load  # rank_load [R]: entries each rank computed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--plan", default=None,
                        help="a moe_load_balancer YAML (default: one written from skewed loads)")
    args = parser.parse_args()
    mesh = ep_mesh(args.ep, None if len(jax.devices()) >= args.ep else args.ep)
    rng = np.random.default_rng(0)
    if args.plan is None:  # what `jax-eplb generate` writes, from loads where a few experts are hot
        args.plan = os.path.join(tempfile.mkdtemp(), "moe_load_balancer.yaml")
        loads = rng.lognormal(0, 1.5, (1, E))
        plan_config_from_slots(plan_placement(loads, 2 * E, args.ep).slot_to_expert, [LAYER]).to_yaml(args.plan)
    plan = MoeLoadBalancerConfig.from_yaml(args.plan)
    num_slots = plan.resolved_num_slots(E)
    tables = plan.assignment_tables([LAYER], E, args.ep, max_replicas=num_slots - E + 1)
    layer = MyDecoderLayer(mesh, tables.layer(0), nnx.Rngs(0))
    # Your checkpoint's experts [E, ...] (random here), laid into this plan's slots.
    experts = ExpertWeights(*(rng.normal(0, 0.1, (E,) + s).astype(np.float32) for s in ((H, 16), (H, 16), (16, H))))
    layer.moe.set_placement(tables.layer(0), experts)

    graphdef, _ = nnx.split(layer)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x = rng.normal(size=(2 * args.ep, 8, H)).astype(np.float32)
    out, rank_load = forward(nnx.state(layer), x)
    print(f"plan {args.plan}: {num_slots} slots on {args.ep} ranks; entries per rank {np.asarray(rank_load)}")

    # Swap in another plan while serving: only the block's variables change, nothing recompiles.
    other = plan_placement(rng.lognormal(0, 1.5, (1, E)), num_slots, args.ep).slot_to_expert
    new_tables = plan_config_from_slots(other, [LAYER]).assignment_tables([LAYER], E, args.ep, tables.max_replicas)
    layer.moe.set_placement(new_tables.layer(0), experts)
    out2, rank_load2 = forward(nnx.state(layer), x)
    print(f"new plan: entries per rank {np.asarray(rank_load2)}; output unchanged: "
          f"{bool(np.allclose(out, out2, atol=1e-5))}; compiled programs: {forward._cache_size()}")


if __name__ == "__main__":
    main()
