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

import numpy as np
import torch

from data_pipeline.digit_chain import Chains, crop_chains
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
