"""Training: `train(cfg) -> TrainResult`, a small `Trainer` whose `step()` returns a `StepResult`.

Per optimizer step: the loop policy picks (n_loops, backprop_loops) from the step alone, every rank
runs grad_accum_steps micro batches through the DeepSpeed engine, the loss is the cross-entropy of
the logits at the EQ position against the answer (+ MoE aux loss + weighted ACT ponder cost), then
the router balancing biases move by the expert load summed over all ranks. `train` consumes each
step's result: the metrics processor (mythos_dist.train_metrics, rank 0 prints and tracks), the
checkpoint policy and the stop policy (too many non-finite steps in a row, preemption, the end).
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.batch import BatchSource, ChainBatches, crop_batch
from mythos_dist import checkpoint
from mythos_dist.comm import all_reduce_host
from mythos_dist.config import Config, to_dict
from mythos_dist.ep_transport import describe
from mythos_dist.model import LoopChoice, LoopPolicy, attention_window
from mythos_dist.objective import (
    answer_forward,
    curriculum_cap,
    longest_counted,
    loss_and_metrics,
    valid_positions,
)
from mythos_dist.parallel import DistInfo, build_engine, build_model, init_distributed, sync_router_biases
from mythos_dist.resilience import PeerWatchdog, Preemption
from mythos_dist.tracking import Tracker
from mythos_dist.train_metrics import StepMetrics


class TrainingStopped(RuntimeError):
    """Training cannot usefully go on; the message names the cause and the checkpoint saved."""


@dataclass
class RunContext:
    """Who this rank is and the job's tracker: made once per job and handed to every stage."""

    info: DistInfo
    hosts: list[str]  # the host of every rank
    tracker: Tracker  # live on rank 0 only
    say: Callable[..., None]  # print on rank 0, nothing elsewhere

    @classmethod
    def join(cls, cfg: Config, log: Callable[..., None] = print) -> RunContext:
        info = init_distributed(cfg.parallel.timeout_s)
        cfg.validate(world_size=info.world_size)
        hosts: list[Any] = [None] * info.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        tracker = Tracker(cfg.tracking, enabled_on_this_rank=info.rank == 0)
        return cls(info, [str(h) for h in hosts], tracker, log if info.rank == 0 else lambda *_: None)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as every rank saw it (the same on every rank unless marked)."""

    step: int  # optimizer steps done, 1-based
    choice: LoopChoice  # loops, backprop loops and attention window of the step
    longest: int | None  # the loss counted only chains up to this long (curriculum / reach)
    skipped: bool  # update dropped: non-finite loss or gradient on some rank
    n_nonfinite: int  # micro batches (all ranks) with a non-finite loss
    loss: float  # mean over ranks and micro batches; nan on a skipped step
    ce: float
    acc: float  # over the counted chains
    grad_norm: float  # global, before clipping; nan at ZeRO-0
    loads: list[torch.Tensor]  # expert load per MoE layer, summed over ranks
    sample_ids: list[int]  # this rank's samples, in order
    tokens: int  # this rank's valid tokens (up to each EQ)
    longest_chain: int  # this rank's longest chain, after any cropping
    deltas: list[float] | None  # this rank's ‖h_t − h_{t−1}‖ per loop on its last micro batch (tracked steps)


@dataclass
class TrainResult:
    """What `train` returns on every rank."""

    rank: int
    start_step: int
    end_step: int
    run_id: str | None
    ds_config: dict[str, Any]
    model: nn.Module  # this rank's trained (expert-parallel) module, for in-process use
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    checkpoint: str | None = None
    export: str | None = None  # when the run reached train.steps
    preempted: bool = False
    final_acc: float | None = None  # at the last log step, with the throughput below
    tokens: int | None = None  # valid tokens of all ranks, this launch
    tokens_per_s: float | None = None
    train_s: float | None = None
    wall_s: float = 0.0

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


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


class Trainer:
    """This rank's model, DeepSpeed engine and batches, resumed from checkpoint.dir/latest."""

    def __init__(self, cfg: Config, ctx: RunContext, batches: BatchSource | None = None):
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.train.seed)  # the same random stream (e.g. dropout) on every rank
        model = build_model(cfg, ctx.info.device)  # this rank's part only; init keyed by name and expert id
        if cfg.parallel.ep_size > 1:
            ctx.say(f"expert parallelism: EP={cfg.parallel.ep_size}, all-to-all over {describe(model)}")
        self.engine, self.ds_config = build_engine(model, cfg, ctx.info.world_size, ctx.say)
        self.batches = default_batches(cfg) if batches is None else batches
        self.start, data_state = checkpoint.resume(self.engine, cfg) if cfg.checkpoint.resume else (0, None)
        if data_state is not None:
            self.batches.load_state_dict(data_state)
        # Which checkpoints in checkpoint.dir are this run's (pruning, averaging): not another run's.
        self.lineage = checkpoint.run_lineage(cfg.checkpoint.dir) if self.start else checkpoint.new_lineage()
        self.policy = LoopPolicy(
            cfg.train.loops, cfg.train.seed, cfg.train.attn_windows, cfg.train.attn_windows_until
        )
        self._it = iter(self.batches)
        self.watchdog: PeerWatchdog  # started by `start_watchdog`, once tracking is up

    def start_watchdog(self) -> None:
        """Heartbeats to the peers from here on: a silent peer ends this rank (mythos_dist.resilience)."""
        self.watchdog = PeerWatchdog(self.cfg.parallel.timeout_s, self.ctx.info.rank, self.ctx.hosts)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:  # epoch end of a finite loader
            self._it = iter(self.batches)
            return next(self._it)

    def step(self, step: int, track: bool) -> StepResult:
        """Optimizer step `step` (0-based); track: measure the loop deltas (a log step)."""
        cfg, t, engine = self.cfg, self.cfg.train, self.engine
        choice = self.policy(step)
        longest = longest_counted(cfg, step, choice.n_loops, choice.attn_window)
        crop_to = curriculum_cap(cfg, step) if t.length_curriculum_mode == "crop" else None
        stats_S = torch.zeros(5, dtype=torch.float64)  # loss sum, ce sum, correct, samples, non-finite losses
        sample_ids: list[int] = []
        tokens = longest_chain = 0
        deltas = None
        for micro in range(t.grad_accum_steps):
            self.watchdog.mark(step + 1, f"micro batch {micro + 1} (forward, backward, optimizer step)")
            last_micro = micro == t.grad_accum_steps - 1
            batch = self._next_batch()
            if crop_to is not None:  # per (seed, step, sample): the same on resume, at any world size
                batch = crop_batch(batch, cfg.data.task, crop_to, t.seed, step)
            longest_chain = max(longest_chain, int(batch["length"].max()))
            batch = {k: v.to(self.ctx.info.device) for k, v in batch.items()}
            with attention_window(engine.module, choice.attn_window):
                out = answer_forward(
                    engine, batch, choice.n_loops, backprop_loops=choice.backprop_loops,
                    track_deltas=track and last_micro,
                )  # fmt: skip
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
            valid_BT = valid_positions(batch["loss_mask"])
            tokens += int(valid_BT.sum())  # the padding is skipped
            if track and last_micro:  # over the real tokens (up to EQ)
                valid_cpu_BT = valid_BT.cpu()  # one copy, not one per loop
                deltas = [(d.cpu() * valid_cpu_BT).square().sum().sqrt().item() for d in out.delta_norms]
        self.watchdog.mark(step + 1, "router balancing and step statistics")
        skipped = not engine.was_step_applied()  # the same on every rank
        # A skipped step leaves the router biases too: the loads came from a non-finite forward.
        loads = sync_router_biases(engine.module, update=not skipped)
        global_S = all_reduce_host(stats_S)
        n_micro = t.grad_accum_steps * self.ctx.info.world_size
        norm = engine.get_global_grad_norm()  # None at ZeRO-0: a plain torch optimizer reports none
        return StepResult(
            step=step + 1, choice=choice, longest=longest, skipped=skipped,
            n_nonfinite=int(global_S[4].item()), loss=global_S[0].item() / n_micro,
            ce=global_S[1].item() / n_micro, acc=global_S[2].item() / max(global_S[3].item(), 1.0),
            grad_norm=math.nan if norm is None else float(norm), loads=loads, sample_ids=sample_ids,
            tokens=tokens, longest_chain=longest_chain, deltas=deltas,
        )  # fmt: skip

    def save(self, done: int) -> Path:
        self.watchdog.mark(done, "checkpoint save")
        state = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        run_id = self.ctx.tracker.checkpoint_run_id()
        return checkpoint.save(self.engine, self.cfg, done, state, self.lineage, run_id)


def _start_tracking(cfg: Config, ctx: RunContext, trainer: Trainer) -> None:
    from mythos_dist.tracking import git_commit, training_tags

    w = ctx.info.world_size
    # Threads per rank: CPU reductions, hence the trajectory, depend on it (docs/results.md, recipe 5).
    run_info = {"world_size": w, "hosts": ",".join(sorted(set(ctx.hosts))), "git_commit": git_commit(),
                "torch_threads": torch.get_num_threads()}  # fmt: skip
    # One MLflow run per job: a resumed job continues the run its checkpoint names.
    resume = checkpoint.saved_run_id(cfg.checkpoint.dir) if trainer.start and ctx.info.rank == 0 else None
    name = cfg.tracking.run_name or f"train-w{w}-ep{cfg.parallel.ep_size}"
    tags = training_tags(cfg, run_info)
    ctx.tracker.start(name, {**to_dict(cfg), "run": run_info}, tags=tags, resume_run_id=resume)
    from_shards = not isinstance(trainer.batches, ChainBatches)
    ctx.tracker.log_data(cfg, ["train"], from_shards=from_shards, context="training")


def train(
    cfg: Config,
    batches: BatchSource | None = None,
    stop_after_steps: int | None = None,
    log: Any = print,
    on_step: Callable[[StepResult, nn.Module], None] | None = None,
) -> TrainResult:
    """Train (resuming from checkpoint.dir/latest when enabled); returns a `TrainResult` on every rank.

    stop_after_steps: leave after that many steps of this call (after checkpointing), e.g. to fit
    a job into a scheduler's time limit; the schedule still spans train.steps.
    on_step: called after every optimizer step (before its checkpoint) with its result and this
    rank's module, e.g. to record sample ids.

    A step whose loss or gradient is non-finite on any rank is skipped on every rank (no update);
    after train.max_nonfinite_steps of them in a row the last good state is checkpointed and
    TrainingStopped is raised.
    """
    from mythos_dist.tracking import start_node_metrics

    checkpoint.preflight(cfg)  # unwritable or full checkpoint dir: fail now, not after the first interval
    ctx = RunContext.join(cfg, log)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    trainer = Trainer(cfg, ctx, batches)
    t, start = cfg.train, trainer.start
    if start:
        ctx.say(f"resumed from {cfg.checkpoint.dir} at step {start}")
    _start_tracking(cfg, ctx, trainer)
    node_metrics = start_node_metrics(cfg.tracking, ctx.tracker)
    end = t.steps if stop_after_steps is None else min(t.steps, start + stop_after_steps)
    result = TrainResult(
        ctx.info.rank, start, end, ctx.tracker.run_id, trainer.ds_config, trainer.engine.module
    )
    if start:
        result.checkpoint = str(checkpoint.latest_dir(cfg.checkpoint.dir))
    metrics = StepMetrics(t, ctx.tracker, ctx.say, start, end)
    status = "FAILED"
    trainer.start_watchdog()
    preemption = Preemption()  # SIGTERM: checkpoint at the next step boundary, then stop
    try:
        _run_steps(cfg, trainer, result, metrics, preemption, on_step)
        end = result.end_step  # earlier when preempted
        if end == t.steps:  # also when resumed at the end: the export follows the config
            result.export = str(checkpoint.export_run(cfg))
            ctx.tracker.log_model(result.export, end)
        status = "FINISHED"
    except RuntimeError as e:  # a collective failed (a peer died or went silent): one clear line
        if (lost := trainer.watchdog.collective_failed(e)) is None:
            raise
        raise lost from e
    finally:
        trainer.watchdog.stop()
        preemption.close()
        if node_metrics is not None:
            node_metrics.finish()
        ctx.tracker.finish(status)
        result.run_id = ctx.tracker.run_id  # the run may have come up after start() stopped waiting
    result.wall_s = metrics.elapsed() if end > start else 0.0
    return result


def _run_steps(
    cfg: Config,
    trainer: Trainer,
    result: TrainResult,
    metrics: StepMetrics,
    preemption: Preemption,
    on_step: Callable[[StepResult, nn.Module], None] | None,
) -> None:
    """Steps result.start_step..result.end_step, each consumed by the metrics, the checkpoint
    policy and the stop policy; a preempted run ends early (result.end_step = its last step)."""
    t, end = cfg.train, result.end_step
    in_row = 0  # consecutive skipped steps
    trainer.engine.train()
    for step in range(result.start_step, end):
        log_now = (step + 1) % t.log_every == 0 or step + 1 == end
        res = trainer.step(step, track=log_now)
        result.losses.append(res.loss)
        result.grad_norms.append(res.grad_norm)
        in_row = in_row + 1 if res.skipped else 0
        if res.skipped:
            result.skipped_steps.append(res.step)
        metrics.record(res, in_row, len(result.skipped_steps))
        if log_now:
            throughput = metrics.log(res, trainer.engine, len(result.skipped_steps))
            result.final_acc, result.tokens, result.tokens_per_s, result.train_s = res.acc, *throughput
        if on_step is not None:
            on_step(res, trainer.engine.module)
        done, stop = res.step, in_row >= t.max_nonfinite_steps
        if preemption.requested():  # collective: the same answer on every rank
            result.preempted, result.end_step = True, done  # checkpointed below, then the loop ends
        if stop or done == result.end_step or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            result.checkpoint = str(trainer.save(done))
        if stop:
            raise TrainingStopped(
                f"steps {done - in_row + 1}-{done} all had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); their updates were skipped, so "
                f"{result.checkpoint} holds the last good state (that of step {done - in_row}). "
                "Lower train.lr or train.grad_clip, or check the data, then resume"
            )
        if result.preempted:
            trainer.ctx.say(f"step {done}: {preemption.received or 'SIGTERM on another rank'}: saved "
                            f"{result.checkpoint}, stopping; launch again to resume")  # fmt: skip
            return
