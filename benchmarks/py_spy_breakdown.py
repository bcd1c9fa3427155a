"""Shares of a rank's main-thread samples (py-spy `record -f raw --threads --idle`): per line of
Trainer.step, then inside the forward and the backward per innermost frame. Used by profile_ranks.sh."""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path


def short(frame: str) -> str:
    return re.sub(r" \(/.*?site-packages/", " (", frame)


def main_thread_stacks(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" in frames[0]:
            stacks.append((frames, int(n)))
    return stacks


def step_line(frames: list[str]) -> str:
    for i, f in enumerate(frames):
        if f.startswith("_run_steps"):
            return short(frames[i + 1]) if i + 1 < len(frames) else "_run_steps itself"
    return "outside the step loop"


def report(path: str, top: int = 8) -> None:
    by_line: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for frames, n in main_thread_stacks(path):
        by_line[step_line(frames)].append((frames, n))
    samples = {what: sum(n for _, n in stacks) for what, stacks in by_line.items()}
    total = sum(samples.values())
    print(f"== {path}: {total} samples of the main thread")
    for what, n in Counter(samples).most_common(top):
        print(f"{100 * n / total:5.1f}%  {what}")
        if 100 * n / total < 20:
            continue
        leaf = Counter()
        for frames, m in by_line[what]:
            leaf[short(frames[-1])] += m
        for inner, m in leaf.most_common(top):
            print(f"         {100 * m / n:5.1f}% of it  {inner}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        report(p)
