"""Loader pieces in this process: collate, spawned workers, shared-memory hygiene, launcher env, errors."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections import Counter
from multiprocessing import shared_memory
from pathlib import Path

import pytest
import torch

from data_pipeline import loader as loader_mod
from data_pipeline.batch import as_tensors
from data_pipeline.digit_chain import EQ, PAD, DataError, generate
from data_pipeline.loader import (
    DigitChainDataset,
    clean_stale_shared_memory,
    collate,
    local_cache_dir,
    make_loader,
    prepare_launcher_env,
)
from data_pipeline.streaming_compat import streaming
from mythos_dist.config import Config

SHM = Path("/dev/shm")
needs_shm = pytest.mark.skipif(not SHM.is_dir(), reason="needs Linux /dev/shm")


def test_collate_pads_and_masks_the_eq_position(cfg: Config) -> None:
    c = generate(cfg.data.task, "id", 0, 9, heldout="val")
    samples = [
        {
            "tokens": c.tokens(i).tobytes(),
            "answer": c.answers[i],
            "length": c.lengths[i],
            "sample_id": c.sample_ids[i],
        }
        for i in range(len(c))
    ]
    b = as_tensors(collate(samples))
    t = int(c.lengths.max()) + 1
    assert b["input_ids"].shape == (9, t) and b["input_ids"].dtype == torch.long
    assert b["loss_mask"].shape == (9, t) and b["loss_mask"].dtype == torch.bool
    for key in ("answer", "length", "sample_id"):
        assert b[key].shape == (9,) and b[key].dtype == torch.long
    assert b["loss_mask"].sum(1).tolist() == [1] * 9  # exactly one position per sample ...
    assert (b["input_ids"][b["loss_mask"]] == EQ).all()  # ... the EQ
    for i in range(9):
        n = int(c.lengths[i])
        assert b["input_ids"][i, : n + 1].tolist() == c.tokens(i).tolist()
        assert (b["input_ids"][i, n + 1 :] == PAD).all()
    assert b["answer"].tolist() == c.answers.tolist() and b["sample_id"].tolist() == c.sample_ids.tolist()


def test_spawned_workers_load_every_eval_sample(cfg: Config, tmp_path: Path) -> None:
    """Spawned workers unpickle the dataset: this only works if streaming's import is guarded there too."""
    cfg.data.num_workers = 1  # each spawned worker imports torch and streaming afresh: seconds
    loader = make_loader(cfg.data, "ood1", 64, local=str(tmp_path), multiprocessing_context="spawn")
    assert isinstance(loader.dataset, DigitChainDataset)
    ids = [i for b in loader for i in b["sample_id"].tolist()]
    assert Counter(ids) == Counter(range(2248, 2448))  # ood1 follows train (2048) and id (200)


@needs_shm
def test_clean_stale_shared_memory_spares_live_segments() -> None:
    prefix = random.randrange(900_000, 999_999)  # far above prefixes that live jobs use
    dead = SHM / f"{prefix:06}_locals"  # as a SIGKILLed run leaves it: a file nobody holds
    dead.write_bytes(b"\0" * 8)
    live = shared_memory.SharedMemory(name=f"{prefix + 1:06}_barrier", create=True, size=8)
    try:
        removed = clean_stale_shared_memory()
        assert dead.name in removed and not dead.exists()
        assert (SHM / live.name).exists() and live.name not in removed
    finally:
        live.close()
        live.unlink()
        dead.unlink(missing_ok=True)


def _plant_stale_locals(stream_local: Path) -> Path:
    """What a killed run leaves: its `locals` segment, naming its cache dir, at the first prefix that
    streaming examines (no segment there and no file lock in $TMPDIR, which make it skip a prefix)."""
    tmp = Path(tempfile.gettempdir())
    prefix = next(
        p
        for p in range(1000)
        if not (SHM / f"{p:06}_locals").exists() and not list(tmp.glob(f"{p:06}_*_filelock"))
    )
    stale = SHM / f"{prefix:06}_locals"
    stale.write_bytes(streaming.base.shared.prefix._pack_locals([str(stream_local.absolute())], prefix))
    return stale


@needs_shm
def test_stale_segment_of_a_killed_run_is_cleaned_not_a_crash(
    cfg: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stale = _plant_stale_locals(tmp_path / "cache" / "id")
    try:
        with caplog.at_level(logging.WARNING, logger=loader_mod.__name__):
            loader = make_loader(cfg.data, "id", 50, local=str(tmp_path / "cache"))
        assert "stale streaming shared-memory" in caplog.text and stale.name in caplog.text
        assert sum(len(b["sample_id"]) for b in loader) == 200
        # without the cleaning, streaming refuses such a segment (checked last: a failed
        # StreamingDataset keeps the segment mapped in this process until exit)
        stale = _plant_stale_locals(tmp_path / "other" / "id")
        with pytest.raises(ValueError, match="Reused local directory"):
            DigitChainDataset(cfg.data, "id", 50, str(tmp_path / "other"))
    finally:
        stale.unlink(missing_ok=True)


def test_deepspeed_launcher_local_size_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")  # so that monkeypatch restores the original afterwards
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "4")
    prepare_launcher_env()
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"


def test_local_cache_is_keyed_by_dataset_and_run(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MASTER_PORT", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    alone = local_cache_dir(cfg.data, "a" * 64)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    job1 = local_cache_dir(cfg.data, "a" * 64)
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert len({alone, job1, local_cache_dir(cfg.data, "a" * 64), local_cache_dir(cfg.data, "b" * 64)}) == 4
    cfg.data.local = "/scratch/cache"
    assert local_cache_dir(cfg.data, "a" * 64) == Path("/scratch/cache") / ("a" * 16)


def test_make_loader_rejects_bad_input(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no split 'nope'"):
        make_loader(cfg.data, "nope", 8)
    cfg.data.task.modulus = 5
    with pytest.raises(DataError, match=r"task\.modulus"):
        make_loader(cfg.data, "train", 8)
    cfg.data.remote = str(tmp_path / "missing")
    with pytest.raises(DataError, match="does not exist"):
        make_loader(cfg.data, "train", 8)
