"""The task definition: answers, determinism, train/eval disjointness, sample checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data_pipeline.batch import chains_batch, crop_batch
from data_pipeline.digit_chain import (
    EQ,
    HELDOUT,
    PAD,
    TEST,
    TRAIN,
    VAL,
    VOCAB_SIZE,
    Chains,
    DataError,
    check_chains,
    first_sample_ids,
    generate,
    make_input,
    pad_rows,
    split_lengths,
)
from mythos_dist.config import ConfigError, TaskConfig

TASK = TaskConfig(n_train=6000, n_eval=2000)


def _chains(c: Chains) -> set[tuple[int, ...]]:
    return {tuple(c.tokens(i).tolist()) for i in range(len(c))}


def test_vocabulary_constants() -> None:
    assert (EQ, PAD, VOCAB_SIZE) == (10, 11, 12)
    assert list(make_input([3, 0, 9])) == [3, 0, 9, EQ]
    with pytest.raises(DataError):
        make_input([1, 10])


def _heldout(split: str, heldout: str = VAL) -> dict[str, str | None]:
    return {"heldout": None if split == TRAIN else heldout}


def _eval_chains(task: TaskConfig, heldouts=HELDOUT) -> set[tuple[int, ...]]:
    return set().union(*(_chains(generate(task, s, heldout=h)) for s in task.eval_splits for h in heldouts))


@pytest.mark.parametrize("split", [TRAIN, "id", "ood1", "ood2"])
def test_samples_answer_lengths_and_ids(split: str) -> None:
    c = generate(TASK, split, 0, 700, **_heldout(split))
    lo, hi = split_lengths(TASK)[split]
    for i in range(len(c)):
        tokens = c.tokens(i).tolist()
        n = int(c.lengths[i])
        assert lo <= n <= hi and len(tokens) == n + 1 and tokens[-1] == EQ
        assert all(0 <= t <= 9 for t in tokens[:-1])
        assert c.answers[i] == sum(tokens[:-1]) % TASK.modulus
        assert (c.inputs[i, n + 1 :] == PAD).all()
    assert c.sample_ids.tolist() == list(
        range(first_sample_ids(TASK)[split], first_sample_ids(TASK)[split] + 700)
    )
    assert set(c.lengths.tolist()) == set(range(lo, hi + 1))  # every length drawn


def test_generation_is_deterministic_and_independent_of_ranges() -> None:
    full = generate(TASK, TRAIN)
    again = generate(TASK, TRAIN)
    part = generate(TASK, TRAIN, 4000, 4500)  # crosses an RNG block boundary (4096)
    assert np.array_equal(full.inputs, again.inputs) and np.array_equal(full.answers, again.answers)
    assert np.array_equal(part.inputs, full.inputs[4000:4500, : part.inputs.shape[1]])
    bigger = generate(dataclasses.replace(TASK, n_train=9000), TRAIN, 0, 6000)
    assert np.array_equal(bigger.inputs, full.inputs)  # a sample does not depend on the split's size
    other = generate(dataclasses.replace(TASK, seed=TASK.seed + 1), TRAIN, 0, 100)
    assert not np.array_equal(other.inputs, full.inputs[:100])


def test_train_shares_no_chain_with_any_eval_split() -> None:
    train = _chains(generate(TASK, TRAIN))
    evals = _eval_chains(TASK)  # of the validation and the test set
    assert not train & evals
    # the exclusion matters: the id split takes most of the 100 two-digit chains
    two_digit_eval = {c for c in evals if len(c) == 3}
    assert len(two_digit_eval) > 50
    assert any(len(c) == 3 for c in train)


def test_val_and_test_are_separate_draws_with_their_own_seeds_and_ids() -> None:
    """Every eval split exists as a validation and a test set: different samples (drawn with
    val_seed and test_seed), disjoint global sample ids, each set a function of its own seed only,
    and train excludes the chains of both."""
    n = TASK.n_eval
    for split in TASK.eval_splits:
        val, test = generate(TASK, split, heldout=VAL), generate(TASK, split, heldout=TEST)
        check_chains(val, TASK, split, "val")
        check_chains(test, TASK, split, "test")
        assert (val.inputs[:, : test.inputs.shape[1]] != test.inputs[:, : val.inputs.shape[1]]).any(
            1
        ).mean() > 0.9
        assert not set(val.sample_ids.tolist()) & set(test.sample_ids.tolist())
        assert len(set(test.sample_ids.tolist())) == n
    ids = np.concatenate(
        [generate(TASK, TRAIN).sample_ids]
        + [generate(TASK, s, heldout=h).sample_ids for s in TASK.eval_splits for h in HELDOUT]
    )
    assert len(np.unique(ids)) == len(ids)  # unique over train, val and test
    # a set depends on its own seed only
    moved = dataclasses.replace(TASK, test_seed=99)
    assert np.array_equal(
        generate(moved, "ood1", heldout=VAL).inputs, generate(TASK, "ood1", heldout=VAL).inputs
    )
    assert not np.array_equal(
        generate(moved, "ood1", heldout=TEST).inputs, generate(TASK, "ood1", heldout=TEST).inputs
    )
    # the validation set is drawn as every evaluation before the split drew its samples
    # (seed val_seed = 1234, the old task seed), so earlier numbers are validation numbers
    assert TASK.val_seed == TaskConfig().seed == 1234
    # train excludes the test set's chains too: the short ones the test set took are not in train
    train = _chains(generate(TASK, TRAIN))
    test_only = _eval_chains(TASK, (TEST,)) - _eval_chains(TASK, (VAL,))
    assert any(len(c) <= 4 for c in test_only) and not train & test_only


def test_heldout_set_must_be_named() -> None:
    with pytest.raises(DataError, match=r"eval split 'id': say which held-out set, heldout='val' or 'test'"):
        generate(TASK, "id", 0, 10)
    with pytest.raises(DataError, match=r"held-out set must be one of \('val', 'test'\), got 'dev'"):
        generate(TASK, "id", 0, 10, heldout="dev")
    with pytest.raises(DataError, match="'train' is not held out"):
        generate(TASK, TRAIN, 0, 10, heldout=VAL)
    with pytest.raises(ConfigError, match=r"data\.task\.test_seed: must differ from val_seed"):
        TaskConfig(val_seed=5, test_seed=5).validate()


def test_train_lengths_exhausted_by_eval_raise() -> None:
    task = TaskConfig(train_lengths=(1, 1), eval_splits={"id": (1, 1)}, n_train=10, n_eval=500)
    with pytest.raises(DataError, match="taken by the eval splits"):
        generate(task, TRAIN)


def test_check_chains_names_the_bad_sample() -> None:
    good = generate(TASK, "id", 0, 50, heldout=VAL)
    check_chains(good, TASK, "id", "here")
    oov = good.inputs.copy()
    oov[3, 0] = 12
    with pytest.raises(DataError, match=r"here: sample_id \d+: token id 12 outside the vocabulary"):
        check_chains(dataclasses.replace(good, inputs=oov), TASK, "id", "here")
    wrong = good.answers.copy()
    wrong[7] = (wrong[7] + 1) % TASK.modulus
    with pytest.raises(DataError, match="answer"):
        check_chains(dataclasses.replace(good, answers=wrong), TASK, "id", "here")
    no_eq = good.inputs.copy()
    no_eq[1, good.lengths[1]] = 4
    with pytest.raises(DataError, match="no EQ"):
        check_chains(dataclasses.replace(good, inputs=no_eq), TASK, "id", "here")
    with pytest.raises(DataError, match="length"):
        check_chains(good, TASK, "ood2", "here")  # id lengths lie outside ood2's range
    with pytest.raises(DataError, match="empty"):
        check_chains(generate(TASK, "id", 0, 0, heldout=VAL), TASK, "id", "here")


def test_pad_rows() -> None:
    out = pad_rows([bytes([1, 2, EQ]), np.array([3, EQ], np.uint8)])
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 2, EQ], [3, EQ, PAD]]


def test_split_names_validated() -> None:
    with pytest.raises(ConfigError, match=r"eval_splits\.train"):
        TaskConfig(eval_splits={"train": (2, 3)}).validate()
    with pytest.raises(ConfigError, match="eval_splits"):
        TaskConfig(eval_splits={"a/b": (2, 3)}).validate()


def test_crop_cuts_long_chains_to_prefixes_with_their_own_answer() -> None:
    """The crop curriculum's data side: chains past the cap become their own prefixes (EQ after
    them, answer recomputed, lengths uniform up to the cap) unless the prefix is an eval chain;
    shorter chains are left alone, and the crop of a sample depends only on (seed, step, sample id)."""
    batch = chains_batch(generate(TASK, TRAIN, 0, 5000))
    out = crop_batch(batch, TASK, longest=6, seed=0, step=7)
    n_B = out["length"]
    assert out["input_ids"].shape[1] == int(n_B.max()) + 1 == 7
    short = batch["length"] <= 6
    assert torch.equal(n_B[short], batch["length"][short])
    assert torch.equal(out["answer"][short], batch["answer"][short])
    prefix_B = torch.zeros(len(n_B), dtype=torch.bool)
    for i in range(len(n_B)):
        n, ids = int(n_B[i]), out["input_ids"][i]
        prefix_B[i] = torch.equal(ids[:n], batch["input_ids"][i, :n])
        assert ids[n] == EQ and (ids[n + 1 :] == PAD).all() and (ids[:n] < 10).all()
        assert int(out["answer"][i]) == int(ids[:n].sum()) % TASK.modulus
        assert out["loss_mask"][i].nonzero().flatten().tolist() == [n]
    # fresh digits only where a prefix is an eval chain: often at 2-3 digits (TASK's 2,000 ID
    # chains hold most 2-digit chains), so mostly prefixes, and every short chain untouched
    assert prefix_B.float().mean() > 0.8 and prefix_B[short].all()
    cropped = Chains(out["input_ids"].numpy().astype(np.uint8), n_B.numpy(), out["answer"].numpy(),
                     out["sample_id"].numpy())  # fmt: skip
    check_chains(cropped, TASK, TRAIN, "cropped")
    evals = _eval_chains(TASK)
    assert not _chains(cropped) & evals  # train still never holds an eval chain
    # uniform over 2..6 but for the chains the eval splits of both held-out sets take (most 2-digit
    # ones, a third of the 3-digit, a few 4-digit), as in the generator's own train split
    counts = torch.bincount(n_B, minlength=7)[2:].tolist()
    assert counts[0] < 0.3 * counts[-1] and max(counts[3:]) < 1.1 * min(counts[3:]), counts
    again = crop_batch(batch, TASK, 6, seed=0, step=7)
    assert all(torch.equal(again[k], out[k]) for k in out)
    half = crop_batch({k: v[1::2] for k, v in batch.items()}, TASK, 6, seed=0, step=7)
    assert torch.equal(half["length"], n_B[1::2])  # per sample: the same at any world size
    other = crop_batch(batch, TASK, 6, seed=0, step=8)
    assert (other["length"] != n_B).float().mean() > 0.3  # another step crops differently
    assert crop_batch(batch, TASK, 12, seed=0, step=7) is batch  # nothing past the cap
    with pytest.raises(DataError, match="crop length 1 outside the train lengths"):
        crop_batch(batch, TASK, 1, seed=0, step=7)
