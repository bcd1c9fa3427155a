"""Try a digit-chain recipe in one process in minutes: no DeepSpeed, no shards, chains drawn in
memory. For choosing settings before a real `mythos experiment` run; not a substitute for it (the
loss, loop policy, counted chains, model and optimiser settings are the library's, the data order
and the distributed engine are not). It evaluates on the validation set (the first --n-eval
samples of each split, data.task.val_seed): a setting chosen here is a choice, and choices are
made on val. Its training chains are drawn freely, so they may contain held-out chains (short ones).

    OMP_NUM_THREADS=1 .venv/bin/python tools/explore_recipe.py --config configs/digit_chain_recipe3.yaml \\
        [--set model.attn_window=3 --set train.attn_windows=[2,3,4] ...] [--save state.pt]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from data_pipeline.batch import as_tensors, batch_arrays, chains_batch, crop_batch
from data_pipeline.digit_chain import EQ, PAD, generate
from mythos_dist.config import load_config
from mythos_dist.model import RDT, LoopPolicy, attention_window
from mythos_dist.objective import answer_forward, curriculum_cap, longest_counted, loss_and_metrics
from mythos_dist.optim import lr_schedule, param_groups


def chains(
    n: int, lo: int, hi: int, modulus: int, rng: np.random.Generator, first_id: int = 0
) -> dict[str, torch.Tensor]:
    length = rng.integers(lo, hi + 1, n)
    digits = rng.integers(0, 10, (n, hi + 1))
    inside = np.arange(hi + 1)[None] < length[:, None]
    inputs = np.where(inside, digits, PAD)
    inputs[np.arange(n), length] = EQ
    answer = np.where(inside, digits, 0).sum(1) % modulus
    return as_tensors(batch_arrays(inputs, length, answer, first_id + np.arange(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--save", default="", help="write the final state dict here")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    t, task = cfg.train, cfg.data.task
    torch.manual_seed(t.seed)
    model = RDT(cfg.model)
    opt = torch.optim.AdamW(param_groups(model), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    schedule = lr_schedule(opt, t)
    policy, rng = (
        LoopPolicy(t.loops, t.seed, t.attn_windows, t.attn_windows_until),
        np.random.default_rng(t.seed),
    )
    batch_size = t.micro_batch_size * t.grad_accum_steps
    t0, window = time.perf_counter(), []
    for step in range(t.steps):
        choice = policy(step)
        n_loops = choice.n_loops
        longest = longest_counted(cfg, step, n_loops, choice.attn_window)
        batch = chains(batch_size, *task.train_lengths, task.modulus, rng, step * batch_size)
        if t.length_curriculum_mode == "crop":  # as the trainer does
            batch = crop_batch(batch, task, curriculum_cap(cfg, step), t.seed, step)
        model.train()
        with attention_window(model, choice.attn_window):
            out = answer_forward(model, batch, n_loops)
        loss, m = loss_and_metrics(out, batch, cfg.model, longest)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        schedule.step()
        for moe in model.moe_layers():
            moe.router.update_bias()
        window.append((m["ce"].item(), m["correct"].item(), m["n"].item()))
        if (step + 1) % 100 == 0:
            ce, correct, n = np.array(window).T
            el = time.perf_counter() - t0
            print(f"step {step + 1}/{t.steps}  ce {ce.mean():.3f}  acc {correct.sum() / max(n.sum(), 1):.3f}  "
                  f"longest counted {longest}  {el:.0f} s  eta {el / (step + 1) * (t.steps - step - 1):.0f} s", flush=True)  # fmt: skip
            window = []
    if args.save:
        torch.save(model.state_dict(), args.save)
    model.eval()
    print("validation set")
    print("split  " + "".join(f"{f'@{n}':>7}" for n in cfg.eval.loops))
    with torch.no_grad():
        for split in cfg.eval.splits:
            batch = chains_batch(generate(task, split, 0, min(args.n_eval, task.n_eval), heldout="val"))
            out = answer_forward(model, batch, max(cfg.eval.loops), loops_out=cfg.eval.loops)
            acc = [
                (out.loop_logits[n].argmax(-1) == batch["answer"]).float().mean().item()
                for n in cfg.eval.loops
            ]
            print(f"{split:<7}" + "".join(f"{100 * a:7.1f}" for a in acc), flush=True)


if __name__ == "__main__":
    main()
