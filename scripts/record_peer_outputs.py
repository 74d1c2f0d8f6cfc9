#!/usr/bin/env python
"""Records DeepSeek EPLB's own outputs (``rebalance_experts`` of deepseek-ai/EPLB's eplb.py, run with
torch) on tie-heavy loads, as tests/fixtures/peers/deepseek_eplb.json: the parity test checks our
``deepseek_rebalance`` against them without torch or the peer's code in the repository.

  pip install torch && git clone https://github.com/deepseek-ai/EPLB eplb-checkout
  python scripts/record_peer_outputs.py --eplb eplb-checkout [--data ../shared/data/deepseek-v3-sglang]

With ``--data`` it also prints how many real-data layer plans differ (the parity run in
docs/benchmarks.md); the fixture itself holds only synthetic loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from jax_eplb.cli import HelpWithDefaults

# (num_replicas, num_groups, num_nodes, num_gpus): global and hierarchical policies.
GEOMETRIES = [(24, 1, 1, 4), (32, 1, 1, 8), (48, 4, 2, 8), (64, 8, 4, 16), (40, 2, 1, 10)]


def synthetic_loads() -> list[np.ndarray]:
    """Loads with many equal values (multiples of 128, as SGLang records), where tie order decides."""
    rng = np.random.default_rng(7)
    return [128.0 * rng.integers(0, 6, (3, 16)), 128.0 * rng.integers(1, 3, (2, 16)),
            np.round(rng.lognormal(8, 1.0, (3, 16))) * 128, 2.0 ** 24 + rng.integers(0, 4, (2, 16))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--eplb", type=Path, required=True, help="a checkout of deepseek-ai/EPLB")
    parser.add_argument("--data", type=Path, default=None, help="SGLang logical_count files to compare on")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests/fixtures/peers/deepseek_eplb.json")
    args = parser.parse_args()
    import torch

    sys.path.insert(0, str(args.eplb))
    import eplb

    cases = []
    for loads in synthetic_loads():
        for replicas, groups, nodes, gpus in GEOMETRIES:
            if loads.max() >= 2 ** 24 and groups > 1:
                continue  # torch's float32 group sums above 2^24: its reduction order is not reproduced
            phy2log, log2phy, logcnt = eplb.rebalance_experts(torch.tensor(loads), replicas, groups, nodes, gpus)
            cases.append({"weight": loads.tolist(), "num_replicas": replicas, "num_groups": groups,
                          "num_nodes": nodes, "num_gpus": gpus, "phy2log": phy2log.tolist(),
                          "logcnt": logcnt.tolist()})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(cases) + "\n")
    print(f"{len(cases)} cases -> {args.output}")
    if args.data:
        compare_real(eplb, torch, args.data)


def compare_real(eplb, torch, data: Path) -> None:
    from jax_eplb import deepseek_rebalance, load_sglang_json

    differ = total = 0
    for path in sorted(data.glob("*.json")):
        loads = load_sglang_json(path).total()
        for replicas, groups, nodes, gpus in [(288, 1, 1, 32), (320, 1, 1, 64), (288, 1, 1, 144), (288, 8, 4, 32),
                                              (256, 8, 2, 16)]:
            want = eplb.rebalance_experts(torch.tensor(loads), replicas, groups, nodes, gpus)[0].numpy()
            got = deepseek_rebalance(loads, replicas, groups, nodes, gpus).phy2log
            differ += int(np.any(got != want, axis=1).sum())
            total += loads.shape[0]
    print(f"real loads: {differ} of {total} layer plans differ from eplb.py")


if __name__ == "__main__":
    main()
