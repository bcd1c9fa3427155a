"""Streaming a split's shards to each rank: dataset, collate, loader with exact resume.

Sample order is a function of (shards, data.shuffle_seed, data.num_canonical_nodes, epoch) only:
with the global batch (ranks × batch_size) fixed, the k-th global batch holds the same samples
whatever the number of ranks, nodes or workers, and `loader.state_dict()` / `make_loader(...,
state=...)` resumes at exactly the next unseen sample.

Batches: see data_pipeline.batch.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from data_pipeline.batch import Batch, as_tensors, batch_arrays
from data_pipeline.digit_chain import TRAIN, DataError, pad_rows
from data_pipeline.shards import COLUMNS, check_spec, manifest_digest, read_manifest, sample_at, shard_root
from data_pipeline.streaming_compat import SHM_TO_CLEAN, StreamingDataLoader, StreamingDataset
from mythos_dist.config import DataConfig

log = logging.getLogger(__name__)

_STREAMING_SHM = re.compile(r"^\d{6}_(" + "|".join(map(re.escape, SHM_TO_CLEAN)) + r")$")


class DigitChainDataset(StreamingDataset):
    """One split of the digit-chain shards, as streaming's StreamingDataset configured from DataConfig.

    Yields dicts: tokens (bytes, one uint8 id per token), answer, length, sample_id. A class of our
    own (not a bare StreamingDataset) so that spawned DataLoader workers, which unpickle it, import
    this module, hence streaming_compat's import guard, before streaming.
    """

    def __init__(self, data: DataConfig, split: str, batch_size: int, local: str) -> None:
        train = split == TRAIN
        super().__init__(
            remote=str(shard_root(data.remote)),
            local=local,
            split=split,
            batch_size=batch_size,  # streaming partitions by it; must equal the DataLoader's
            shuffle=train,
            shuffle_seed=data.shuffle_seed,
            num_canonical_nodes=data.num_canonical_nodes,
            predownload=data.predownload or None,
        )
        for shard in self.shards:
            columns = dict(zip(shard.column_names, shard.column_encodings))
            if columns != COLUMNS:
                raise DataError(f"{data.remote}/{split}: shard columns {columns}, expected {COLUMNS}")
        self._mapped: dict[int, mmap.mmap] = {}

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """Sample by global index, read from an mmap of its shard.

        streaming's reader opens the shard file for every sample (~300 µs each on a busy machine, the
        loader's main cost); each process maps a shard once instead. The first access of a shard goes
        through streaming, which copies the shard into the local cache. Safe because we set no
        cache_limit: streaming never evicts a shard file under us.
        """
        shard_id, idx = self.spanner[sample_id]
        if shard_id not in self._mapped:
            super().get_item(sample_id, retry)
            shard = self.shards[shard_id]
            with open(os.path.join(shard.dirname, shard.split, shard.raw_data.basename), "rb") as f:
                self._mapped[shard_id] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return sample_at(self._mapped[shard_id], idx)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned workers: mmaps do not pickle; each process maps its own."""
        return {**self.__dict__, "_mapped": {}}


def collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Samples -> padded batch as numpy arrays. Module-level: spawned workers pickle it.

    numpy, not tensors: a worker hands its batch to the main process by pickling, and torch moves
    every tensor through a new shared-memory segment (~0.1 ms each, the loader's main cost at
    these batch sizes) where a small array is copied by value. `ChainLoader` makes the tensors.
    """

    def col(key: str) -> np.ndarray:
        return np.fromiter((s[key] for s in samples), np.int64, len(samples))

    return batch_arrays(
        pad_rows([s["tokens"] for s in samples]), col("length"), col("answer"), col("sample_id")
    )


class ChainLoader(StreamingDataLoader):
    """StreamingDataLoader (exact resume via state_dict) whose batches are dicts of tensors."""

    def __iter__(self) -> Iterator[Batch]:
        return map(as_tensors, super().__iter__())


def make_loader(
    data: DataConfig,
    split: str,
    batch_size: int,
    *,
    state: dict[str, Any] | None = None,
    local: str | None = None,
    multiprocessing_context: str | None = None,
) -> ChainLoader:
    """A StreamingDataLoader over `split` for this rank; call it on every rank.

    train: shuffled (data.shuffle_seed, reshuffled each epoch), drop_last. Other splits: fixed order,
    nothing dropped; when a split's size is not a multiple of the rank count streaming repeats a few
    samples to even out the ranks, so deduplicate eval results by sample_id.
    state: a previous `loader.state_dict()`, to resume mid-epoch. local: cache directory override
    (default: per dataset and run, see `local_cache_dir`); two live loaders of one split in a process
    need different ones. Iterating the loader again starts the next epoch: create each loader once per
    run (every instance holds shared memory until the process exits).
    """
    prepare_launcher_env()
    root = shard_root(data.remote)
    manifest = read_manifest(root)
    check_spec(manifest, data.task, root)
    if split not in manifest["splits"]:
        raise DataError(f"{root}: no split {split!r}; built: {sorted(manifest['splits'])}")
    if not manifest["splits"][split]["count"]:
        raise DataError(f"{root / split}: split {split!r} has no samples (empty dataset)")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        removed = clean_stale_shared_memory()
        if removed:
            log.warning(
                "removed %d stale streaming shared-memory segments of a killed run: %s", len(removed), removed
            )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank creates its segments before local rank 0 has finished cleaning
    local = local or str(local_cache_dir(data, manifest_digest(root)))
    dataset = DigitChainDataset(data, split, batch_size, local)
    loader = ChainLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=data.num_workers,
        drop_last=split == TRAIN,
        multiprocessing_context=multiprocessing_context if data.num_workers else None,
    )
    if state is not None:
        loader.load_state_dict(state)
    return loader


def prepare_launcher_env() -> None:
    """Streaming reads LOCAL_WORLD_SIZE; the DeepSpeed launcher sets LOCAL_SIZE instead."""
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


def local_cache_dir(data: DataConfig, digest: str) -> Path:
    """Per-node shard cache: keyed by the dataset's manifest digest and by the run.

    The digest: streaming trusts an index.json already in the cache, so a cache of other shards would
    be read silently. The run (torchrun's run id + master address/port, or the pid when launched
    without a launcher): streaming refuses a cache directory that a live job on the node uses, and
    every rank of one node must compute the same directory. data.local, when set, replaces $TMPDIR
    and the run key (a persistent cache for one job at a time).
    """
    if data.local:
        return Path(data.local).expanduser().absolute() / digest[:16]
    if "MASTER_PORT" in os.environ:
        run = "|".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    else:
        run = f"pid{os.getpid()}"
    key = hashlib.sha256(run.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "mythos-data" / f"{digest[:16]}-{key}"


def clean_stale_shared_memory(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink streaming's shared-memory segments that no live process has open or mapped; return them.

    A killed run leaves its segments behind; a new run that reuses the same cache directory then fails
    ("Reused local directory"), and a stale resume segment could even feed it an old resume point.
    streaming's own clean_stale_shared_memory() unlinks *every* streaming segment on the machine,
    including those of other live jobs, so we only remove segments of ours (same uid) that no process
    holds (Linux /proc). Elsewhere this does nothing.
    """
    shm, proc = Path(shm_dir), Path("/proc")
    if not shm.is_dir() or not proc.is_dir():
        return []
    uid = os.getuid()
    candidates = set()
    for entry in os.scandir(shm):
        try:
            if _STREAMING_SHM.match(entry.name) and entry.stat(follow_symlinks=False).st_uid == uid:
                candidates.add(entry.name)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    held = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            with open(pid_dir / "maps") as f:
                held.update(line.rsplit("/", 1)[-1].split()[0] for line in f if f"{shm_dir}/" in line)
            for fd in os.scandir(pid_dir / "fd"):
                target = os.readlink(fd.path)
                if target.startswith(f"{shm_dir}/"):
                    held.add(target.rsplit("/", 1)[-1].split()[0])
        except OSError:
            continue  # gone, or another user's process (which cannot hold our 0600 segments)
    removed = []
    for name in sorted(candidates - held):
        try:
            (shm / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            continue
    return removed
