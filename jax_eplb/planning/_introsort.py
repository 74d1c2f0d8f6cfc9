"""The order ``torch.sort(x, descending=True)`` gives on CPU, ties included.

DeepSeek EPLB sorts with torch's default (unstable) sort, and on CPU that is libstdc++'s
``std::sort`` (introsort: median-of-three quicksort down to 16-element runs, a heapsort when the
recursion gets deep, then insertion sort) over (value, index) pairs compared by value alone. Equal
values come out in the order that algorithm leaves them, which is not index order; planning
identical loads the same way as eplb.py needs exactly that order. Checked against torch on random
tie-heavy arrays (tests/test_planners.py has hand-checked cases; the parity run is described in
docs/benchmarks.md).
"""

from __future__ import annotations

import math

import numpy as np

_THRESHOLD = 16  # libstdc++'s _S_threshold


def torch_descending_order(values: np.ndarray) -> np.ndarray:
    """``[B, N]`` -> ``[B, N]`` indices: each row as ``torch.sort(row, descending=True).indices``."""
    values = np.asarray(values)
    return np.stack([np.asarray(_IntroSort(row.tolist()).order(), np.int64) for row in values])


class _IntroSort:
    """libstdc++ ``std::sort`` of indices by ``keys`` descending (``comp(a, b)``: a goes first)."""

    def __init__(self, keys: list):
        self.keys = keys
        self.a = list(range(len(keys)))

    def _before(self, x: int, y: int) -> bool:
        return self.keys[x] > self.keys[y]

    def order(self) -> list[int]:
        n = len(self.a)
        if n > 1:
            self._introsort(0, n, 2 * int(math.log2(n)))
            if n > _THRESHOLD:
                self._insertion(0, _THRESHOLD)
                for i in range(_THRESHOLD, n):
                    self._linear_insert(i)
            else:
                self._insertion(0, n)
        return self.a

    def _introsort(self, first: int, last: int, depth: int) -> None:
        a = self.a
        while last - first > _THRESHOLD:
            if depth == 0:
                self._heapsort(first, last)
                return
            depth -= 1
            self._median_to_first(first, first + 1, first + (last - first) // 2, last - 1)
            cut = self._partition(first + 1, last, a[first])
            self._introsort(cut, last, depth)
            last = cut

    def _median_to_first(self, result: int, x: int, y: int, z: int) -> None:
        a, before = self.a, self._before
        if before(a[x], a[y]):
            pick = y if before(a[y], a[z]) else (z if before(a[x], a[z]) else x)
        else:
            pick = x if before(a[x], a[z]) else (z if before(a[y], a[z]) else y)
        a[result], a[pick] = a[pick], a[result]

    def _partition(self, first: int, last: int, pivot: int) -> int:
        a, before = self.a, self._before
        while True:
            while before(a[first], pivot):
                first += 1
            last -= 1
            while before(pivot, a[last]):
                last -= 1
            if not first < last:
                return first
            a[first], a[last] = a[last], a[first]
            first += 1

    def _insertion(self, first: int, last: int) -> None:
        a = self.a
        for i in range(first + 1, last):
            value = a[i]
            if self._before(value, a[first]):
                a[first + 1:i + 1] = a[first:i]
                a[first] = value
            else:
                self._linear_insert(i)

    def _linear_insert(self, last: int) -> None:
        a = self.a
        value = a[last]
        while self._before(value, a[last - 1]):
            a[last] = a[last - 1]
            last -= 1
        a[last] = value

    def _heapsort(self, first: int, last: int) -> None:
        a, length = self.a, last - first
        for parent in range((length - 2) // 2, -1, -1):
            self._adjust_heap(first, parent, length, a[first + parent])
        while last - first > 1:
            last -= 1
            value = a[last]
            a[last] = a[first]
            self._adjust_heap(first, 0, last - first, value)

    def _adjust_heap(self, first: int, hole: int, length: int, value: int) -> None:
        a, before, top, child = self.a, self._before, hole, hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if before(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and before(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value
