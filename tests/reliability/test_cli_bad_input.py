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
