"""`mythos plan`: every scale config, refused layouts, the device-memory verdict, and activation
bytes counted on the meta device against a real CPU forward. (Parameter and optimizer bytes
against a real DeepSpeed engine: tests/distributed/test_scale.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mythos_dist.cli import main
from mythos_dist.config import ModelConfig, load_config
from mythos_dist.model import RDT, count_params
from mythos_dist.plan import parse_bytes, plan, saved_bytes

ROOT = Path(__file__).resolve().parents[2]
SCALES = sorted((ROOT / "configs" / "scales").glob("*.yaml"))


@pytest.mark.parametrize("path", SCALES, ids=lambda p: p.stem)
def test_every_scale_config_is_planned(path: Path) -> None:
    cfg = load_config(path, ["train.micro_batch_size=1"])
    world = 4 * cfg.parallel.ep_size
    p = plan(cfg, world, seq_len=1024)
    total = count_params(cfg.model).total
    assert p.dense_numel + p.local_expert_numel * cfg.parallel.ep_size == total
    assert p.params == 2 * (p.dense_numel + p.local_expert_numel)  # bf16 weights
    # ZeRO-2: the partition is the dense part over all ranks plus the experts over their 4 replicas
    want_part = p.dense_numel / world + p.local_expert_numel / 4
    assert abs(p.partition_numel - want_part) < 1e-3 * want_part
    assert p.master == 4 * p.partition_numel and p.moments == 8 * p.partition_numel
    assert 0 < p.activations_checkpointed < p.activations
    assert p.total(True) < p.total(False)


def test_expert_parallelism_shrinks_weights_not_optimizer_state() -> None:
    """A rank holds n_experts/ep_size experts' weights, but ZeRO already splits the expert
    optimizer state over the ranks holding the same experts: n_experts/world of it either way."""
    cfg = ROOT / "configs" / "scales" / "mythos_10b.yaml"
    ep4, ep16 = (plan(load_config(cfg, [f"parallel.ep_size={ep}"]), 32, seq_len=256) for ep in (4, 16))
    assert ep4.local_expert_numel == 4 * ep16.local_expert_numel
    assert ep4.params - ep16.params == 2 * (ep4.local_expert_numel - ep16.local_expert_numel)  # bf16
    assert abs(ep16.moments - ep4.moments) < 1e-4 * ep4.moments


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--world-size", "3"], r"parallel\.ep_size: world size 3 is not divisible by ep_size=8"),
        (["--world-size", "8", "--set", "parallel.ep_size=5"], r"n_experts=64 is not divisible by ep_size=5"),
        (["--world-size", "8", "--set", "parallel.zero_stage=3"], r"ZeRO stage 3 is not supported with MoE"),
        (["--world-size", "0"], r"--world-size must be ≥ 1, got 0"),
        (["--world-size", "8", "--device-mem", "lots"], r"--device-mem 'lots': expected a size"),
    ],
)
def test_impossible_layouts_are_refused_with_the_training_errors(
    argv: list[str], match: str, capsys: pytest.CaptureFixture
) -> None:
    rc = main(["plan", "--config", str(ROOT / "configs" / "scales" / "mythos_1b.yaml"), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(match, err), err


def test_device_memory_verdict_and_exit_status(capsys: pytest.CaptureFixture) -> None:
    base = ["plan", "--config", str(ROOT / "configs" / "scales" / "mythos_1b.yaml"), "--world-size", "8",
            "--set", "train.micro_batch_size=1", "--seq-len", "1024"]  # fmt: skip
    assert main([*base, "--device-mem", "80GB"]) == 0
    assert "fits with train.activation_checkpointing=none" in capsys.readouterr().out
    assert main([*base, "--device-mem", "2GB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_parse_bytes() -> None:
    assert parse_bytes("80GB") == parse_bytes("80 GiB") == 80 * 2**30
    assert parse_bytes("1.5T") == int(1.5 * 2**40) and parse_bytes("512MB") == 512 * 2**20


# the two-matmul attention (short; below 16 keys its softmax rows are padded, model/softmax.py) and
# SDPA's fused kernel; every case to the byte
@pytest.mark.parametrize("seq_len", [12, 16, 80])
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_meta_activation_count_equals_a_real_cpu_forward(seq_len: int, attn_type: str) -> None:
    cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_experts=4, expert_dim=32, max_seq_len=128,
                      attn_type=attn_type, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                      qk_nope_head_dim=8, v_head_dim=8, act_enabled=True)  # fmt: skip
    model = RDT(cfg).train()
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:  # weights are saved too, but resident anyway
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 12, (3, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, 3, logits_at_B=torch.full((3,), seq_len - 1))
    real = sum(storages.values())
    del out  # kept until counted: no saved storage is freed and its address reused
    planned = saved_bytes(cfg, 3, seq_len, 3, device_type="cpu")
    assert planned == real, (planned, real)
