"""Shard building and verification: reproducibility, atomicity, and every kind of bad input."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import shards
from data_pipeline.cli import add_data_commands
from data_pipeline.digit_chain import DataError, generate
from data_pipeline.streaming_compat import MDSWriter, streaming
from mythos_dist.config import Config, DataConfig


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def copy(cfg: Config, tmp_path: Path) -> Config:
    """A private copy of the session's shards, free to damage."""
    shutil.copytree(cfg.data.remote, tmp_path / "shards")
    cfg.data.remote = str(tmp_path / "shards")
    return cfg


def test_rebuild_reproduces_the_same_bytes_with_any_worker_count(cfg: Config, tmp_path: Path) -> None:
    cfg.data.remote, cfg.data.build_workers = str(tmp_path / "one"), 1
    one = shards.build(cfg.data)
    cfg.data.remote, cfg.data.build_workers = str(tmp_path / "three"), 3
    three = shards.build(cfg.data)
    assert one.rebuilt and three.rebuilt and one.n_shards == 8 + 3
    assert _files(one.root) == _files(three.root)  # manifest (with every sha256), indexes, shards
    again = shards.build(cfg.data)
    assert not again.rebuilt  # verified identical build in place: nothing to do
    forced = shards.build(cfg.data, force=True)
    assert forced.rebuilt and _files(forced.root) == _files(one.root)


def test_manifest_content(cfg: Config) -> None:
    manifest = shards.verify(cfg.data)
    assert manifest["format_version"] == shards.FORMAT_VERSION
    assert manifest["task"]["n_train"] == 2048 and manifest["seed"] == cfg.data.task.seed
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {
        "train": 2048,
        "id": 200,
        "ood1": 200,
        "ood2": 200,
    }
    assert all(len(h) == 64 for s in manifest["splits"].values() for h in s["shards"].values())
    # eval splits on disk are the validation set; the test set is never written beside train
    assert manifest["eval_splits_heldout"] == "val"
    assert (manifest["task"]["val_seed"], manifest["task"]["test_seed"]) == (1234, 4321)
    root = shards.shard_root(cfg.data.remote)
    entry = manifest["splits"]["ood1"]
    (name,) = entry["shards"]
    info = json.loads((root / "ood1" / "index.json").read_text())["shards"][0]
    on_disk = shards._decode((root / "ood1" / name).read_bytes(), info, root / "ood1" / name)
    val = generate(cfg.data.task, "ood1", heldout="val")
    assert np.array_equal(on_disk.sample_ids, val.sample_ids)
    assert np.array_equal(on_disk.inputs, val.inputs[:, : on_disk.inputs.shape[1]])


def test_interrupted_build_is_never_taken_for_complete(
    copy: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shards._write_shard

    def dies_at_third(*args):
        if args[2] == 2:
            raise KeyboardInterrupt  # like a kill mid-build
        return real(*args)

    monkeypatch.setattr(shards, "_write_shard", dies_at_third)
    copy.data.build_workers = 1
    before = _files(Path(copy.data.remote))
    with pytest.raises(KeyboardInterrupt):
        shards.build(copy.data, force=True)
    assert _files(Path(copy.data.remote)) == before  # the previous build is untouched
    shards.verify(copy.data)
    copy.data.remote = str(tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        shards.build(copy.data)
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]  # temp dirs removed
    with pytest.raises(DataError, match="does not exist"):
        shards.verify(copy.data)


def _flip_byte(root: Path, data: DataConfig) -> str:
    path = root / "train" / "shard.00001.mds"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return "train/shard.00001.mds: size or sha256 differs"


def _delete_shard(root: Path, data: DataConfig) -> str:
    (root / "ood1" / "shard.00000.mds").unlink()
    return "ood1/shard.00000.mds: shard file missing"


def _delete_manifest(root: Path, data: DataConfig) -> str:
    (root / "manifest.json").unlink()
    return "manifest.json: missing; the build is incomplete"


def _garble_index(root: Path, data: DataConfig) -> str:
    (root / "id" / "index.json").write_text("{not json")
    return "id/index.json: corrupt index"


def _empty_split(root: Path, data: DataConfig) -> str:
    (root / "ood2" / "index.json").write_text(json.dumps({"shards": [], "version": 2}))
    shards.write_manifest(root, data)  # re-sealed for the files now on disk, as a buggy builder would
    return "ood2/index.json: split 'ood2' has no samples (empty dataset)"


def _out_of_vocabulary(root: Path, data: DataConfig) -> str:
    """A shard whose bytes match a (re-written) manifest but holds token id 12."""
    chains = generate(data.task, "train", 512, 768)
    part = root / "part"
    with MDSWriter(out=str(part), columns=shards.COLUMNS, size_limit=None) as w:
        for i in range(len(chains)):
            tokens = chains.tokens(i).copy()
            tokens[0] = 12 if i == 40 else tokens[0]
            w.write(
                {
                    "tokens": tokens.tobytes(),
                    "answer": int(chains.answers[i]),
                    "length": int(chains.lengths[i]),
                    "sample_id": int(chains.sample_ids[i]),
                }
            )
    shutil.move(part / "shard.00000.mds", root / "train" / "shard.00002.mds")
    index = json.loads((root / "train" / "index.json").read_text())
    index["shards"][2]["raw_data"]["bytes"] = (root / "train" / "shard.00002.mds").stat().st_size
    (root / "train" / "index.json").write_text(json.dumps(index))
    shutil.rmtree(part)
    shards.write_manifest(root, data)
    return "train/shard.00002.mds: sample_id 552: token id 12 outside the vocabulary [0, 12)"


@pytest.mark.parametrize(
    "damage", [_flip_byte, _delete_shard, _delete_manifest, _garble_index, _empty_split, _out_of_vocabulary]
)
def test_verify_names_file_and_problem(copy: Config, damage: Callable[[Path, DataConfig], str]) -> None:
    expected = damage(Path(copy.data.remote), copy.data)
    with pytest.raises(DataError, match=re.escape(expected)):
        shards.verify(copy.data)


def test_manifest_mismatch_lists_differing_fields(cfg: Config) -> None:
    cfg.data.task.seed += 1
    cfg.data.task.eval_splits["ood2"] = (25, 40)
    with pytest.raises(DataError) as err:
        shards.verify(cfg.data)
    msg = str(err.value)
    assert "manifest.json: built for a different task" in msg
    assert "task.seed: manifest=1234, config=1235" in msg
    assert "task.eval_splits.ood2: manifest=[25, 48], config=[25, 40]" in msg
    assert "n_train" not in msg


def test_build_refuses_to_replace_a_foreign_directory(cfg: Config, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg.data.remote = str(tmp_path / "mine")
    with pytest.raises(DataError, match="not replacing it"):
        shards.build(cfg.data)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_own_decoders_match_streaming_reader(cfg: Config) -> None:
    root = shards.shard_root(cfg.data.remote)
    info = json.loads((root / "ood2" / "index.json").read_text())["shards"][0]
    path = root / "ood2" / info["raw_data"]["basename"]
    raw = path.read_bytes()
    chains = shards._decode(raw, info, path)
    reader = streaming.base.format.reader_from_json(str(root), "ood2", info)
    for i in range(0, info["samples"], 7):
        sample = reader.get_item(i)
        assert shards.sample_at(raw, i) == sample  # the loader's fast path
        assert sample["tokens"] == chains.tokens(i).tobytes()
        assert (sample["answer"], sample["length"], sample["sample_id"]) == (
            chains.answers[i],
            chains.lengths[i],
            chains.sample_ids[i],
        )
    assert np.array_equal(chains.sample_ids, np.arange(2448, 2648))  # ood2 follows train, id, ood1


def test_cli_build_and_verify(cfg: Config, small_overrides: list[str], tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  build_workers: 1\n")
    sets = [x for o in small_overrides for x in ("--set", o)]
    for argv in (
        ["data", "build", "--config", str(config), *sets],
        ["data", "verify", "--config", str(config), *sets],
    ):
        args = parser.parse_args(argv)
        assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "train=2,048" in out and "ok (every sample checked)" in out
    args = parser.parse_args(
        ["data", "verify", "--config", str(config), *sets, "--set", "data.task.modulus=5"]
    )
    with pytest.raises(DataError, match=re.escape("task.modulus: manifest=7, config=5")):
        args.handler(args)
