"""Which MoE layers are re-placed at which iteration (TensorRT-LLM's online schedule).

With L balanced layers and k = ``layer_updates_per_iter``, layer l belongs to group
``l % ceil(L/k)``; one extra empty step is appended when the first and last groups have the
same size (so consecutive periods do not update a layer twice in a row); the queue advances
one group per iteration; nothing happens during warm-up.
"""

from __future__ import annotations

import math


def update_groups(num_layers: int, layer_updates_per_iter: int) -> list[tuple[int, ...]]:
    """The period: for each step, the (0-based MoE-layer) indices re-placed then."""
    if num_layers < 1 or layer_updates_per_iter < 1:
        raise ValueError(f"need num_layers >= 1 and layer_updates_per_iter >= 1, got {num_layers}, "
                         f"{layer_updates_per_iter}")
    steps = math.ceil(num_layers / layer_updates_per_iter)
    groups = [tuple(l for l in range(num_layers) if l % steps == g) for g in range(steps)]
    if len(groups[0]) == len(groups[-1]):
        groups.append(())
    return groups


class OnlineSchedule:
    """``due(iteration)``: the layers to re-place at ``iteration`` (iterations counted from 0,
    the first ``warmup_iters`` excluded)."""

    def __init__(self, num_layers: int, layer_updates_per_iter: int, warmup_iters: int = 0):
        self.groups = update_groups(num_layers, layer_updates_per_iter)
        self.warmup_iters = warmup_iters

    @property
    def period(self) -> int:
        return len(self.groups)

    def due(self, iteration: int) -> tuple[int, ...]:
        if iteration < self.warmup_iters:
            return ()
        return self.groups[(iteration - self.warmup_iters) % self.period]
