"""Checkpoint helpers that need no process group: export format, errors, pointer, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mythos_dist.checkpoint import (
    META,
    CheckpointError,
    _prune,
    config_diff,
    latest_tag,
    load_exported,
    read_meta,
)
from mythos_dist.config import ModelConfig, to_dict
from mythos_dist.model import RDT

TINY = ModelConfig(dim=32, n_heads=2, n_kv_heads=1, n_experts=4, expert_dim=16, lora_rank=4)


def write_export(d: Path, model: RDT, cfg: ModelConfig) -> None:
    """The export layout written by checkpoint.export: experts split out by global id."""
    state = {}
    for k, v in model.state_dict().items():
        prefix, _, name = k.rpartition(".experts.")
        single = {"w_in_EDH": "w_in_DH", "w_out_EHD": "w_out_HD"}.get(name)
        if prefix and single:
            state.update({f"{prefix}.experts.{g}.{single}": v[g].contiguous() for g in range(v.shape[0])})
        else:
            state[k] = v.contiguous()
    d.mkdir(parents=True, exist_ok=True)
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"format": "mythos-rdt/1", "step": 1, "model": to_dict(cfg)}))


def test_export_roundtrip_gives_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RDT(TINY).eval()
    write_export(tmp_path, model, TINY)
    loaded = load_exported(tmp_path, TINY)
    ids = torch.randint(0, 10, (2, 7))
    torch.testing.assert_close(loaded(ids, 2).logits, model(ids, 2).logits, rtol=0, atol=0)


def test_load_exported_lists_config_mismatch(tmp_path: Path) -> None:
    write_export(tmp_path, RDT(TINY), TINY)
    other = ModelConfig(**{**to_dict(TINY), "dim": 64, "n_experts": 8})
    with pytest.raises(CheckpointError, match=r"model\.dim: checkpoint 32, this run 64") as e:
        load_exported(tmp_path, other)
    assert "model.n_experts" in str(e.value)


def test_load_exported_lists_missing_and_wrong_keys(tmp_path: Path) -> None:
    write_export(tmp_path, RDT(TINY), TINY)
    bigger = {**to_dict(TINY), "n_experts": 5}  # file has experts 0-3 only
    (tmp_path / "config.json").write_text(json.dumps({"format": "mythos-rdt/1", "model": bigger}))
    with pytest.raises(CheckpointError, match=r"missing: recurrent\.block\.ffn\.experts\.4\.w_in_DH"):
        load_exported(tmp_path)


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
