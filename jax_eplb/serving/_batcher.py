"""In-flight batching: the rows of the running batch and the inputs of each iteration.

Axis legend: B batch rows, P prompt tokens a row prefills in one iteration (the chunk).

Whenever rows are free and requests wait, requests are admitted in queue order; an iteration in
which some rows prefill (a whole prompt, or a chunk of it with chunked prefill) while the others
decode one token is *mixed*, otherwise it is a *decode* iteration. A request leaves after its
``output_tokens`` (or ``eos_id``, or one of its ``stop_ids``), or when it is cancelled (a server's
client went away), which frees its row at once.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from jax_eplb.model import Sampling
from jax_eplb.serving._dataset import Request


class StepInputs(NamedTuple):
    """One iteration's host inputs (see ``ModelRunner.mixed`` / ``decode``)."""

    mixed: bool  # some rows prefill in this iteration
    prompt: np.ndarray  # [B, P] prompt chunk per prefilling row (zeros elsewhere)
    lengths: np.ndarray  # [B] tokens each row prefills now (0: not prefilling)
    starts: np.ndarray  # [B] position where each row's chunk starts
    decoding: np.ndarray  # [B] bool: rows decoding one token
    next_token: np.ndarray  # [B] the decoding rows' input tokens
    positions: np.ndarray  # [B] the decoding rows' positions
    sampling: Sampling | None = None  # per-row sampling when some active row samples (None: all greedy)


class Emitted(NamedTuple):
    """A token one request got in an iteration; ``finish_reason``: None while the request goes on, else
    "stop" (EOS or one of its stop ids, kept) or "length" (its ``output_tokens`` reached)."""

    task_id: int | str
    token: int
    finish_reason: str | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class InFlightBatcher:
    """Owns the rows: which request each serves, how much of its prompt is in the cache, what it
    has generated so far.

    Args:
      batch: rows B; chunk: most prompt tokens a row prefills per iteration (the longest prompt
        for whole-prompt prefill); eos_id: < 0 ignores EOS.
    """

    def __init__(self, requests: Sequence[Request], batch: int, chunk: int, eos_id: int = -1):
        self.queue = list(requests)
        self.batch, self.chunk, self.eos_id = batch, chunk, eos_id
        self.owner: list[Request | None] = [None] * batch
        self.prefilled = np.zeros(batch, np.int64)  # prompt tokens of the row's request already in its cache
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.positions = np.zeros(batch, np.int32)
        self.next_token = np.zeros(batch, np.int32)
        self.done: dict = {}  # task_id -> generated ids
        self.emitted: list[Emitted] = []  # the tokens of the last ``advance``, in row order

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(o is not None for o in self.owner)

    def admit(self) -> list[Request]:
        """Free rows take the next waiting requests; returns them."""
        admitted = []
        for i in [i for i in range(self.batch) if self.owner[i] is None][:len(self.queue)]:
            self.owner[i], self.generated[i], self.prefilled[i] = self.queue.pop(0), [], 0
            admitted.append(self.owner[i])
        return admitted

    @property
    def running(self) -> int:
        return sum(o is not None for o in self.owner)

    @property
    def prefilling(self) -> bool:
        """Some row has prompt tokens left: the next iteration is mixed anyway."""
        return bool(np.any(self.prefilled < self._prompt_lengths()))

    def cancel(self, task_id) -> bool:
        """Drops a waiting or running request (its row is free for the next ``admit``); whether it was here."""
        for i, owner in enumerate(self.owner):
            if owner is not None and owner.task_id == task_id:
                self.owner[i] = None
                return True
        before = len(self.queue)
        self.queue = [r for r in self.queue if r.task_id != task_id]
        return len(self.queue) < before

    def _sampling(self, active: np.ndarray) -> Sampling | None:
        if not any(self.owner[i].temperature > 0 for i in np.flatnonzero(active)):
            return None
        sampling = Sampling.greedy(self.batch)
        for i in np.flatnonzero(active):
            request = self.owner[i]
            sampling.temperature[i], sampling.top_p[i] = request.temperature, request.top_p
            sampling.seed[i], sampling.counter[i] = request.seed % 2 ** 32, len(self.generated[i])
        return sampling

    def _prompt_lengths(self) -> np.ndarray:
        return np.array([len(o.input_ids) if o is not None else 0 for o in self.owner])

    def inputs(self) -> StepInputs:
        prompt_len = self._prompt_lengths()
        decoding = np.array([o is not None for o in self.owner]) & (self.prefilled >= prompt_len)
        lengths = np.where(self.prefilled < prompt_len, np.minimum(prompt_len - self.prefilled, self.chunk), 0)
        prompt = np.zeros((self.batch, self.chunk), np.int32)
        for i in np.flatnonzero(lengths):
            start = self.prefilled[i]
            prompt[i, :lengths[i]] = self.owner[i].input_ids[start:start + lengths[i]]
        return StepInputs(bool(lengths.any()), prompt, lengths.astype(np.int32),
                          np.where(lengths > 0, self.prefilled, 0).astype(np.int32), decoding,
                          self.next_token.copy(), self.positions.copy(), self._sampling(decoding | (lengths > 0)))

    def advance(self, step: StepInputs, fresh: np.ndarray) -> int:
        """Takes the iteration's next tokens ``fresh`` ``[B]``; returns how many rows produced one."""
        prompt_len = self._prompt_lengths()
        prefilling = np.flatnonzero(step.lengths)
        finishing = prefilling[self.prefilled[prefilling] + step.lengths[prefilling] >= prompt_len[prefilling]]
        self.prefilled[prefilling] += step.lengths[prefilling]
        stepping = step.decoding.copy()  # rows that produce a token in this iteration
        stepping[finishing] = True
        self.positions = self.positions + step.decoding  # decoded rows wrote one more position
        self.positions[finishing] = prompt_len[finishing]  # prefilled rows: the next token goes here
        self.emitted = []
        for i in np.flatnonzero(stepping):
            request = self.owner[i]
            token = int(fresh[i])
            self.next_token[i] = token
            self.generated[i].append(token)
            reason = ("stop" if 0 <= self.eos_id == token or token in request.stop_ids
                      else "length" if len(self.generated[i]) >= request.output_tokens else None)
            self.emitted.append(Emitted(request.task_id, token, reason))
            if reason is not None:
                self.done[request.task_id] = self.generated[i]
                self.owner[i] = None
        return int(stepping.sum())
