"""Config: YAML + overrides, clear errors naming the field, scale configs and their parameter counts."""

from pathlib import Path

import pytest

from mythos_dist.config import Config, ConfigError, ModelConfig, load_config, to_dict
from mythos_dist.model import count_params

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.dim=30"], r"model\.dim: dim=30 is not divisible by n_heads=4"),
        (["model.n_kv_heads=3"], r"model\.n_kv_heads: n_heads=4 is not divisible by n_kv_heads=3"),
        (["model.n_experts_per_tok=9"], r"model\.n_experts_per_tok: top-k=9"),
        (["model.attn_type=mla", "model.qk_rope_head_dim=7"], r"model\.qk_rope_head_dim: must be even"),
        (["model.attn_type=bogus"], r"model\.attn_type: must be one of \['gqa', 'mla'\]"),
        (["model.dimm=64"], r"model\.dimm: unknown key \(did you mean 'dim'\?\)"),
        (["train.lr=fast"], r"train\.lr: expected a number"),
        (["train.steps=1.5"], r"train\.steps: expected an integer"),
        (["parallel.ep_size=3"], r"parallel\.ep_size: n_experts=8 is not divisible by ep_size=3"),
        (["parallel.zero_stage=3"], r"parallel\.zero_stage: ZeRO stage 3 is not supported with MoE"),
        (["train.loops.n_loops=0"], r"train\.loops\.n_loops: loop counts must be ≥ 1"),
        (["eval.loops=[1, 0]"], r"eval\.loops: loop counts must be integers ≥ 1"),
        (["eval.splits=[id, ood9]"], r"eval\.splits: unknown split\(s\) \['ood9'\]"),
        (["model.max_seq_len=20"], r"model\.max_seq_len: 20 is below the longest chain's input \(49 tokens"),
        (["data.task.train_lengths=[5, 2]"], r"data\.task\.train_lengths: needs 1 ≤ lo ≤ hi"),
        (["model.attn_window=-1"], r"model\.attn_window: must be ≥ 0"),
        (["train.reachable_only=true"], r"train\.reachable_only: needs model\.attn_window > 0"),
        (["train.attn_windows=[2, 1]"], r"train\.attn_windows: every window must be ≥ 2 .*got \(2, 1\)"),
        (["train.attn_windows=[2]"], r"train\.attn_windows: needs model\.attn_window > 0"),
        (["train.attn_windows_until=10"], r"train\.attn_windows_until: needs train\.attn_windows"),
        (["train.attn_windows_until=-1"], r"train\.attn_windows_until: must be ≥ 0"),
        (["train.length_curriculum_steps=-1"], r"train\.length_curriculum_steps: must be ≥ 0"),
        (
            ["train.length_curriculum_mode=drop"],
            r"train\.length_curriculum_mode: must be one of \['mask', 'crop'\], got 'drop'",
        ),
        (
            ["train.length_curriculum_mode=crop"],
            r"train\.length_curriculum_mode: 'crop' needs train\.length_curriculum_steps > 0",
        ),
        (["model.embed_init_std=0"], r"model\.embed_init_std: must be > 0, got 0"),
        (["checkpoint.average_last=0"], r"checkpoint\.average_last: must be ≥ 1"),
        (["checkpoint.average_last=3"], r"checkpoint\.average_last: 3 .* keep_last=2 retains fewer"),
        (
            [
                "checkpoint.keep_last=5",
                "checkpoint.average_last=4",
                "train.steps=1000",
                "checkpoint.every=400",
            ],
            r"checkpoint\.average_last: 4 .* train\.steps=1000 with checkpoint\.every=400 writes 3",
        ),
        (
            ["checkpoint.average_last=2", "checkpoint.every=0"],
            r"checkpoint\.average_last: 2 .* checkpoint\.every=0 writes 1",
        ),
        (["checkpoint.max_shard_size=2 parsecs"], r"checkpoint\.max_shard_size: not a size: '2 parsecs'"),
        (["checkpoint.max_shard_size=0B"], r"checkpoint\.max_shard_size: must be > 0, got '0B'"),
        (["nosuch=1"], r"nosuch: unknown key"),
    ],
)
def test_bad_config_names_the_field(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("steps", "every", "n"), [(1000, 400, 3), (1000, 500, 2), (1001, 500, 3), (1000, 0, 1)]
)
def test_checkpoints_a_run_writes(steps: int, every: int, n: int) -> None:
    cfg = load_config(None, [f"train.steps={steps}", f"checkpoint.every={every}"])
    assert cfg.checkpoint.n_saved(steps) == n  # every `every` steps, and at the end


def test_world_size_must_divide_by_ep_size() -> None:
    cfg = load_config(None, ["parallel.ep_size=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by ep_size=2"):
        cfg.validate(world_size=3)


def test_yaml_and_overrides_round_trip(tmp_path: Path) -> None:
    p = write(tmp_path, "model:\n  dim: 64\ntrain:\n  loops:\n    kind: uniform\n    n_loops: 5\n")
    cfg = load_config(
        p, ["train.steps=700", "data.task.eval_splits={id: [2, 12], long: [30, 40]}", "eval.splits=[long]"]
    )
    assert cfg.model.dim == 64 and cfg.train.steps == 700 and cfg.train.loops.kind == "uniform"
    assert cfg.data.task.eval_splits["long"] == (30, 40)
    again = load_config(write(tmp_path, __import__("yaml").safe_dump(to_dict(cfg))))
    assert again == cfg


def test_missing_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_shipped_configs_validate() -> None:
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(paths) >= 8
    for p in paths:
        assert isinstance(load_config(p), Config), p


def test_base_file_merges_sections_and_replaces_values(tmp_path: Path) -> None:
    (tmp_path / "common").mkdir()
    write(tmp_path / "common", "model:\n  dim: 64\n  n_heads: 2\neval:\n  loops: [1, 2, 4]\n")
    (tmp_path / "mid.yaml").write_text("base: common/c.yaml\nmodel:\n  n_heads: 4\ntrain:\n  steps: 700\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\neval:\n  loops: [8]\n")
    cfg = load_config(tmp_path / "top.yaml", ["train.steps=800"])
    assert (cfg.model.dim, cfg.model.n_heads) == (64, 4)  # the section merged key by key
    assert cfg.eval.loops == (8,)  # a list replaces the base's
    assert cfg.train.steps == 800  # overrides come last


def test_bad_base_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml \(the base of .*a\.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml includes itself: .*b\.yaml -> .*c\.yaml -> .*b\.yaml"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: [c.yaml]\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: base must be the path of another config file"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    ("name", "base", "changed"),
    [
        (
            "recipe3",
            "recipe2",
            {
                "model.attn_window",
                "model.attn_sink",
                "model.pos_encoding",
                "train.steps",
                "train.reachable_only",
                "train.length_curriculum_steps",
                "train.length_curriculum_mode",
                "checkpoint.every",
                "eval.loops",
            },
        ),
        ("recipe4", "recipe3", {"train.attn_windows"}),
        ("recipe5", "recipe4", {"checkpoint.every", "checkpoint.average_last"}),
        (
            "recipe6",
            "recipe5",
            {
                "train.steps",
                "train.length_curriculum_steps",
                "checkpoint.every",
                "checkpoint.keep_last",
                "eval.loops",
                "eval.auto",
                "eval.auto_threshold",
            },
        ),
        ("recipe7", "recipe6", {"model.max_seq_len", "train.loops"}),
        ("recipe8", "recipe7", {"train.loops"}),
        ("recipe10", "recipe8", {"train.loops"}),
        ("recipe11", "recipe8", {"train.steps", "train.length_curriculum_steps", "checkpoint.every"}),
        ("recipe12", "recipe11", {"train.min_lr_ratio", "eval.auto_threshold"}),
        ("recipe13", "recipe12", {"model.prelude_attn_window"}),
        ("recipe14", "recipe12", {"train.steps", "train.length_curriculum_steps", "checkpoint.every"}),
        ("recipe15", "recipe12", {"train.steps", "train.length_curriculum_steps", "checkpoint.every"}),
        ("recipe16", "recipe12", {"model.coda_layers"}),
    ],
)
def test_recipes_differ_from_their_base_only_where_they_say(name: str, base: str, changed: set[str]) -> None:
    def flat(path: Path) -> dict[str, object]:
        d = to_dict(load_config(path))
        return {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()}

    a, b = flat(ROOT / f"configs/digit_chain_{name}.yaml"), flat(ROOT / f"configs/digit_chain_{base}.yaml")
    paths = {"checkpoint.dir", "eval.out_dir", "tracking.experiment"}
    assert {k for k in a if a[k] != b[k]} == changed | paths


SCALES = {"1b": 1e9, "3b": 3e9, "10b": 10e9, "50b": 50e9, "100b": 100e9, "500b": 500e9, "1t": 1e12}


@pytest.mark.parametrize("name", sorted(SCALES))
def test_scale_configs_have_their_nominal_size(name: str) -> None:
    cfg = load_config(ROOT / "configs" / "scales" / f"mythos_{name}.yaml")
    pc = count_params(cfg.model)  # meta device: a 1T model counts in well under a second
    assert 0.85 <= pc.total / SCALES[name] <= 1.25, f"{name}: {pc.total:,}"
    assert pc.active_per_token < 0.4 * pc.total  # sparse: most parameters are routed experts


def test_param_count_matches_a_materialised_model() -> None:
    from mythos_dist.model import RDT

    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, n_experts=4, expert_dim=16, attn_type="mla",
                      kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)  # fmt: skip
    model = RDT(cfg)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    routed = model.recurrent.block.ffn.experts
    routed_n = sum(p.numel() for p in routed.parameters())
    assert pc.active_per_token == pc.total - routed_n + routed_n * 2 // 4


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("digit_chain.yaml", "a fixed 4 loops"),
        ("digit_chain_recipe12.yaml", "1-16 loops drawn uniformly (mean 8), gradient through the last 4"),
    ],
)
def test_loop_policy_is_described_as_it_trains(name: str, want: str) -> None:
    """The run's log and MLflow note say what the steps draw (the log said "uniform 8 loops" for 1-16)."""
    assert load_config(ROOT / "configs" / name).train.loops.describe() == want
