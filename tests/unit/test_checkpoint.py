"""Checkpoint helpers that need no process group: export format, errors, pointer, pruning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mythos_dist.checkpoint import META, _prune, export, latest_tag, read_meta
from mythos_dist.config import ModelConfig, config_diff, to_dict
from mythos_dist.export import exported_steps, load_exported
from mythos_dist.safe_io import CheckpointError


@pytest.mark.distributed
def test_export_roundtrip_gives_same_logits(trained_checkpoint: dict, tmp_path: Path) -> None:
    """DeepSpeed checkpoint of a real run -> checkpoint.export -> load_exported: the plain model
    gives the logits the trained (DeepSpeed-wrapped) module gave."""
    out = export(trained_checkpoint["ckpt"], tmp_path / "export")
    loaded = load_exported(out, trained_checkpoint["model_cfg"])
    with torch.no_grad():
        logits = loaded(trained_checkpoint["input_ids"], 2).logits
    torch.testing.assert_close(logits, trained_checkpoint["logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
def test_load_exported_lists_config_mismatch(trained_checkpoint: dict, tmp_path: Path) -> None:
    out = export(trained_checkpoint["ckpt"], tmp_path / "export")
    other = ModelConfig(**{**to_dict(trained_checkpoint["model_cfg"]), "dim": 64, "n_experts": 8})
    with pytest.raises(CheckpointError, match=r"model\.dim: checkpoint 32, this run 64") as e:
        load_exported(out, other)
    assert "model.n_experts" in str(e.value)


@pytest.mark.distributed
def test_load_exported_lists_missing_and_wrong_keys(trained_checkpoint: dict, tmp_path: Path) -> None:
    out = export(trained_checkpoint["ckpt"], tmp_path / "export")
    saved = json.loads((out / "config.json").read_text())
    saved["model"]["n_experts"] = 5  # the file has experts 0-3 only
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"missing: recurrent\.block\.ffn\.experts\.4\.w_in_DH"):
        load_exported(out)


@pytest.mark.distributed
def test_corrupt_export_config_names_the_file(trained_checkpoint: dict, tmp_path: Path) -> None:
    out = export(trained_checkpoint["ckpt"], tmp_path / "export")
    (out / "config.json").write_text('{"format": "mythos-rdt/1", "mod')  # torn
    with pytest.raises(CheckpointError, match=re.escape(f"{out / 'config.json'}: not valid JSON")):
        load_exported(out)
    (out / "config.json").write_text('{"format": "mythos-rdt/1"}')
    with pytest.raises(CheckpointError, match=r"config\.json: no 'model' section"):
        load_exported(out)
    with pytest.raises(CheckpointError, match=r"config\.json: no valid 'step'"):
        exported_steps(out)


def test_missing_and_partial_checkpoints_are_clear(tmp_path: Path) -> None:
    assert latest_tag(tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "step_00000002")
    (tmp_path / "step_00000002").mkdir()
    with pytest.raises(CheckpointError, match="partial"):
        read_meta(tmp_path / "step_00000002")
    with pytest.raises(CheckpointError, match="not an export directory"):
        load_exported(tmp_path)


def test_prune_keeps_last_k(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        (tmp_path / f"step_{s:08d}").mkdir()
        (tmp_path / f"step_{s:08d}" / META).write_text("{}")
    (tmp_path / "latest").write_text("step_00000008")
    _prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000006", "step_00000008"]


def test_prune_counts_only_complete_checkpoints_up_to_latest(tmp_path: Path) -> None:
    """Tags past `latest` (an earlier, longer run) are kept and not counted; partial ones are not
    counted either, and those before `latest` (killed saves) are removed."""
    for s in (2, 4, 6, 8):
        (tmp_path / f"step_{s:08d}").mkdir()
        (tmp_path / f"step_{s:08d}" / META).write_text("{}")
    (tmp_path / "step_00000003").mkdir()  # partial
    (tmp_path / "latest").write_text("step_00000004")
    _prune(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000004",
        "step_00000006",
        "step_00000008",
    ]


def test_config_diff_names_each_key() -> None:
    assert config_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}, "model") == [
        "model.b: checkpoint 2, this run 3",
        "model.c: checkpoint '<absent>', this run 4",
    ]
