"""MDS shards of every split plus a manifest; building (parallel, reproducible, atomic) and verifying.

Layout of `data.remote`:

    manifest.json            written last: task spec, counts, sha256 of every file below
    train/index.json         streaming's index (version 2), one entry per shard
    train/shard.00000.mds    samples [0, samples_per_shard) of the split, in sample-id order
    <eval split>/...         the split's validation set (val_seed); the test set (test_seed) is
                             never written beside the training data: evaluation draws it in memory

A build writes everything into a hidden sibling directory and renames it onto `remote` only once the
manifest is written, so a killed build never leaves a directory that looks complete. `verify` checks
the manifest against the config, each index against the manifest, each file's sha256 and, with
`deep`, every sample (vocabulary, EQ position, answer, length range, sample ids).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing as mp
import os
import shutil
import socket
import struct
import time
import urllib.parse
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.digit_chain import (
    PAD,
    TRAIN,
    VAL,
    Chains,
    DataError,
    check_chains,
    first_sample_ids,
    generate,
    split_counts,
    split_lengths,
    task_spec,
)
from data_pipeline.streaming_compat import MDSWriter
from mythos_dist.config import DataConfig, TaskConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"  # streaming's index basename
# tokens as raw bytes (one uint8 id each): MDS's ndarray encoding costs ~45 µs per sample to write
COLUMNS = {"tokens": "bytes", "answer": "int32", "length": "int32", "sample_id": "int64"}
# One sample of COLUMNS in an MDS shard: the size of its one variable-size column (tokens), then the
# columns in sorted name order: answer, length, sample_id, tokens. The same head for one sample
# (struct, the loader) and for all samples of a shard at once (numpy, verify).
_SAMPLE_HEAD = struct.Struct("<Iiiq")
_HEAD = np.dtype([("n_tokens", "<u4"), ("answer", "<i4"), ("length", "<i4"), ("sample_id", "<i8")])


@dataclass(frozen=True)
class BuildResult:
    root: Path
    counts: dict[str, int]  # samples per split
    n_shards: int
    seconds: float
    rebuilt: bool  # False: an identical, verified build was already in place


def shard_root(remote: str) -> Path:
    """`data.remote` as an absolute filesystem path (plain path or file:// URL)."""
    url = urllib.parse.urlparse(remote)
    if url.scheme == "file":
        remote = url.path
    elif url.scheme:
        raise DataError(
            f"data.remote={remote!r}: building and verifying shards need a filesystem path "
            "(a shared mount); object-store URLs are not supported yet"
        )
    return Path(remote).expanduser().absolute()


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"{root}: shard directory does not exist (run `mythos data build`)")
    if not path.is_file():
        raise DataError(f"{path}: missing; the build is incomplete or this is not a shard directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}; rebuild the shards")
    return manifest


def check_spec(manifest: dict[str, Any], task: TaskConfig, root: Path) -> None:
    """Raise DataError listing every task field where the manifest differs from the config."""
    diffs = _diff(manifest.get("task", {}), task_spec(task), "task.")
    if diffs:
        raise DataError(
            f"{root / MANIFEST}: built for a different task than the config ({'; '.join(diffs)}); "
            "rebuild with `mythos data build`"
        )


def manifest_digest(root: Path) -> str:
    """sha256 of manifest.json: identifies the dataset's exact bytes (it lists every file's hash)."""
    return _sha256((root / MANIFEST).read_bytes())


def build(data: DataConfig, *, force: bool = False) -> BuildResult:
    """Write shards for train and every eval split under `data.remote`, in `data.build_workers` processes.

    Skips the work when a verified build of the same spec and shard size is already there (unless
    `force`). Same spec -> byte-identical files, whatever the number of build workers.
    """
    t0 = time.perf_counter()
    root = shard_root(data.remote)
    counts = split_counts(data.task)
    if root.exists() and not force:
        try:
            manifest = verify(data, deep=False)
        except DataError:
            manifest = None
        if manifest is not None and manifest["samples_per_shard"] == data.samples_per_shard:
            n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
            return BuildResult(root, counts, n_shards, time.perf_counter() - t0, rebuilt=False)
    if root.exists() and not (root / MANIFEST).is_file() and any(root.iterdir()):
        raise DataError(f"{root}: exists, is not empty and has no {MANIFEST}; not replacing it")

    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(root)
    tmp = root.parent / f".{root.name}.building-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        jobs = [
            (data.task, split, k, start, min(start + data.samples_per_shard, count), str(tmp / split))
            for split, count in counts.items()
            for k, start in enumerate(range(0, count, data.samples_per_shard))
        ]
        for split in counts:
            (tmp / split).mkdir(parents=True)
        if data.build_workers > 1 and len(jobs) > 1:
            # fork: workers inherit the imported modules (a spawned one would re-import torch and
            # streaming, seconds each); they only run numpy and file I/O.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(min(data.build_workers, len(jobs)), mp_context=ctx) as pool:
                infos = list(pool.map(_write_shard, *zip(*jobs)))
        else:
            infos = [_write_shard(*job) for job in jobs]
        for split in counts:
            shards = [info for job, info in zip(jobs, infos) if job[1] == split]
            _write_json(tmp / split / INDEX, {"shards": shards, "version": 2})
        write_manifest(tmp, data)
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        if root.exists():
            os.rename(root, old)
        os.rename(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(root, counts, len(jobs), time.perf_counter() - t0, rebuilt=True)


def write_manifest(root: Path, data: DataConfig) -> dict[str, Any]:
    """Record the task spec and the sha256 of every index and shard file now under `root`."""
    ids = first_sample_ids(data.task)
    splits = {}
    for split, (lo, hi) in split_lengths(data.task).items():
        index_path = root / split / INDEX
        index = _load_index(index_path)
        splits[split] = {
            "lengths": [lo, hi],
            "count": sum(s["samples"] for s in index["shards"]),
            "first_sample_id": ids[split],
            "index_sha256": _sha256(index_path.read_bytes()),
            "shards": {
                s["raw_data"]["basename"]: _sha256((root / split / s["raw_data"]["basename"]).read_bytes())
                for s in index["shards"]
            },
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": task_spec(data.task),
        "seed": data.task.seed,
        "eval_splits_heldout": VAL,
        "samples_per_shard": data.samples_per_shard,
        "columns": COLUMNS,
        "splits": splits,
    }
    _write_json(root / MANIFEST, manifest)
    return manifest


def verify(data: DataConfig, *, deep: bool = True) -> dict[str, Any]:
    """Check the shards under `data.remote` against the config; return the manifest or raise DataError.

    Training calls this before it starts. Shallow: manifest present and of this task spec, every split
    present and non-empty, index and shard files present with the recorded sha256. Deep (default):
    also decode every sample and check it (vocabulary, format, answer, length range, sample ids).
    """
    root = shard_root(data.remote)
    manifest = read_manifest(root)
    check_spec(manifest, data.task, root)
    ids = first_sample_ids(data.task)
    for split, expected in split_counts(data.task).items():
        entry = manifest.get("splits", {}).get(split)
        if not isinstance(entry, dict) or not {"index_sha256", "shards"} <= entry.keys():
            raise DataError(f"{root / MANIFEST}: split {split!r} missing or malformed")
        index_path = root / split / INDEX
        index = _load_index(index_path)
        if _sha256(index_path.read_bytes()) != entry["index_sha256"]:
            raise DataError(f"{index_path}: sha256 differs from the manifest (corrupt or replaced)")
        names = [s["raw_data"]["basename"] for s in index["shards"]]
        if names != list(entry["shards"]):
            raise DataError(f"{index_path}: lists shards {names}, the manifest {list(entry['shards'])}")
        n = sum(s["samples"] for s in index["shards"])
        if n == 0:
            raise DataError(f"{index_path}: split {split!r} has no samples (empty dataset)")
        if n != expected:
            raise DataError(f"{index_path}: {n} samples, the config expects {expected}")
        next_id = ids[split]
        for info in index["shards"]:
            path = root / split / info["raw_data"]["basename"]
            if not path.is_file():
                raise DataError(f"{path}: shard file missing")
            raw = path.read_bytes()
            if len(raw) != info["raw_data"]["bytes"] or _sha256(raw) != entry["shards"][path.name]:
                raise DataError(f"{path}: size or sha256 differs from the manifest (corrupt shard)")
            if deep:
                chains = _decode(raw, info, path)
                check_chains(chains, data.task, split, str(path))
                want = np.arange(next_id, next_id + len(chains))
                if not np.array_equal(chains.sample_ids, want):
                    raise DataError(f"{path}: sample ids are not {next_id}..{next_id + len(chains) - 1}")
            next_id += info["samples"]
    return manifest


# --------------------------------------------------------------------------- internals


def _write_shard(task: TaskConfig, split: str, k: int, start: int, stop: int, out: str) -> dict[str, Any]:
    """Write samples [start, stop) of `split` as out/shard.{k:05d}.mds; return its index entry.

    Module-level so a process pool can pickle it. Each shard gets its own MDSWriter in a private
    sub-directory (MDSWriter always names its first shard shard.00000.mds), then moves into place.
    """
    chains = generate(task, split, start, stop, heldout=None if split == TRAIN else VAL)
    check_chains(chains, task, split, f"generated {split}[{start}:{stop}]")  # never write bad data
    part = Path(out) / f".part-{k:05d}"
    with MDSWriter(out=str(part), columns=COLUMNS, size_limit=None) as writer:
        for i in range(len(chains)):
            writer.write(
                {
                    "tokens": chains.tokens(i).tobytes(),
                    "answer": int(chains.answers[i]),
                    "length": int(chains.lengths[i]),
                    "sample_id": int(chains.sample_ids[i]),
                }
            )
    (info,) = writer.shards
    name = f"shard.{k:05d}.mds"
    os.rename(part / info["raw_data"]["basename"], Path(out) / name)
    shutil.rmtree(part)
    info["raw_data"]["basename"] = name
    return info


def sample_at(shard: bytes | mmap.mmap, idx: int) -> dict[str, Any]:
    """Sample `idx` of an MDS shard file of COLUMNS (its bytes or an mmap of it), as streaming's reader
    returns it: tokens (bytes), answer, length, sample_id. ~1 µs where streaming's reader opens the
    file for every sample (~300 µs on a busy machine)."""
    begin, end = struct.unpack_from("<II", shard, 4 * (1 + idx))
    _, answer, length, sample_id = _SAMPLE_HEAD.unpack_from(shard, begin)
    return {
        "tokens": shard[begin + _SAMPLE_HEAD.size : end],
        "answer": answer,
        "length": length,
        "sample_id": sample_id,
    }


def _decode(raw: bytes, info: dict[str, Any], path: Path) -> Chains:
    """All samples of one MDS shard file (already in memory) -> Chains, without a per-sample loop.

    MDS joint shard: [n: u32][n+1 sample offsets: u32][config][samples], samples laid out as in
    `_SAMPLE_HEAD`. Decoding 200k samples one by one through streaming's reader takes ~10 s; this
    takes milliseconds. A test checks it against streaming's reader.
    """
    columns = dict(zip(info.get("column_names", []), info.get("column_encodings", [])))
    if columns != COLUMNS or info.get("format") != "mds" or info.get("compression"):
        raise DataError(
            f"{path}: columns {columns} / format {info.get('format')!r}, expected uncompressed mds {COLUMNS}"
        )
    buf = np.frombuffer(raw, np.uint8)
    try:
        n = int(np.frombuffer(raw, np.uint32, count=1)[0])
        offsets = np.frombuffer(raw, np.uint32, count=n + 1, offset=4).astype(np.int64)
    except ValueError as e:
        raise DataError(f"{path}: truncated shard ({e})") from e
    begin, end = offsets[:-1], offsets[1:]
    if n != info["samples"] or (
        n and (begin[0] < 4 * (n + 2) or (end < begin + _HEAD.itemsize).any() or end[-1] > len(raw))
    ):
        raise DataError(f"{path}: corrupt sample table ({n} samples, its index entry says {info['samples']})")
    head = buf[begin[:, None] + np.arange(_HEAD.itemsize)].view(_HEAD).ravel()
    n_tokens = head["n_tokens"].astype(np.int64)
    if not np.array_equal(begin + _HEAD.itemsize + n_tokens, end):
        raise DataError(f"{path}: sample sizes do not add up to the sample table (corrupt shard)")
    width = int(n_tokens.max(initial=0))
    take = np.minimum(begin[:, None] + _HEAD.itemsize + np.arange(width), len(buf) - 1)
    inputs = np.where(np.arange(width) < n_tokens[:, None], buf[take], PAD).astype(np.uint8)
    return Chains(
        inputs=inputs,
        lengths=head["length"].astype(np.int64),
        answers=head["answer"].astype(np.int64),
        sample_ids=head["sample_id"].astype(np.int64),
    )


def _load_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        index = json.loads(path.read_text())
        if index.get("version") != 2 or not isinstance(index.get("shards"), list):
            raise ValueError("expected a streaming index (version 2, 'shards' list)")
        for info in index["shards"]:
            if not (isinstance(info["raw_data"]["basename"], str) and isinstance(info["samples"], int)):
                raise ValueError(f"malformed shard entry {info}")
    except (ValueError, AttributeError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: corrupt index ({e})") from e
    return index


def _diff(have: dict[str, Any], want: dict[str, Any], prefix: str) -> list[str]:
    """Fields that differ between two nested dicts, as 'a.b: manifest=X, config=Y'."""
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: manifest={a!r}, config={b!r}")
    return out


def _remove_dead_builds(root: Path) -> None:
    """Delete temp dirs of builds on this host whose process is gone (killed builds)."""
    host = socket.gethostname()
    for d in root.parent.glob(f".{root.name}.building-{host}-*"):
        pid = d.name[len(f".{root.name}.building-{host}-") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=1) + "\n")
