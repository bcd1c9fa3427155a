"""`mythos` with bad arguments or paths: usage or one line on stderr, exit code, never a traceback.
All commands run concurrently as real `python -m mythos_dist.cli` processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.multiproc import REPO, worker_env

pytestmark = pytest.mark.distributed

# name -> (arguments, expected exit code, a line that stderr must contain); {t}: the test's tmp dir
CASES = {
    "train_without_config": (
        ["train"],
        2,
        "mythos train: error: the following arguments are required: --config",
    ),
    "train_missing_config_file": (
        ["train", "--config", "{t}/nope.yaml"],
        2,
        "mythos train: error: config file not found: {t}/nope.yaml",
    ),
    "eval_missing_checkpoint": (
        ["eval", "--config", "{t}/c.yaml", "--checkpoint", "/nonexistent"],
        2,
        "mythos eval: error: checkpoint /nonexistent does not exist",
    ),
    "data_verify_missing_shards": (
        ["data", "verify", "--config", "{t}/c.yaml", "--set", "data.remote={t}/no_shards"],
        2,
        "mythos data: error: {t}/no_shards: shard directory does not exist (run `mythos data build`)",
    ),
    # malformed files we read name themselves
    "eval_corrupt_export_config": (
        ["eval", "--config", "{t}/c.yaml", "--checkpoint", "{t}/bad_export"],
        2,
        "mythos eval: error: {t}/bad_export/config.json: not valid JSON (Expecting value: line 1 column 1",
    ),
    "eval_corrupt_checkpoint_meta": (
        ["eval", "--config", "{t}/c.yaml", "--checkpoint", "{t}/bad_meta"],
        2,
        "mythos eval: error: {t}/bad_meta/step_00000002/mythos_meta.json: not valid JSON",
    ),
    "eval_corrupt_latest": (
        ["eval", "--config", "{t}/c.yaml", "--checkpoint", "{t}/bad_latest"],
        2,
        "mythos eval: error: {t}/bad_latest/latest: names '\\x00\\x17', not a step_* tag; the file is corrupt",
    ),
    "report_corrupt_summary": (
        ["report", "{t}/bad_eval", "--out", "{t}/report"],
        2,
        "mythos report: error: {t}/bad_eval/summary.json: expected a JSON object, got list",
    ),
    "train_unwritable_checkpoint_dir": (
        ["train", "--config", "{t}/c.yaml", "--set", "checkpoint.dir={t}/c.yaml/ckpt"],
        1,
        "mythos train: error: checkpoint.dir={t}/c.yaml/ckpt is not writable: [Errno 20] Not a directory",
    ),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    t = tmp_path_factory.mktemp("cli")
    (t / "c.yaml").write_text("tracking:\n  enabled: false\n")
    (t / "bad_export").mkdir()
    (t / "bad_export" / "config.json").write_text("")  # e.g. a disk that filled while writing it
    (t / "bad_export" / "model.safetensors").write_bytes(b"")
    (t / "bad_meta" / "step_00000002").mkdir(parents=True)
    (t / "bad_meta" / "step_00000002" / "mythos_meta.json").write_text('{"step": 2, "con')
    (t / "bad_meta" / "latest").write_text("step_00000002")
    (t / "bad_latest").mkdir()
    (t / "bad_latest" / "latest").write_bytes(b"\0\x17")
    (t / "bad_eval").mkdir()
    (t / "bad_eval" / "summary.json").write_text("[]")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "mythos_dist.cli", *(a.format(t=t) for a in args)],
            env=worker_env(t),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _, _) in CASES.items()
    }
    results = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        results[name] = (p.returncode, err, CASES[name][2].format(t=t))
    return results


@pytest.mark.parametrize("name", CASES)
def test_cli_bad_input_is_one_line_not_a_traceback(
    outcomes: dict[str, tuple[int, str, str]], name: str
) -> None:
    rc, err, line = outcomes[name]
    assert "Traceback" not in err, err
    assert any(got.startswith(line) for got in err.splitlines()), err
    assert rc == CASES[name][1], err
    if rc == 2:
        assert err.startswith("usage: mythos"), err


INJECTED = """
import sys
import mythos_dist.evaluate as evaluate
def sweep(*args, **kwargs):
    raise ValueError("injected: a failure inside the run, not bad input")
evaluate.sweep = sweep
from mythos_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_failure_inside_a_run_is_one_line_exit_1_traceback_with_debug(tmp_path) -> None:
    """An internal error (here a ValueError raised inside the sweep of a real `mythos eval`) is not
    bad input: no usage, one line naming its type, exit 1; --debug adds the traceback."""
    (tmp_path / "c.yaml").write_text("tracking:\n  enabled: false\neval:\n  n_samples: 8\n")
    args = ["eval", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "eval")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", INJECTED, *args, *debug],
            env=worker_env(tmp_path),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for debug in ([], ["--debug"])
    ]
    (plain_rc, plain), (debug_rc, debug) = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    line = "mythos eval: error: ValueError: injected: a failure inside the run, not bad input"
    assert plain_rc == 1 and debug_rc == 1, plain + debug
    assert "usage:" not in plain and "Traceback" not in plain, plain
    assert f"{line} (rerun with --debug for the traceback)" in plain.splitlines(), plain
    assert "Traceback (most recent call last)" in debug and ", in sweep\n" in debug
    assert debug.splitlines()[-1] == line, debug
