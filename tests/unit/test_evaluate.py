import json

import numpy as np
import pytest
import torch
import yaml
import zarr

from mythos_dist.config import Config, ConfigError, load_config, to_dict
from mythos_dist.evaluate import run_eval
from mythos_dist.model import RDT
from mythos_dist.report import format_table
from mythos_dist.results_store import create_store, new_version_dir, rank_region
from mythos_dist.sweep import chain_batches, check_splits, parse_loops, sweep

SMALL = [
    "model.dim=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.expert_dim=16",
    "model.n_experts=4",
    "model.max_seq_len=16",
    "data.task.train_lengths=[2, 6]",
    "data.task.eval_splits={id: [2, 6], ood1: [7, 12]}",
    "data.task.n_eval=48",
    "eval.splits=[id, ood1]",
    "eval.loops=[1, 2, 3, 5]",
    "eval.n_samples=40",
    "eval.batch_size=16",
]


def small_cfg(tmp_path, *extra: str) -> Config:
    return load_config(None, [*SMALL, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra])


def small_model(cfg: Config) -> RDT:
    torch.manual_seed(0)
    return RDT(cfg.model)


@pytest.mark.parametrize("act", [False, True])
def test_sweep_in_one_pass_equals_separate_forwards(tmp_path, act):
    cfg = small_cfg(tmp_path, f"model.act_enabled={str(act).lower()}")
    model = small_model(cfg).eval()
    if act:  # halting probabilities well inside (0, 1), so ACT mixing actually happens
        torch.nn.init.normal_(model.recurrent.halt.weight, std=0.5)
        torch.nn.init.constant_(model.recurrent.halt.bias, -0.5)
    loops = (1, 2, 3, 5)
    batches = list(chain_batches(cfg, "ood1", 0, 32, 16))
    res = sweep(model, batches, loops)
    with torch.no_grad():
        for b, rows in zip(batches, (slice(0, 16), slice(16, 32))):
            ids_BT = b["input_ids"]
            one = model(ids_BT, n_loops=5, loops_out=loops, track_deltas=True)
            pos_B = b["length"]
            for j, n in enumerate(loops):
                sep_BTV = model(ids_BT, n_loops=n).logits
                torch.testing.assert_close(one.loop_logits[n], sep_BTV, rtol=1e-5, atol=1e-5)
                pred_B = sep_BTV[torch.arange(16), pos_B].argmax(-1).numpy()
                np.testing.assert_array_equal(res.prediction_NL[rows, j], pred_B)
    np.testing.assert_array_equal(res.correct_NL, res.prediction_NL == res.answer_N[:, None])
    assert res.delta_NM.shape == (32, 5) and np.isfinite(res.delta_NM).all()


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_rank_regions_tile_samples_on_batch_boundaries(world):
    n, bs = 100, 16
    regions = [rank_region(n, world, r, bs) for r in range(world)]
    covered = [i for lo, hi, _ in regions for i in range(lo, hi)]
    assert covered == list(range(n))
    assert all(lo % bs == 0 and lo % chunk == 0 for lo, _, chunk in regions)


def test_run_eval_store_summary_and_plots(tmp_path):
    cfg = small_cfg(tmp_path, "tracking.enabled=false")  # MLflow: test_tracking.py, against a server
    model = small_model(cfg)
    res = run_eval(model, cfg, out_dir=tmp_path / "eval", checkpoint="ckpt/step-7")
    assert res is not None and res.out_dir.name == "eval-1" and res.run_id is None

    root = zarr.open_group(str(res.store), mode="r")
    assert root.attrs["checkpoint"] == "ckpt/step-7"
    assert root.attrs["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert root.attrs["task_spec"]["modulus"] == cfg.data.task.modulus
    assert root.attrs["git_commit"]
    ref = sweep(model, chain_batches(cfg, "ood1", 0, 40, 16), (1, 2, 3, 5))
    g = root["ood1"]
    np.testing.assert_array_equal(g["prediction"][:], ref.prediction_NL)
    np.testing.assert_array_equal(g["sample_id"][:], ref.sample_id_N)
    assert g["delta_norm"].shape == (40, 5)
    np.testing.assert_allclose(res.summary["splits"]["ood1"]["acc"], ref.correct_NL.mean(0))
    assert 0 < res.spectral["rho_A"] < 1

    table = format_table(res.summary)
    assert "ood1" in table and "@5" in table
    header = (res.out_dir / "accuracy.csv").read_text().splitlines()[0]
    assert header == "split,n,acc@1,acc@2,acc@3,acc@5"
    assert json.loads((res.out_dir / "summary.json").read_text())["loops"] == [1, 2, 3, 5]
    for name in [
        "accuracy_vs_loops.png",
        "accuracy_vs_length.png",
        "accuracy_heatmap.png",
        "convergence.png",
        "stability.png",
    ]:
        png = (res.out_dir / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_versions_are_never_overwritten(tmp_path):
    first = new_version_dir(tmp_path / "out")
    assert first.name == "eval-1" and first.is_dir()
    for name in ["eval-3", "eval-x", "other"]:
        (tmp_path / "out" / name).mkdir()
    assert new_version_dir(tmp_path / "out").name == "eval-4"


def test_evaluations_started_together_each_get_their_own_version(tmp_path):
    """8 threads claiming a version of one out dir at once: 8 distinct directories, none shared
    (before, two `mythos eval` into one --out could pick the same eval-K and one failed)."""
    import threading

    got, start = [], threading.Barrier(8)

    def claim() -> None:
        start.wait()
        got.append(new_version_dir(tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in got) == [f"eval-{k}" for k in range(1, 9)]


def test_existing_store_is_refused(tmp_path):
    cfg = small_cfg(tmp_path)
    (tmp_path / "s.zarr").mkdir()
    with pytest.raises(FileExistsError, match=r"s\.zarr"):
        create_store(tmp_path / "s.zarr", cfg, ["id"], [1], 8, 1, 8, None)


@pytest.mark.parametrize("bad", ["0", "1,-2", "2.5", "x", "", [1.5], [True], [0]])
def test_bad_loop_counts(bad):
    with pytest.raises(ValueError, match="loop count"):
        parse_loops(bad)


def test_parse_loops_sorts_and_dedups():
    assert parse_loops(" 4,1,2,2 ") == (1, 2, 4)


def test_unknown_split_and_too_many_samples(tmp_path):
    cfg = small_cfg(tmp_path, "tracking.enabled=false")
    with pytest.raises(ConfigError, match=r"unknown.*ood7"):
        check_splits(cfg, ["id", "ood7"])
    with pytest.raises(ValueError, match="n_samples"):
        run_eval(small_model(cfg), cfg, n_samples=10_000, out_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()  # validated before anything is written


def test_cli_eval_and_spectral(tmp_path, capsys):
    from mythos_dist.cli import main

    raw = {}
    for item in SMALL:
        key, value = item.split("=", 1)
        section, *rest = key.split(".")
        node = raw.setdefault(section, {})
        for k in rest[:-1]:
            node = node.setdefault(k, {})
        node[rest[-1]] = yaml.safe_load(value)
    raw["tracking"] = {"enabled": False}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["eval", "--config", str(path), "--loops", "0,2"]) == 2
    assert "loop counts must be integers ≥ 1" in capsys.readouterr().err
    assert main(["eval", "--config", str(path), "--splits", "id,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    out_dir = tmp_path / "cli"
    (out_dir / "eval-1").mkdir(parents=True)  # an earlier result: the CLI must write eval-2
    rc = main(
        [
            "eval",
            "--config",
            str(path),
            "--loops",
            "1,3",
            "--splits",
            "id",
            "--n-samples",
            "16",
            "--out",
            str(out_dir),
        ]
    )
    assert rc == 0 and (out_dir / "eval-2" / "results.zarr" / "id" / "correct").is_dir()
    assert not any((out_dir / "eval-1").iterdir())
    assert main(["spectral", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rho(A)" in out and "Jacobian radius" in out


@pytest.mark.distributed
def test_load_model_from_export_and_bad_checkpoints(tmp_path, trained_checkpoint):
    """An export written by checkpoint.export, and the DeepSpeed checkpoint dir itself (exported on
    the fly), load as the model the real run trained: the logits its module gave."""
    from mythos_dist.checkpoint import export
    from mythos_dist.loading import load_model
    from tests.multiproc import TINY_MODEL

    cfg = load_config(None, TINY_MODEL)
    exported = export(trained_checkpoint["ckpt"], tmp_path / "export")
    for source in (exported, trained_checkpoint["ckpt"]):
        loaded = load_model(source, cfg)
        with torch.no_grad():
            logits = loaded(trained_checkpoint["input_ids"], 2).logits
        torch.testing.assert_close(logits, trained_checkpoint["logits"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="nope"):
        load_model(tmp_path / "nope", cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_model(tmp_path / "empty", cfg)


def _fake_eval(path, loops, accs_by_split):
    path.mkdir(parents=True)
    splits = {s: {"n": 100, "acc": a} for s, a in accs_by_split.items()}
    (path / "summary.json").write_text(json.dumps({"loops": loops, "splits": splits}))
    return path


def test_report_mean_std_over_runs_and_mismatch_errors(tmp_path, capsys):
    from mythos_dist.cli import main

    dirs = [
        _fake_eval(tmp_path / f"s{i}", [4, 8], {"id": [0.9 + 0.02 * i, 0.8], "ood1": [0.5, 0.6 - 0.1 * i]})
        for i in range(3)
    ]
    assert main(["report", *map(str, dirs), "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    np.testing.assert_allclose(rep["splits"]["id"]["acc"], [0.92, 0.8])
    np.testing.assert_allclose(rep["splits"]["id"]["std"], [0.02, 0.0], atol=1e-12)
    np.testing.assert_allclose(rep["splits"]["ood1"]["min"], [0.5, 0.4])
    csv = (tmp_path / "rep" / "accuracy_over_runs.csv").read_text().splitlines()
    assert csv[0] == "split,stat,acc@4,acc@8" and csv[1].startswith("id,mean,0.920000")
    assert (tmp_path / "rep" / "accuracy_vs_loops_runs.png").read_bytes().startswith(b"\x89PNG")
    assert "0.920 ±0.020" in capsys.readouterr().out

    other = _fake_eval(tmp_path / "other", [4, 16], {"id": [0.9, 0.8], "ood1": [0.5, 0.6]})
    assert main(["report", str(dirs[0]), str(other), "--out", str(tmp_path / "rep2")]) == 2
    assert "loops [4, 16]" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "rep3")]) == 2
    assert "summary.json not found" in capsys.readouterr().err


def test_model_overrides_at_evaluation_apply_or_are_refused_never_ignored(tmp_path, capsys):
    """`--set model.attn_window=3` runs the checkpoint's model with window 3; an override that would
    change the trained model (its width) is refused by name before any weight is read."""
    from mythos_dist.cli import main
    from mythos_dist.export import init_export
    from mythos_dist.loading import load_model
    from mythos_dist.model.attention import GQAttention

    export = init_export(small_cfg(tmp_path, "model.attn_window=4"), tmp_path / "export")
    ids_BT = torch.randint(0, 10, (2, 16))

    def logits(model: RDT) -> torch.Tensor:
        with torch.no_grad():
            return model(ids_BT, 3).logits

    as_saved = load_model(
        export, small_cfg(tmp_path, "model.attn_window=2")
    )  # a config file's value: not an override
    assert as_saved.cfg.attn_window == 4
    over = ["model.attn_window=3", "model.max_seq_len=32"]
    narrow = load_model(export, small_cfg(tmp_path, *over), overrides=over)
    windows = [m.window for m in narrow.modules() if isinstance(m, GQAttention)]
    assert narrow.cfg.attn_window == 3 and narrow.cfg.max_seq_len == 32 and windows and set(windows) == {3}
    assert not torch.allclose(logits(narrow), logits(as_saved))  # the window is applied, not recorded only
    same = ["model.dim=32"]  # equal to the checkpoint's: harmless
    assert load_model(export, small_cfg(tmp_path, *same), overrides=same).cfg == as_saved.cfg
    over = [" model.dim=64", "model.lora_rank=4", "model.attn_window=3"]  # spaces as apply_overrides allows
    with pytest.raises(
        ConfigError, match=r"(?s)model\.dim: checkpoint 32, --set 64.*model\.lora_rank: checkpoint 8, --set 4"
    ):
        load_model(export, small_cfg(tmp_path, *over), overrides=over)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    args = [
        "eval",
        "--config",
        str(cfg_file),
        "--checkpoint",
        str(export),
        *[a for s in SMALL for a in ("--set", s)],
    ]
    assert main([*args, "--set", "model.n_heads=2"]) == 2
    assert "model.n_heads: checkpoint 4, --set 2" in capsys.readouterr().err
