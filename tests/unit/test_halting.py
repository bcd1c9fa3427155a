"""Loop counts chosen per sample at inference (LoopHalting): exactness, agreement, decoding."""

import pytest
import torch

from mythos_dist.model import KVCache, LoopHalting
from tests.unit.test_model import make_model


def _valid(lengths_B: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < lengths_B[:, None]


@torch.no_grad()
@pytest.mark.parametrize(("window", "sink"), [(0, False), (3, True)])
def test_each_sample_gets_exactly_the_fixed_count_it_stopped_at(window: int, sink: bool) -> None:
    """A halted sample's logits equal a fixed-count forward with its loops_used; samples stop at
    different counts; the cap holds; the loop ends once every sample has stopped."""
    model = make_model(attn_window=window, attn_sink=sink, loop_signal=False)
    B, T, cap = 16, 12, 10
    ids = torch.randint(0, 10, (B, T))
    valid = _valid(torch.randint(3, T + 1, (B,)), T)
    at_B = valid.sum(1) - 1
    assert model(ids, n_loops=cap, valid_BT=valid, logits_at_B=at_B).loops_used is None
    fixed = {n: model(ids, n_loops=n, valid_BT=valid, logits_at_B=at_B).logits for n in range(1, cap + 1)}
    calls: list[bool] = []

    def all_done(local: bool) -> bool:
        calls.append(local)
        return local

    for threshold in (0.05, 0.2, 0.5, 1.0):
        calls.clear()
        out = model(ids, n_loops=cap, valid_BT=valid, logits_at_B=at_B,
                    halting=LoopHalting(threshold, all_done=all_done))  # fmt: skip
        used = out.loops_used
        assert used.shape == (B,) and int(used.min()) >= 1 and int(used.max()) <= cap
        for b in range(B):
            torch.testing.assert_close(out.logits[b], fixed[int(used[b])][b], rtol=1e-5, atol=1e-6)
        # the loop ran until the last sample stopped (or the cap) and asked after each loop
        assert len(calls) == min(int(used.max()), cap - 1)
        assert calls[-1] == (int(used.max()) < cap) and not any(calls[:-1])
    loose = model(ids, n_loops=cap, valid_BT=valid, logits_at_B=at_B, halting=LoopHalting(1.0)).loops_used
    tight = model(ids, n_loops=cap, valid_BT=valid, logits_at_B=at_B, halting=LoopHalting(1e-9)).loops_used
    assert (tight == cap).all() and (loose <= tight).all() and (loose < cap).any()
    mid = model(ids, n_loops=cap, valid_BT=valid, logits_at_B=at_B, halting=LoopHalting(0.2)).loops_used
    assert len(set(mid.tolist())) >= 2 or len(set(loose.tolist())) >= 2  # counts differ between samples
    floor = model(ids, n_loops=cap, valid_BT=valid, logits_at_B=at_B, halting=LoopHalting(1.0, min_loops=4))
    assert (floor.loops_used >= 4).all()


@torch.no_grad()
def test_ranks_still_running_elsewhere_keep_this_one_stepping_without_changing_its_results() -> None:
    """all_done False (another rank still running) keeps the loop going to the cap; the samples
    that had stopped keep their state, so logits and loops_used are unchanged."""
    model = make_model(loop_signal=False)
    ids = torch.randint(0, 10, (6, 9))
    alone = model(ids, n_loops=12, halting=LoopHalting(0.5))
    steps: list[int] = []
    orig = model.recurrent.step

    def counting(*a, **k):
        steps.append(1)
        return orig(*a, **k)

    model.recurrent.step = counting
    busy = model(ids, n_loops=12, halting=LoopHalting(0.5, all_done=lambda local: False))
    assert len(steps) == 12 and int(alone.loops_used.max()) < 12
    assert torch.equal(busy.loops_used, alone.loops_used)
    torch.testing.assert_close(busy.logits, alone.logits, rtol=0, atol=0)


@torch.no_grad()
def test_generate_with_halting_decodes_like_a_full_forward_of_the_loops_run() -> None:
    """generate(halting=...): the prompt picks the loop count; decoding with the cache gives the
    tokens a full halting forward over the longer sequence would give at every step."""
    model = make_model(loop_signal=False)
    ids = torch.randint(0, 10, (3, 7))
    halting = LoopHalting(0.3)
    out = model.generate(ids, max_new_tokens=3, n_loops=12, halting=halting)
    assert out.shape == (3, 10)
    cache = KVCache()
    first = model(ids, n_loops=12, cache=cache, halting=halting)
    assert 1 <= cache.n_loops <= 12 and cache.n_loops == int(first.loops_used.max())
    assert torch.equal(out[:, 7], first.logits[:, -1].argmax(-1))
    assert sum(k.startswith("loop") for k in cache.entries) == cache.n_loops


def test_halting_refuses_training_and_bad_settings() -> None:
    model = make_model()
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="halting is for inference"):
        model(ids, n_loops=4, halting=LoopHalting())  # gradients on
    with torch.no_grad(), pytest.raises(ValueError, match="halting is for inference"):
        model(ids, n_loops=4, loops_out=[2], halting=LoopHalting())
    with pytest.raises(ValueError, match="threshold"):
        LoopHalting(0.0)
    with pytest.raises(ValueError, match="min_loops"):
        LoopHalting(0.1, min_loops=0)


def test_loop_spec_and_auto_settings_are_checked() -> None:
    from mythos_dist.config import ConfigError, EvalConfig
    from mythos_dist.sweep import parse_loop_spec

    assert parse_loop_spec("auto") == (None, True)
    assert parse_loop_spec("8, 4,auto") == ((4, 8), True)
    assert parse_loop_spec("1,2") == ((1, 2), False)
    with pytest.raises(ConfigError, match="loop counts must be integers"):
        parse_loop_spec("4,autoo")
    with pytest.raises(ConfigError, match=r"eval\.auto_threshold: must be a number > 0"):
        EvalConfig(auto_threshold=0).validate()
    with pytest.raises(ConfigError, match=r"eval\.auto_min_loops: needs 1 ≤ auto_min_loops ≤ auto_max_loops"):
        EvalConfig(auto_min_loops=9, auto_max_loops=8).validate()
    with pytest.raises(ConfigError, match=r"eval\.heldout: must be 'val' \(choosing\) or 'test'"):
        EvalConfig(heldout="train").validate()
