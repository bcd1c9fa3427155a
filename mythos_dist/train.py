"""The training loop: `train(cfg) -> summary` (used by `mythos train` and experiment scripts).

Per optimizer step: the loop policy picks (n_loops, backprop_loops) from the step alone, every rank
runs grad_accum_steps micro batches through the DeepSpeed engine, the loss is the cross-entropy of
the logits at the EQ position against the answer (+ MoE aux loss + weighted ACT ponder cost), then
the router balancing biases move by the expert load summed over all ranks. Rank 0 prints progress
and owns the tracker.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.batch import Batch, chains_batch, crop_batch
from mythos_dist import checkpoint
from mythos_dist.comm import all_reduce_host
from mythos_dist.config import Config, TaskConfig, to_dict
from mythos_dist.model import LoopPolicy, attention_window
from mythos_dist.objective import (
    answer_forward,
    curriculum_cap,
    longest_counted,
    loss_and_metrics,
    valid_positions,
)
from mythos_dist.parallel import (
    build_engine,
    build_model,
    init_distributed,
    sync_router_biases,
)
from mythos_dist.resilience import PeerWatchdog, Preemption
from mythos_dist.stability import injection_radius


class BatchSource(Protocol):
    """What the loop needs from a loader: endless-or-epoch iteration and an exact resume state."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ChainBatches:
    """Micro batches straight from the task generator, no shards (tests, benchmarks, smoke runs).

    Rank r's k-th micro batch holds train samples [(k·W + r)·B, (k·W + r + 1)·B) mod n_train, so the
    samples of optimizer step s are the same for any world size W with W·grad_accum fixed.
    """

    def __init__(self, task: TaskConfig, micro_batch: int, rank: int, world_size: int):
        self.task, self.micro_batch, self.rank, self.world_size = task, micro_batch, rank, world_size
        self.consumed = 0

    def batch(self, k: int) -> Batch:
        from data_pipeline.digit_chain import TRAIN, Chains, generate

        n, b = self.task.n_train, self.micro_batch
        start = (k * self.world_size + self.rank) * b % n
        parts = [generate(self.task, TRAIN, start, min(n, start + b))]
        if start + b > n:  # wrap around the split
            parts.append(generate(self.task, TRAIN, 0, start + b - n))
        return chains_batch(
            Chains(*(np.concatenate(cols) for cols in zip(*(vars(p).values() for p in parts))))
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            k = self.consumed
            self.consumed += 1  # before yielding: state_dict() then counts the batch handed out
            yield self.batch(k)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])


@dataclass(frozen=True)
class StepInfo:
    """What `train(on_step=...)` receives after every optimizer step, on every rank."""

    step: int  # optimizer steps done, 1-based
    sample_ids: list[int]  # this rank's samples of the step, in order
    skipped: bool  # update dropped: non-finite loss or gradient on some rank (same on all ranks)
    loss: float  # mean over ranks and micro batches; nan on a skipped step
    model: torch.nn.Module  # this rank's (expert-parallel) module


class TrainingStopped(RuntimeError):
    """Training cannot usefully go on; the message names the cause and the checkpoint saved."""


def loop_divergence(delta_norms: list[float]) -> str | None:
    """Why the hidden state looks divergent across loops, or None.

    delta_norms: ‖h_t − h_{t−1}‖ per loop. Divergent: any is non-finite, or it grew over each of the
    last two loops (a contractive recurrence shrinks its steps; growth there means extrapolating to
    more loops will blow up).
    """
    shown = ", ".join(f"{d:.3g}" for d in delta_norms[-3:])
    if not all(math.isfinite(d) for d in delta_norms):
        return f"‖h_t − h_t-1‖ is non-finite (last loops: {shown})"
    last = delta_norms[-3:]
    if len(last) == 3 and last[0] < last[1] < last[2]:
        return f"‖h_t − h_t-1‖ grows over the last loops ({shown})"
    return None


def _any_nonfinite_grad(engine: Any) -> bool:
    """All-reduced, so every rank agrees (expert gradients are reduced within their group only)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    bad = torch.tensor([float(not all(torch.isfinite(g).all() for g in grads))])
    return bool(all_reduce_host(bad, dist.ReduceOp.MAX).item())


def _step_without_update(engine: Any) -> None:
    """engine.step() with the optimizer's update disabled, for ZeRO-0 in fp32, where DeepSpeed has
    no overflow check and would apply non-finite gradients. Gradients are zeroed first since its
    clipping still runs on them. Parameters and AdamW moments stay untouched, and the optimizer
    reports an overflow, so DeepSpeed leaves the LR schedule where it was and was_step_applied()
    is False: what ZeRO-1/2 do with a non-finite gradient."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    engine.optimizer.step = lambda *_, **__: None  # an instance attribute shadows the method
    engine.optimizer.overflow = True  # read by DeepSpeed's _take_model_step
    try:
        engine.step()
    finally:
        del engine.optimizer.step, engine.optimizer.overflow


def default_batches(cfg: Config) -> BatchSource:
    """The streaming loader over the MDS shards in data.remote (`mythos data build` writes them)."""
    from data_pipeline.digit_chain import TRAIN
    from data_pipeline.loader import make_loader

    return make_loader(cfg.data, TRAIN, cfg.train.micro_batch_size)


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(
    cfg: Config,
    batches: BatchSource | None = None,
    stop_after_steps: int | None = None,
    log: Any = print,
    on_step: Callable[[StepInfo], None] | None = None,
) -> dict[str, Any]:
    """Train (resuming from checkpoint.dir/latest when enabled); returns a summary on every rank:
    per-step losses, final loss/acc, tokens (valid ones, all ranks) and tokens/s over train_s at
    the last log step, checkpoint and export paths, MLflow run id, the
    DeepSpeed config used, and `model`, the trained (expert-parallel) module for in-process use.

    stop_after_steps: leave after that many steps of this call (after checkpointing), e.g. to fit
    a job into a scheduler's time limit; the schedule still spans train.steps.
    on_step: called after every optimizer step (before its checkpoint), e.g. to record sample ids.

    A step whose loss or gradient is non-finite on any rank is skipped on every rank (no update);
    after train.max_nonfinite_steps of them in a row the last good state is checkpointed and
    TrainingStopped is raised.
    """
    checkpoint.preflight(cfg)  # unwritable or full checkpoint dir: fail now, not after the first interval
    info = init_distributed(cfg.parallel.timeout_s)
    cfg.validate(world_size=info.world_size)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank0 = info.rank == 0
    say = log if rank0 else (lambda *_: None)
    t = cfg.train

    torch.manual_seed(t.seed)  # the same random stream (e.g. dropout) on every rank
    model = build_model(cfg, info.device)  # this rank's part only; init keyed by name and expert id
    engine, ds_cfg = build_engine(model, cfg, info.world_size, say)
    if batches is None:
        batches = default_batches(cfg)
    start, data_state = checkpoint.resume(engine, cfg) if cfg.checkpoint.resume else (0, None)
    if data_state is not None:
        batches.load_state_dict(data_state)
    if start:
        say(f"resumed from {cfg.checkpoint.dir} at step {start}")
    # Which checkpoints in checkpoint.dir are this run's (pruning, averaging): not another run's.
    lineage = checkpoint.run_lineage(cfg.checkpoint.dir) if start else checkpoint.new_lineage()

    from mythos_dist.tracking import Tracker, git_commit, start_node_metrics, training_tags

    tracker = Tracker(cfg.tracking, enabled_on_this_rank=rank0)
    hosts: list[str | None] = [None] * info.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    # Threads per rank: CPU reductions, hence the trajectory, depend on it (docs/results.md, recipe 5).
    run_info = {"world_size": info.world_size, "hosts": ",".join(sorted(set(map(str, hosts)))),
                "git_commit": git_commit(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    run_name = cfg.tracking.run_name or f"train-w{info.world_size}-ep{cfg.parallel.ep_size}"
    # One MLflow run per job: a resumed job continues the run its checkpoint names.
    resume_run_id = checkpoint.saved_run_id(cfg.checkpoint.dir) if start and rank0 else None
    tracker.start(run_name, {**to_dict(cfg), "run": run_info}, tags=training_tags(cfg, run_info),
                  resume_run_id=resume_run_id)  # fmt: skip
    tracker.log_data(cfg, ["train"], from_shards=not isinstance(batches, ChainBatches), context="training")
    node_metrics = start_node_metrics(cfg.tracking, tracker)
    policy = LoopPolicy(t.loops, t.seed, t.attn_windows)
    end = t.steps if stop_after_steps is None else min(t.steps, start + stop_after_steps)
    losses: list[float] = []
    grad_norms: list[float] = []  # global, before clipping
    stats_S = torch.zeros(5, dtype=torch.float64)
    skipped_steps: list[int] = []
    in_row = 0  # consecutive skipped steps
    diverging = False  # the hidden state looked divergent at the previous log step
    summary: dict[str, Any] = {"rank": info.rank, "start_step": start, "run_id": tracker.run_id}
    summary["ds_config"] = ds_cfg
    summary["model"] = engine.module
    if start:
        summary["checkpoint"] = str(checkpoint.latest_dir(cfg.checkpoint.dir))
    status = "FAILED"
    watchdog = PeerWatchdog(cfg.parallel.timeout_s, info.rank, [str(h) for h in hosts])
    preemption = Preemption()  # SIGTERM: checkpoint at the next step boundary, then stop
    try:
        it = iter(batches)
        t0, tokens = time.perf_counter(), 0  # this rank's valid tokens (up to each EQ), this launch
        engine.train()
        for step in range(start, end):
            choice = policy(step)
            longest = longest_counted(cfg, step, choice.n_loops, choice.attn_window)
            crop_to = curriculum_cap(cfg, step) if t.length_curriculum_mode == "crop" else None
            log_now = (step + 1) % t.log_every == 0 or step + 1 == end
            stats_S.zero_()  # loss sum, ce sum, correct, samples, non-finite losses (this rank)
            sample_ids: list[int] = []
            longest_chain = 0  # in this rank's micro batches of the step, after any cropping
            for micro in range(t.grad_accum_steps):
                watchdog.mark(step + 1, f"micro batch {micro + 1} (forward, backward, optimizer step)")
                last_micro = micro == t.grad_accum_steps - 1
                try:
                    batch = next(it)
                except StopIteration:  # epoch end of a finite loader
                    it = iter(batches)
                    batch = next(it)
                if crop_to is not None:  # per (seed, step, sample): the same on resume, at any world size
                    batch = crop_batch(batch, cfg.data.task, crop_to, t.seed, step)
                longest_chain = max(longest_chain, int(batch["length"].max()))
                batch = {k: v.to(info.device) for k, v in batch.items()}
                track = log_now and last_micro  # loop stability metrics from one micro batch
                with attention_window(engine.module, choice.attn_window):
                    out = answer_forward(
                        engine,
                        batch,
                        choice.n_loops,
                        backprop_loops=choice.backprop_loops,
                        track_deltas=track,
                    )
                loss, m = loss_and_metrics(out, batch, cfg.model, longest)
                finite = bool(torch.isfinite(loss))
                if not finite:
                    # Make every gradient of this step NaN: DeepSpeed's non-finite check on the
                    # global grad norm (identical on all ranks) then skips the update everywhere.
                    loss = loss * float("nan")
                engine.backward(loss)
                if last_micro and cfg.parallel.zero_stage == 0 and _any_nonfinite_grad(engine):
                    _step_without_update(engine)
                else:
                    engine.step()
                stats_S += torch.tensor(
                    [loss.item(), m["ce"].item(), m["correct"].item(), m["n"].item(), not finite]
                )
                sample_ids += batch["sample_id"].tolist()
                tokens += int(valid_positions(batch["loss_mask"]).sum())  # the padding is skipped
            watchdog.mark(step + 1, "router balancing and step statistics")
            skipped = not engine.was_step_applied()  # the same on every rank
            # A skipped step leaves the router biases too: the loads came from a non-finite forward.
            loads = sync_router_biases(engine.module, update=not skipped)
            global_S = all_reduce_host(stats_S)
            n_micro = t.grad_accum_steps * info.world_size
            step_loss = global_S[0].item() / n_micro
            losses.append(step_loss)
            norm = engine.get_global_grad_norm()  # None at ZeRO-0: a plain torch optimizer reports none
            grad_norms.append(math.nan if norm is None else float(norm))
            done = step + 1
            if skipped:
                skipped_steps.append(done)
                in_row += 1
                say(
                    f"step {done}: non-finite loss or gradient ({int(global_S[4].item())} of {n_micro} "
                    f"micro batches with a non-finite loss), update skipped ({in_row} in a row)"
                )
                tracker.log_metrics({"nonfinite_steps": len(skipped_steps)}, step=done)
            else:
                in_row = 0
            if log_now:
                elapsed = time.perf_counter() - t0
                all_tokens = int(all_reduce_host(torch.tensor([tokens], dtype=torch.float64)).item())
                tok_s = all_tokens / elapsed
                metrics = {
                    "loss": step_loss,
                    "ce": global_S[1].item() / n_micro,
                    "acc": global_S[2].item() / max(global_S[3].item(), 1.0),  # over the counted chains
                    "lr": engine.get_lr()[0],
                    "grad_norm": grad_norms[-1],
                    "tokens_per_s": tok_s,
                    "n_loops": choice.n_loops,
                    "rho_A": injection_radius(engine.module),
                    "nonfinite_steps": len(skipped_steps),
                }
                if longest is not None:  # the loss counted only chains this long (curriculum / reach)
                    metrics["longest_counted"] = longest
                if choice.attn_window is not None:
                    metrics["attn_window"] = choice.attn_window
                longest_S = all_reduce_host(torch.tensor([longest_chain]), dist.ReduceOp.MAX)
                metrics["longest_chain"] = longest_S.item()  # the longest chain trained on this step
                # ‖h_t − h_{t−1}‖ over the real tokens (up to EQ) of this rank's last micro batch
                valid_BT = valid_positions(batch["loss_mask"]).cpu()
                deltas = [(d.cpu() * valid_BT).square().sum().sqrt().item() for d in out.delta_norms]
                if len(deltas) >= 2:
                    metrics["loop/delta_last"] = deltas[-1]
                    metrics["loop/delta_growth"] = deltas[-1] / deltas[-2] if deltas[-2] > 0 else math.inf
                why = loop_divergence(deltas)
                metrics["loop/diverging"] = float(why is not None)
                if why is not None and not diverging:  # warn when it starts, not at every log step
                    say(f"warning: step {done}: hidden state diverging across loops: {why}")
                diverging = why is not None
                for i, load_E in enumerate(loads):  # expert load balance per MoE layer
                    load_E = load_E.double()
                    metrics[f"moe{i}/load_max_over_mean"] = (load_E.max() / load_E.mean()).item()
                    metrics[f"moe{i}/load_cv"] = (load_E.std() / load_E.mean()).item()
                eta = elapsed / (done - start) * (end - done)
                say(
                    f"step {done}/{t.steps}  loss {metrics['loss']:.4f}  acc {metrics['acc']:.3f}  "
                    f"lr {metrics['lr']:.2e}  gnorm {grad_norms[-1]:.3f}  loops {choice.n_loops}  tok/s {tok_s:,.0f}  eta {_fmt_time(eta)}"
                )
                tracker.log_metrics(metrics, step=done)
                summary.update(
                    final_acc=metrics["acc"], tokens_per_s=tok_s, tokens=all_tokens, train_s=elapsed
                )
            if on_step is not None:
                on_step(StepInfo(done, sample_ids, skipped, step_loss, engine.module))
            stop = in_row >= t.max_nonfinite_steps
            if preemption.requested():  # collective: the same answer on every rank
                summary["preempted"], end = True, done  # checkpointed below, then the loop ends
            if stop or done == end or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                watchdog.mark(done, "checkpoint save")
                state = batches.state_dict() if hasattr(batches, "state_dict") else None
                run_id = tracker.checkpoint_run_id()
                summary["checkpoint"] = str(checkpoint.save(engine, cfg, done, state, lineage, run_id))
            if stop:
                raise TrainingStopped(
                    f"steps {done - in_row + 1}-{done} all had a non-finite loss or gradient "
                    f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); their updates were skipped, so "
                    f"{summary['checkpoint']} holds the last good state (that of step {done - in_row}). "
                    "Lower train.lr or train.grad_clip, or check the data, then resume"
                )
            if summary.get("preempted"):
                say(f"step {done}: {preemption.received or 'SIGTERM on another rank'}: saved "
                    f"{summary['checkpoint']}, stopping; launch again to resume")  # fmt: skip
                break
        if end == t.steps:  # also when resumed at the end: the export follows the config
            summary["export"] = str(checkpoint.export_run(cfg))
            tracker.log_model(summary["export"], end)
        status = "FINISHED"
    except RuntimeError as e:  # a collective failed (a peer died or went silent): one clear line
        if (lost := watchdog.collective_failed(e)) is None:
            raise
        raise lost from e
    finally:
        watchdog.stop()
        preemption.close()
        if node_metrics is not None:
            node_metrics.finish()
        tracker.finish(status)
        summary["run_id"] = tracker.run_id  # the run may have come up after start() stopped waiting
    summary.update(
        end_step=end,
        losses=losses,
        grad_norms=grad_norms,
        skipped_steps=skipped_steps,
        final_loss=losses[-1] if losses else None,
        wall_s=time.perf_counter() - t0 if end > start else 0.0,
    )
    return summary
