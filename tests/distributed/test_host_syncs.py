"""Device-to-host synchronisations per training micro batch (forward + backward), counted on CPU
by what each op is (tests/host_syncs.py): they must not grow with the loop count where routing
allows it; the exact all-to-all dispatcher reads its split sizes once per MoE layer use, the padded
one once per micro batch (the ranks' token counts), with bit-identical losses and gradients."""

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.batch import chains_batch
from data_pipeline.digit_chain import TRAIN, generate
from mythos_dist.config import ModelConfig, TaskConfig
from mythos_dist.model import RDT
from mythos_dist.model import moe as moe_mod
from mythos_dist.objective import answer_forward, loss_and_metrics
from tests.host_syncs import HostSyncCounter
from tests.multiproc import REPO, run, torchrun, worker_env

# The mask checks and the valid-row indices of the forward: once per micro batch.
PER_MICRO_BATCH = 2


def syncs_per_step(n_loops: int) -> HostSyncCounter:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=12, dim=32, n_heads=2, n_kv_heads=1, max_seq_len=64, n_experts=4, n_experts_per_tok=2, expert_dim=16
    )  # fmt: skip
    model = RDT(cfg)
    batch = chains_batch(generate(TaskConfig(n_train=64, n_eval=10), TRAIN, 0, 16))
    with HostSyncCounter() as c:
        loss, _ = loss_and_metrics(answer_forward(model, batch, n_loops=n_loops), batch, cfg)
        loss.backward()
    return c


def test_counter_sees_what_syncs() -> None:
    x = torch.tensor([3, 0, 2])
    with HostSyncCounter() as c:
        x.tolist(), x[0].item(), bool(x[1]), x.nonzero(), x[x > 0], torch.repeat_interleave(x, x)
        torch.bincount(x)
        torch.repeat_interleave(x, x, output_size=5), x.sort(), torch.cumsum(x, 0)  # no sync
    assert c.total == 7, c.by_site


def test_one_process_step_syncs_do_not_grow_with_loops() -> None:
    counts = {n: syncs_per_step(n) for n in (1, 4)}
    assert counts[1].total == counts[4].total == PER_MICRO_BATCH, {n: c.by_site for n, c in counts.items()}


def test_per_expert_fallback_reads_its_counts_once_per_moe_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where F.grouped_mm cannot run (e.g. fp32 on CUDA) the two expert products share one read.
    monkeypatch.setattr(moe_mod, "_grouped_mm_works", lambda *a: False)
    counts = {n: syncs_per_step(n).total for n in (1, 4)}
    assert counts == {1: PER_MICRO_BATCH + 1, 4: PER_MICRO_BATCH + 4}


def _ep_step(tmp_path: Path, dispatch: str) -> tuple[list[dict], list[dict]]:
    # 2 real gloo ranks, 2 of 4 experts each, every rank its own micro batch (uneven splits).
    out = tmp_path / dispatch
    worker = REPO / "tests" / "distributed" / "_sync_worker.py"
    run(
        torchrun(2, worker, str(out), dispatch, "2", "4"),
        worker_env(tmp_path),
        tmp_path / f"{dispatch}.log",
        timeout=120,
    )
    counts = [json.loads((out / f"syncs_rank{r}.json").read_text()) for r in (0, 1)]
    return counts, [torch.load(out / f"grads_rank{r}.pt") for r in (0, 1)]


def test_expert_parallel_step_syncs_exact_per_moe_use_padded_per_micro_batch(tmp_path: Path) -> None:
    exact, exact_grads = _ep_step(tmp_path, "exact")
    for rank, counts in enumerate(exact):
        for loops, c in counts.items():
            assert c["total"] == PER_MICRO_BATCH + int(loops), (rank, counts)
            dispatch = sum(v for k, v in c["by_site"].items() if k.startswith("dispatch.py"))
            assert dispatch == int(loops), c["by_site"]
    padded, padded_grads = _ep_step(tmp_path, "padded")
    for rank, counts in enumerate(padded):  # one more per micro batch (the token counts), none per loop
        assert {loops: c["total"] for loops, c in counts.items()} == {"2": PER_MICRO_BATCH + 1, "4": PER_MICRO_BATCH + 1}, (
            rank, counts
        )  # fmt: skip
    # The same rows in the same order through the same products: bit-identical, not just close.
    for rank in (0, 1):
        for loops in (2, 4):
            e, p = exact_grads[rank][loops], padded_grads[rank][loops]
            assert e.keys() == p.keys()
            for name in e:
                assert torch.equal(e[name], p[name]), (rank, loops, name)
