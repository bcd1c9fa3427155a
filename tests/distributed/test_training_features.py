"""The optional model paths on 2 real ranks (EP=2, ZeRO-2) against one process (EP=1, grad_accum=2,
the same samples per step): capacity_factor > 0 (dropped assignments), ACT halting, MLA attention,
truncated backprop through the loops and the aux load-balance loss, all in one model. Also
`tokens_per_s`: the valid tokens of every rank, not the padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.batch import ChainBatches
from mythos_dist.config import load_config
from mythos_dist.objective import valid_positions
from tests.distributed.test_training_distributed import TINY, assert_same_export, launch, summary

pytestmark = pytest.mark.distributed

FEATURES = (
    "model.capacity_factor=1.0",  # ceil(1.0 · N · k / E) per expert and call: some are dropped
    "model.act_enabled=true",
    "model.attn_type=mla",
    "model.kv_lora_rank=16",
    "model.q_lora_rank=16",
    "model.qk_rope_head_dim=8",
    "model.qk_nope_head_dim=8",
    "model.v_head_dim=8",
    "model.aux_loss_coef=0.01",
    "train.loops.n_loops=3",
    "train.loops.backprop_loops=2",  # gradients through the last 2 of 3 loops
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("features")
    return {
        "ep1": launch(tmp, "ep1", 1, *FEATURES, "parallel.ep_size=1", "train.grad_accum_steps=2"),
        "ep2": launch(tmp, "ep2", 2, *FEATURES, "parallel.ep_size=2", "parallel.zero_stage=2"),
    }


def test_ep2_matches_ep1_with_capacity_act_mla_truncated_backprop(runs: dict[str, Path]) -> None:
    ref = summary(runs["ep1"])
    assert len(ref["losses"]) == 4 and ref["losses"][-1] < ref["losses"][0]
    for rank in (0, 1):
        got = summary(runs["ep2"], rank)
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["grad_norms"], ref["grad_norms"], rtol=1e-4, atol=1e-6)
    assert_same_export(Path(ref["export"]), Path(summary(runs["ep2"])["export"]))


def test_tokens_per_s_counts_valid_tokens_of_every_rank(runs: dict[str, Path]) -> None:
    """4 steps x 2 micro batches of 8 chains: the tokens up to each EQ, summed over both ranks (the
    padding after EQ, which the model skips, does not count), the same for 1 and 2 processes."""
    cfg = load_config(None, [*TINY, *FEATURES])
    want = 0
    for rank in (0, 1):
        batches = ChainBatches(cfg.data.task, cfg.train.micro_batch_size, rank, 2)
        want += sum(int(valid_positions(batches.batch(k)["loss_mask"]).sum()) for k in range(4))
    padded = 4 * 2 * batches.batch(0)["input_ids"].numel()
    assert want < 0.9 * padded  # the padding is a real share here
    for out, rank in ((runs["ep1"], 0), (runs["ep2"], 0), (runs["ep2"], 1)):
        s = summary(out, rank)
        assert s["tokens"] == want
        assert s["tokens_per_s"] == pytest.approx(want / s["train_s"], rel=1e-9)
