"""The batch format shared by the streaming loader, in-process generation, evaluation and benchmarks.

No streaming import here: model-side code and GPU checks use it without the data stack.

Batches (B samples, T = longest input in the batch, = max length + 1):
    input_ids  (B, T) long  d_1..d_n EQ, then PAD
    loss_mask  (B, T) bool  True only at the EQ position (index n): its output predicts the answer
    answer     (B,)   long
    length     (B,)   long  n
    sample_id  (B,)   long  global sample id
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from data_pipeline.digit_chain import TRAIN, Chains, crop_chains, generate
from mythos_dist.config import TaskConfig

Batch = dict[str, torch.Tensor]


def batch_arrays(
    inputs: np.ndarray, lengths: np.ndarray, answers: np.ndarray, sample_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Padded (N, T) inputs and per-sample arrays -> the batch (see the module docstring) as numpy."""
    length = np.asarray(lengths, np.int64)
    return {
        "input_ids": inputs.astype(np.int64),
        "loss_mask": np.arange(inputs.shape[1]) == length[:, None],  # the EQ position
        "answer": np.asarray(answers, np.int64),
        "length": length,
        "sample_id": np.asarray(sample_ids, np.int64),
    }


def as_tensors(arrays: dict[str, np.ndarray]) -> Batch:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def chains_batch(c: Chains) -> Batch:
    """Generated chains (no shards) as a batch: tests, benchmarks, evaluation by sample index."""
    return as_tensors(batch_arrays(c.inputs, c.lengths, c.answers, c.sample_ids))


def crop_batch(batch: Batch, task: TaskConfig, longest: int, seed: int, step: int) -> Batch:
    """The batch with chains of more than `longest` digits cropped (digit_chain.crop_chains);
    columns past the last EQ dropped."""
    if not bool((batch["length"] > longest).any()):
        return batch
    inputs, length, answer = crop_chains(
        task,
        batch["input_ids"].numpy(),
        batch["length"].numpy(),
        batch["sample_id"].numpy(),
        longest,
        seed,
        step,
    )
    inputs = inputs[:, : int(length.max()) + 1]
    return {**batch, **as_tensors(batch_arrays(inputs, length, answer, batch["sample_id"].numpy()))}


class BatchSource(Protocol):
    """What the loop needs from a loader: endless-or-epoch iteration and an exact resume state."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ChainBatches:
    """Micro batches straight from the task generator, no shards (tests, benchmarks, smoke runs).

    Rank r's k-th micro batch holds train samples [(k·W + r)·B, (k·W + r + 1)·B) mod n_train, so the
    samples of optimizer step s are the same for any world size W with W·grad_accum fixed.
    """

    def __init__(self, task: TaskConfig, micro_batch: int, rank: int, world_size: int):
        self.task, self.micro_batch, self.rank, self.world_size = task, micro_batch, rank, world_size
        self.consumed = 0

    def batch(self, k: int) -> Batch:
        n, b = self.task.n_train, self.micro_batch
        start = (k * self.world_size + self.rank) * b % n
        parts = [generate(self.task, TRAIN, start, min(n, start + b))]
        if start + b > n:  # wrap around the split
            parts.append(generate(self.task, TRAIN, 0, start + b - n))
        return chains_batch(
            Chains(*(np.concatenate(cols) for cols in zip(*(vars(p).values() for p in parts))))
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            k = self.consumed
            self.consumed += 1  # before yielding: state_dict() then counts the batch handed out
            yield self.batch(k)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
