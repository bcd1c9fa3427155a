"""The digit-chain task, defined once for data building, training and evaluation.

A sample is digits d_1..d_n (token ids 0-9), then EQ, then the answer (Σ d_i) mod `modulus`.
The model input is `d_1..d_n EQ` (n+1 tokens); the target is the answer, predicted from the output at
the EQ position (index n), which is the only position the loss looks at.

Splits are defined by chain length: `train` (TaskConfig.train_lengths) and every entry of
TaskConfig.eval_splits. Every eval split exists twice, as two held-out sets drawn with their own
seeds: `val` (TaskConfig.val_seed), for every choice of recipe, step count or averaging window, and
`test` (TaskConfig.test_seed), for reported numbers only. Generation is vectorised and
deterministic: sample i of a split comes from RNG block i // BLOCK_SIZE, seeded by (seed, split
name, block), so the content of a sample depends on neither the shard size nor how many processes
build the shards, nor on the split's sample count. Train never contains a chain that occurs in an
eval split of either set (short chains have few possibilities); val and test are independent draws
of the same distribution, so they share some of the few short chains with each other.
This module needs only numpy: training and evaluation import it without streaming or torch.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from mythos_dist.config import TaskConfig

N_DIGITS = 10  # token ids 0..9 are the digits themselves
EQ = 10
PAD = 11
VOCAB_SIZE = 12
TRAIN = "train"
VAL, TEST = "val", "test"
HELDOUT = (VAL, TEST)  # the held-out sets every eval split is drawn as
GENERATOR_VERSION = 2  # bump when the sampling algorithm changes: old shards then fail verification
BLOCK_SIZE = 4096  # samples per RNG block
_MAX_REJECTION_ROUNDS = 1000


class DataError(ValueError):
    """Shards, manifest or samples are missing, corrupt or inconsistent with the configuration."""


@dataclass(frozen=True)
class Chains:
    """Samples [start, start + N) of one split, as arrays.

    inputs:     (N, T) uint8 model input: digits, EQ at column lengths[i], PAD after (T ≥ max length + 1)
    lengths:    (N,) int64 number of digits n (= the EQ position)
    answers:    (N,) int64 target token (Σ digits) mod modulus
    sample_ids: (N,) int64 global sample ids
    """

    inputs: np.ndarray
    lengths: np.ndarray
    answers: np.ndarray
    sample_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> np.ndarray:
        """Model input of sample i, (n+1,) uint8, ending with EQ."""
        return self.inputs[i, : self.lengths[i] + 1]


def split_lengths(task: TaskConfig) -> dict[str, tuple[int, int]]:
    """Split name -> inclusive chain-length range; train first, then eval splits by name."""
    return {TRAIN: tuple(task.train_lengths)} | {
        k: tuple(task.eval_splits[k]) for k in sorted(task.eval_splits)
    }


def split_counts(task: TaskConfig) -> dict[str, int]:
    return {name: task.n_train if name == TRAIN else task.n_eval for name in split_lengths(task)}


def first_sample_ids(task: TaskConfig, heldout: str = VAL) -> dict[str, int]:
    """Global sample ids are contiguous per split, in `split_lengths` order (independent of YAML order):
    train, then the eval splits' validation samples; the test samples' ids follow all of those."""
    _check_heldout(heldout)
    out, offset = {}, 0
    counts = split_counts(task)
    for name, count in counts.items():
        out[name] = offset
        offset += count
    if heldout == TEST:
        out = {k: v + (offset if k != TRAIN else 0) for k, v in out.items()}
    return out


def heldout_seed(task: TaskConfig, heldout: str) -> int:
    """The seed the eval splits of held-out set `heldout` ('val' or 'test') are drawn with."""
    _check_heldout(heldout)
    return task.val_seed if heldout == VAL else task.test_seed


def _check_heldout(heldout: str) -> None:
    if heldout not in HELDOUT:
        raise DataError(f"held-out set must be one of {HELDOUT}, got {heldout!r}")


def task_spec(task: TaskConfig) -> dict[str, Any]:
    """Everything that determines the samples, as plain JSON data (stored in the shard manifest)."""
    return {
        "modulus": task.modulus,
        "train_lengths": list(task.train_lengths),
        "eval_splits": {k: list(v) for k, v in sorted(task.eval_splits.items())},
        "n_train": task.n_train,
        "n_eval": task.n_eval,
        "seed": task.seed,
        "val_seed": task.val_seed,
        "test_seed": task.test_seed,
        "generator_version": GENERATOR_VERSION,
        "vocab": {"digits": N_DIGITS, "EQ": EQ, "PAD": PAD, "size": VOCAB_SIZE},
    }


def answer_of(digits: np.ndarray, modulus: int) -> np.ndarray:
    """(N, L) digit rows, PAD (or EQ) beyond each chain -> (N,) int64 answers."""
    d = digits.astype(np.int64)
    return np.where(d < N_DIGITS, d, 0).sum(axis=1) % modulus


def make_input(digits: Sequence[int]) -> np.ndarray:
    """One chain's model input `d_1..d_n EQ`, (n+1,) uint8."""
    arr = np.asarray(digits, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0 or arr.min() < 0 or arr.max() >= N_DIGITS:
        raise DataError(f"a chain is a non-empty sequence of digits 0-9, got {list(digits)!r}")
    return np.append(arr, EQ).astype(np.uint8)


def pad_rows(rows: Sequence[bytes | np.ndarray]) -> np.ndarray:
    """Variable-length token rows (bytes or uint8 arrays) -> (N, T) uint8, T = the longest row,
    right-padded with PAD. Vectorised: one join and one boolean-mask assignment (the mask's row-major
    order is the order of the joined rows)."""
    flat = np.frombuffer(
        b"".join(r if isinstance(r, bytes) else np.asarray(r, np.uint8).tobytes() for r in rows), np.uint8
    )
    sizes = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), int(sizes.max(initial=0))), PAD, dtype=np.uint8)
    out[np.arange(out.shape[1]) < sizes[:, None]] = flat
    return out


def generate(
    task: TaskConfig, split: str, start: int = 0, stop: int | None = None, *, heldout: str | None = None
) -> Chains:
    """Samples [start, stop) of `split` (stop defaults to the split's count).

    heldout: for an eval split, which held-out set ('val' or 'test'; required, so no caller reads
    the test set by accident); for train, None.
    """
    ranges = split_lengths(task)
    if split not in ranges:
        raise DataError(f"unknown split {split!r}; configured: {sorted(ranges)}")
    if split == TRAIN and heldout is not None:
        raise DataError(f"split {TRAIN!r} is not held out; heldout must be None, got {heldout!r}")
    if split != TRAIN:
        if heldout is None:
            raise DataError(f"eval split {split!r}: say which held-out set, heldout={VAL!r} or {TEST!r}")
        _check_heldout(heldout)
    count = split_counts(task)[split]
    stop = count if stop is None else stop
    if not 0 <= start <= stop <= count:
        raise DataError(f"split {split!r} has {count} samples; asked for [{start}, {stop})")
    lo, hi = ranges[split]
    exclude = _eval_chain_keys(_eval_key(task)) if split == TRAIN else None
    seed = task.seed if split == TRAIN else heldout_seed(task, heldout)
    digits, lengths = _rows(seed, split, lo, hi, start, stop, exclude)
    inputs = np.concatenate([digits, np.full((len(digits), 1), PAD, np.uint8)], axis=1)
    inputs[np.arange(len(digits)), lengths] = EQ
    ids = first_sample_ids(task, heldout or VAL)[split] + np.arange(start, stop, dtype=np.int64)
    return Chains(inputs=inputs, lengths=lengths, answers=answer_of(digits, task.modulus), sample_ids=ids)


def crop_chains(
    task: TaskConfig,
    inputs: np.ndarray,
    lengths: np.ndarray,
    sample_ids: np.ndarray,
    longest: int,
    seed: int,
    step: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train chains of more than `longest` digits cut to their first n digits, n drawn uniformly
    from [shortest train length, longest]: the length curriculum's crop. Shorter chains are kept.

    inputs (N, T) model inputs (digits, EQ, PAD), lengths (N,), sample_ids (N,) -> new inputs
    (N, T), lengths and answers ((Σ digits) mod modulus). Lengths uniform over [lo, L] become
    uniform over [lo, longest]. A prefix that is an eval chain is replaced by fresh digits, as the
    generator redraws train chains (train never holds an eval chain). Everything depends only on
    (seed, step, sample id): a resumed run or another world size crops each sample the same way.
    """
    lo, hi = task.train_lengths
    if not lo <= longest <= hi:
        raise DataError(f"crop length {longest} outside the train lengths [{lo}, {hi}]")
    inputs, lengths = inputs.copy(), lengths.astype(np.int64).copy()
    exclude = _eval_chain_keys(_eval_key(task))
    base = _mix64(_mix64(np.array([seed << 32 | step], np.uint64)) ^ sample_ids.astype(np.uint64))
    cols = np.arange(longest, dtype=np.uint64)
    todo = np.flatnonzero(lengths > longest)
    for attempt in range(_MAX_REJECTION_ROUNDS):
        if not todo.size:
            return inputs, lengths, answer_of(inputs, task.modulus)  # EQ and PAD count as 0
        h = _mix64(base[todo] ^ np.uint64(attempt * 0x9E3779B97F4A7C15 % 2**64))
        n = lo + (h % np.uint64(longest - lo + 1)).astype(np.int64)
        digits = inputs[todo, :longest]
        if attempt:  # the prefix drawn before is an eval chain
            digits = (_mix64(h[:, None] ^ (cols[None, :] + np.uint64(1))) % np.uint64(N_DIGITS)).astype(
                inputs.dtype
            )
        digits = np.where(np.arange(longest) < n[:, None], digits, PAD)
        inputs[todo] = PAD
        inputs[todo, :longest] = digits
        inputs[todo, n] = EQ
        lengths[todo] = n
        keys = np.full((todo.size, hi), PAD, np.uint8)
        keys[:, :longest] = digits
        todo = todo[np.isin(_keys(keys), exclude)]
    raise DataError(f"crop to ≤ {longest} digits: (nearly) every such chain is an eval chain; raise the cap")


def check_chains(c: Chains, task: TaskConfig, split: str, where: str) -> None:
    """Raise DataError naming `where` and the first bad sample unless every sample is well formed.

    Well formed: token ids in the vocabulary, digits then EQ at `length` then PAD, length inside the
    split's range, answer = (Σ digits) mod modulus.
    """
    if not len(c):
        raise DataError(f"{where}: no samples (empty dataset)")
    lo, hi = split_lengths(task)[split]
    x = c.inputs.astype(np.int64)
    pos = np.arange(x.shape[1])[None, :]
    n = c.lengths[:, None]
    want = answer_of(np.where(pos < n, x, PAD), task.modulus)
    checks = [  # (bad samples (N,) bool, message for sample i)
        (
            (x >= VOCAB_SIZE).any(1),
            lambda i: f"token id {int(x[i].max())} outside the vocabulary [0, {VOCAB_SIZE})",
        ),
        (
            (c.lengths < lo) | (c.lengths > hi),
            lambda i: f"length {int(c.lengths[i])} outside split {split!r}'s [{lo}, {hi}]",
        ),
        (((pos < n) & (x >= N_DIGITS)).any(1), lambda i: "non-digit token before EQ"),
        (~((pos == n) & (x == EQ)).any(1), lambda i: f"no EQ at position {int(c.lengths[i])} (= length)"),
        (((pos > n) & (x != PAD)).any(1), lambda i: "tokens after EQ (input longer than length + 1)"),
        (
            c.answers != want,
            lambda i: f"answer {int(c.answers[i])} != (Σ digits) mod {task.modulus} = {int(want[i])}",
        ),
    ]
    for bad, message in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: sample_id {int(c.sample_ids[i])}: {message(i)}")


# --------------------------------------------------------------------------- sampling internals


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread uint64 hash of each element."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _draw(rng: np.random.Generator, count: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """count chains with uniform length in [lo, hi] -> digits (count, hi) uint8 PAD-filled, lengths (count,)."""
    lengths = rng.integers(lo, hi + 1, size=count, dtype=np.int64)
    digits = rng.integers(0, N_DIGITS, size=(count, hi), dtype=np.uint8)
    digits[np.arange(hi) >= lengths[:, None]] = PAD
    return digits, lengths


def _keys(digits: np.ndarray) -> np.ndarray:
    """(N, W) rows -> (N,) opaque keys for exact set membership with np.isin."""
    d = np.ascontiguousarray(digits, dtype=np.uint8)
    return d.view(np.dtype((np.void, d.shape[1]))).ravel()


def _block(
    seed: int, split: str, lo: int, hi: int, block: int, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """BLOCK_SIZE samples of one RNG block; rows whose chain is in `exclude` are redrawn from the same RNG."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), block])
    digits, lengths = _draw(rng, BLOCK_SIZE, lo, hi)
    if exclude is None or not exclude.size:
        return digits, lengths
    todo = np.arange(BLOCK_SIZE)
    for _ in range(_MAX_REJECTION_ROUNDS):
        todo = todo[np.isin(_keys(digits[todo]), exclude)]
        if not todo.size:
            return digits, lengths
        digits[todo], lengths[todo] = _draw(rng, todo.size, lo, hi)
    raise DataError(
        f"split {split!r}: chains of length [{lo}, {hi}] are (nearly) all taken by the eval splits; "
        "widen data.task.train_lengths or lower data.task.n_eval"
    )


def _rows(
    seed: int, split: str, lo: int, hi: int, start: int, stop: int, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Samples [start, stop) of a split -> digits (N, hi) uint8 PAD-filled, lengths (N,) int64."""
    first, last = start // BLOCK_SIZE, -(-stop // BLOCK_SIZE)
    blocks = [_block(seed, split, lo, hi, b, exclude) for b in range(first, last)]
    if not blocks:
        return np.zeros((0, hi), np.uint8), np.zeros(0, np.int64)
    off = start - first * BLOCK_SIZE
    digits = np.concatenate([d for d, _ in blocks])[off : off + stop - start]
    lengths = np.concatenate([n for _, n in blocks])[off : off + stop - start]
    return digits, lengths


def _eval_key(task: TaskConfig) -> tuple:
    lo, hi = task.train_lengths
    evals = tuple((k, v[0], v[1]) for k, v in sorted(task.eval_splits.items()))
    return ((task.val_seed, task.test_seed), task.n_eval, lo, hi, evals)


@lru_cache(maxsize=8)
def _eval_chain_keys(key: tuple) -> np.ndarray:
    """Keys (width = train hi) of every eval chain of both held-out sets whose length lies in the
    train range."""
    seeds, n_eval, lo, hi, evals = key
    keys = []
    for (name, elo, ehi), seed in ((e, s) for e in evals for s in seeds):
        if ehi < lo or elo > hi:
            continue
        digits, lengths = _rows(seed, name, elo, ehi, 0, n_eval, None)
        inside = (lengths >= lo) & (lengths <= hi)
        rows = np.full((int(inside.sum()), hi), PAD, np.uint8)
        w = min(hi, ehi)
        rows[:, :w] = digits[inside, :w]
        keys.append(_keys(rows))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.dtype((np.void, hi)))
