"""The RDT model: shapes, KV-cache decode equality, MLA cache size, loops, ACT, policies, injection."""

import re

import pytest
import torch

from mythos_dist.config import ConfigError, LoopPolicyConfig, ModelConfig
from mythos_dist.model import RDT, KVCache, LoopPolicy, attention_window
from mythos_dist.model.attention import TokenLayout, apply_rope, rope_rotations
from mythos_dist.model.norm import RMSNorm
from mythos_dist.model.recurrent import LTIInjection
from mythos_dist.model.softmax import softmax_lastdim


def tiny(**kw) -> ModelConfig:
    base = dict(dim=32, n_heads=4, n_kv_heads=2, n_experts=4, n_experts_per_tok=2, expert_dim=16,
                kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                max_seq_len=64, max_loop_iters=4, lora_rank=4)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def make_model(**kw) -> RDT:
    torch.manual_seed(0)
    model = RDT(tiny(**kw)).eval()
    with torch.no_grad():  # non-trivial LoRA and injection so they matter in the comparisons
        model.recurrent.lora.up.normal_(0, 0.1)
        model.recurrent.injection.log_A.normal_(0, 1)
        for m in model.modules():  # attention sinks, when configured
            if getattr(m, "sink_H", None) is not None:
                m.sink_H.normal_(0, 1)
    return model


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
@pytest.mark.parametrize("pos_encoding", ["rope", "none"])
def test_shapes(attn_type: str, pos_encoding: str) -> None:
    model = make_model(attn_type=attn_type, pos_encoding=pos_encoding)
    out = model(torch.randint(0, 12, (3, 9)), n_loops=3, loops_out=[1, 2], track_deltas=True)
    assert out.logits.shape == (3, 9, 12)
    assert sorted(out.loop_logits) == [1, 2, 3]
    assert len(out.delta_norms) == 3 and out.delta_norms[0].shape == (3, 9)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
@pytest.mark.parametrize(
    ("window", "prelude_window", "coda_window", "sink"),
    [(0, 0, 0, False), (3, 0, 0, True), (3, 6, 0, True), (3, 0, 5, True)],
)
def test_cached_decode_equals_full_forward(
    attn_type: str, window: int, prelude_window: int, coda_window: int, sink: bool
) -> None:
    model = make_model(
        attn_type=attn_type,
        attn_window=window,
        prelude_attn_window=prelude_window,
        coda_attn_window=coda_window,
        attn_sink=sink,
    )
    ids = torch.randint(0, 12, (2, 14))
    full = model(ids, n_loops=3).logits
    cache = KVCache()
    parts = [
        model(ids[:, a:b], n_loops=3, cache=cache).logits for a, b in [(0, 6), (6, 7), (7, 11), (11, 14)]
    ]
    # prefill, one decode token, a multi-token prefill after a cache, and more
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.pos == 14
    assert sum(k.startswith("loop") for k in cache.entries) == 3  # one entry per loop iteration


@pytest.mark.parametrize("n_loops", [1, 3])
@pytest.mark.parametrize(("prelude_window", "coda_window"), [(0, 0), (6, 0), (0, 5), (4, 6)])
def test_attention_window_bounds_how_far_information_travels(
    n_loops: int, prelude_window: int, coda_window: int
) -> None:
    """With a window w every attention layer moves information at most w − 1 tokens, so the last
    position depends on exactly the (w − 1)·(prelude + loops + coda) tokens before it (gradient
    of its logits w.r.t. each token's embedding is non-zero there and exactly zero beyond), or
    with a prelude window p and a coda window c the (p − 1)·prelude + (w − 1)·loops + (c − 1)·coda;
    `ModelConfig.receptive_field`, which the trainer uses to drop unreachable chains, says the same."""
    model = make_model(
        attn_window=3, prelude_attn_window=prelude_window, coda_attn_window=coda_window, pos_encoding="none"
    )
    reach = model.cfg.receptive_field(n_loops)
    prelude_step, coda_step = (prelude_window or 3) - 1, (coda_window or 3) - 1
    assert reach == prelude_step * model.cfg.prelude_layers + 2 * n_loops + coda_step * model.cfg.coda_layers
    embedded = []
    model.embed.register_forward_hook(lambda m, i, out: embedded.append(out) or out.requires_grad_())
    logits = model(torch.randint(0, 10, (1, 20)), n_loops=n_loops).logits[0, -1]
    (grad_ND,) = torch.autograd.grad(logits.square().sum(), embedded[0])  # rows = the 20 tokens
    seen_T = grad_ND.abs().amax(-1) > 0
    assert reach < 19 and seen_T.tolist() == [t >= 19 - reach for t in range(20)], reach


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_attention_window_override_equals_a_model_built_with_that_window(attn_type: str) -> None:
    """`attention_window(model, w)` gives exactly the function of the same weights built with
    attn_window=w, and restores the model's own window after, also when the body raises."""
    model = make_model(attn_type=attn_type, attn_window=4, attn_sink=True)
    narrow = RDT(tiny(attn_type=attn_type, attn_window=2, attn_sink=True)).eval()
    narrow.load_state_dict(model.state_dict())
    ids = torch.randint(0, 10, (2, 12))
    own = model(ids, n_loops=3).logits
    with attention_window(model, 2):
        torch.testing.assert_close(model(ids, n_loops=3).logits, narrow(ids, n_loops=3).logits)
    assert not torch.allclose(own, narrow(ids, n_loops=3).logits)  # the window matters here
    with pytest.raises(RuntimeError), attention_window(model, 2):
        raise RuntimeError
    with attention_window(model, None):  # None: unchanged
        torch.testing.assert_close(model(ids, n_loops=3).logits, own)
    torch.testing.assert_close(model(ids, n_loops=3).logits, own)


@pytest.mark.parametrize("part", ["prelude", "coda"])
def test_prelude_and_coda_windows_are_kept_by_window_draws(part: str) -> None:
    """model.prelude_attn_window / coda_attn_window are those layers' own: `attention_window(model,
    2)` narrows the other layers only, as a model built with attn_window=2 and the same own window;
    that window is what makes the difference to a model without one."""
    own = {f"{part}_attn_window": 7}
    model = make_model(attn_window=4, attn_sink=True, **own)
    drawn = RDT(tiny(attn_window=2, attn_sink=True, **own)).eval()
    plain = RDT(tiny(attn_window=2, attn_sink=True)).eval()
    drawn.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 10, (2, 14))
    with attention_window(model, 2):
        torch.testing.assert_close(model(ids, n_loops=3).logits, drawn(ids, n_loops=3).logits)
        assert {layer.attn.window for layer in getattr(model, part)} == {7}
    assert not torch.allclose(drawn(ids, n_loops=3).logits, plain(ids, n_loops=3).logits)
    assert [m.window for m in model.recurrent.block.modules() if hasattr(m, "own_window")] == [4]


@pytest.mark.parametrize("name", ["prelude_attn_window", "coda_attn_window"])
@pytest.mark.parametrize(("window", "own_window"), [(0, 5), (4, 1)])
def test_own_window_without_a_sliding_window_is_refused(name: str, window: int, own_window: int) -> None:
    with pytest.raises(ValueError, match=name):
        RDT(tiny(attn_window=window, **{name: own_window}))


def test_embedding_init_std_is_its_own_setting() -> None:
    torch.manual_seed(0)
    model = RDT(tiny(vocab_size=64, dim=64, embed_init_std=1.0))
    assert 0.9 < model.embed.weight.std().item() < 1.1
    assert 0.018 < model.head.weight.std().item() < 0.022  # everything else keeps init_std


def test_generate_greedy_matches_argmax_of_full_forward() -> None:
    model = make_model(attn_type="mla")
    ids = torch.randint(0, 12, (2, 5))
    out = model.generate(ids, max_new_tokens=4, n_loops=2)
    for i in range(4):
        nxt = model(out[:, : 5 + i], n_loops=2).logits[:, -1].argmax(-1)
        assert torch.equal(nxt, out[:, 5 + i])


def test_decode_with_other_loop_count_is_refused() -> None:
    model = make_model()
    cache = KVCache()
    model(torch.randint(0, 12, (1, 4)), n_loops=2, cache=cache)
    with pytest.raises(ValueError, match="n_loops=2"):
        model(torch.randint(0, 12, (1, 1)), n_loops=3, cache=cache)


def test_mla_cache_stores_latent_plus_one_rope_key_per_token() -> None:
    cfg = tiny(attn_type="mla", kv_lora_rank=16, qk_rope_head_dim=8)
    model = make_model(attn_type="mla", kv_lora_rank=16, qk_rope_head_dim=8)
    cache = KVCache()
    model(torch.randint(0, 12, (2, 10)), n_loops=2, cache=cache)
    n_layers = cfg.prelude_layers + 2 + cfg.coda_layers  # 2 loop iterations each hold an entry
    assert len(cache.entries) == n_layers
    for key in cache.entries:
        assert cache.values_per_token(key) == 16 + 8  # not n_heads × rope dim
    assert cache.nbytes() == n_layers * 2 * 10 * (16 + 8) * 4  # layers × B × T × values × fp32
    gqa = KVCache()
    make_model(attn_type="gqa")(torch.randint(0, 12, (2, 10)), n_loops=2, cache=gqa)
    assert gqa.values_per_token("loop0") == 2 * cfg.n_kv_heads * cfg.head_dim


def test_more_loops_than_trained_table() -> None:
    model = make_model(max_loop_iters=4)
    out = model(torch.randint(0, 12, (2, 6)), n_loops=11, track_deltas=True)
    assert torch.isfinite(out.logits).all()
    assert len(out.delta_norms) == 11
    # past the table the LoRA scale is clamped to its last row
    x = torch.randn(3, 32)
    torch.testing.assert_close(model.recurrent.lora(x, 9), model.recurrent.lora(x, 3))


@pytest.mark.parametrize("act", [False, True])
def test_sweep_in_one_pass_equals_separate_forwards(act: bool) -> None:
    model = make_model(act_enabled=act)
    ids = torch.randint(0, 12, (3, 8))
    sweep = model(ids, n_loops=6, loops_out=[1, 2, 4]).loop_logits
    for n in (1, 2, 4, 6):
        torch.testing.assert_close(sweep[n], model(ids, n_loops=n).logits, rtol=1e-5, atol=1e-6)


def test_act_weights_sum_to_one_and_ponder_cost() -> None:
    model = make_model(act_enabled=True)
    with torch.no_grad():  # a constant state makes the ACT mixture equal that state iff weights sum to 1
        model.recurrent.halt.weight.zero_()
        model.recurrent.halt.bias.fill_(0.0)  # p = 0.5 each loop: halts at step 2 (0.5 + 0.5 ≥ 0.99)
    e = torch.randn(10, 32)  # rows of a (2, 5) batch
    rec = model.recurrent
    rec.step = lambda h, e, t, rope, layout, cache=None: (torch.full_like(h, 3.0), h.new_zeros(()))
    res = rec(e, n_loops=6, rope=None, layout=TokenLayout(2, 5))
    torch.testing.assert_close(res.outputs[6], torch.full_like(e, 3.0))
    # each position ran 2 steps; remainder at the halting step is 0.5
    torch.testing.assert_close(res.ponder_cost, torch.tensor(2.5))
    res1 = rec(
        e, n_loops=1, rope=None, layout=TokenLayout(2, 5)
    )  # never halts within 1 loop: remainder 1 at the last step
    torch.testing.assert_close(res1.outputs[1], torch.full_like(e, 3.0))
    torch.testing.assert_close(res1.ponder_cost, torch.tensor(2.0))


def test_act_ponder_cost_has_gradient() -> None:
    model = make_model(act_enabled=True).train()
    out = model(torch.randint(0, 12, (2, 6)), n_loops=4)
    (g,) = torch.autograd.grad(out.ponder_cost, [model.recurrent.halt.weight])
    assert g.abs().sum() > 0


def test_truncated_backprop_only_through_last_loops() -> None:
    model = make_model().train()
    ids = torch.randint(0, 12, (2, 6))
    probe = model.recurrent.injection.log_A

    def grad(k: int) -> torch.Tensor:
        (g,) = torch.autograd.grad(model(ids, n_loops=4, backprop_loops=k).logits.square().sum(), [probe])
        return g

    full, all4, last1 = grad(0), grad(4), grad(1)
    torch.testing.assert_close(full, all4)
    assert last1.abs().sum() > 0 and not torch.allclose(last1, full)
    # embeddings still learn through the injection B·e of the loops that keep gradients
    (g_embed,) = torch.autograd.grad(
        model(ids, n_loops=4, backprop_loops=1).logits.sum(), [model.embed.weight]
    )
    assert g_embed.abs().sum() > 0


@pytest.mark.parametrize("value", [-1e4, -50.0, 0.0, 50.0, 1e4])
def test_injection_spectral_radius_below_one_for_extreme_values(value: float) -> None:
    inj = LTIInjection(8)
    with torch.no_grad():
        inj.log_A.fill_(value)
        inj.log_dt.fill_(value)
    A = inj.A()
    assert torch.isfinite(A).all()
    assert (A >= 0).all() and A.max() < 1.0


def test_loop_policies() -> None:
    fixed = LoopPolicy(LoopPolicyConfig(kind="fixed", n_loops=4), seed=0)
    assert {fixed(s).n_loops for s in range(50)} == {4}
    uni = LoopPolicy(
        LoopPolicyConfig(kind="uniform", n_loops=5, min_loops=2, max_loops=8, backprop_loops=3), 0
    )
    draws = [uni(s) for s in range(400)]
    assert {d.n_loops for d in draws} == set(range(2, 9))
    assert all(d.backprop_loops == min(3, d.n_loops) for d in draws)
    assert [uni(s) for s in range(20)] == draws[:20]  # a pure function of (seed, step): resumable
    pln = LoopPolicy(LoopPolicyConfig(kind="poisson_lognormal", n_loops=6, min_loops=1, max_loops=32), 0)
    ns = torch.tensor([pln(s).n_loops for s in range(3000)], dtype=torch.float)
    assert 5.0 < ns.mean() < 7.0 and ns.std() > 1.5 and ns.max() <= 32
    assert {d.attn_window for d in draws} == {None}  # no windows given: the model's own
    choice = LoopPolicy(
        LoopPolicyConfig(kind="choice", counts=(1, 8, 4, 4), max_loops=8, backprop_loops=2), 0
    )
    picks = [choice(s) for s in range(800)]
    share_4 = sum(d.n_loops == 4 for d in picks) / len(picks)
    assert {d.n_loops for d in picks} == {1, 4, 8} and 0.44 < share_4 < 0.56  # repeats weight a count
    assert all(d.backprop_loops == min(2, d.n_loops) for d in picks)
    assert [choice(s) for s in range(20)] == picks[:20]


@pytest.mark.parametrize(
    "loops, field, words",
    [
        (dict(kind="choice"), "train.loops.counts", "needs the loop counts"),
        (dict(kind="choice", counts=(4, 20), max_loops=16), "train.loops.counts", "[1, max_loops=16]"),
        (dict(kind="uniform", counts=(4,), n_loops=4), "train.loops.counts", "only kind=choice"),
    ],
)
def test_loop_policy_config_refuses_bad_counts(loops, field, words) -> None:
    with pytest.raises(ConfigError, match=re.escape(field) + ".*" + re.escape(words)):
        LoopPolicyConfig(**loops).validate()


def test_loop_policy_draws_attention_windows() -> None:
    """Windows come from their own stream of (seed, step): the loop counts stay those drawn
    without windows, repeats weight a window, and the draw is resumable."""
    cfg = LoopPolicyConfig(kind="uniform", n_loops=5, min_loops=1, max_loops=8)
    plain, windowed = LoopPolicy(cfg, 3), LoopPolicy(cfg, 3, attn_windows=(2, 4, 4))
    draws = [windowed(s) for s in range(600)]
    assert [d.n_loops for d in draws] == [plain(s).n_loops for s in range(600)]
    share_4 = sum(d.attn_window == 4 for d in draws) / len(draws)
    assert {d.attn_window for d in draws} == {2, 4} and 0.6 < share_4 < 0.73
    assert [LoopPolicy(cfg, 3, (2, 4, 4))(s) for s in range(20)] == draws[:20]
    assert [LoopPolicy(cfg, 4, (2, 4, 4))(s).attn_window for s in range(50)] != [
        d.attn_window for d in draws[:50]
    ]
    until = [LoopPolicy(cfg, 3, (2, 4, 4), windows_until=300)(s) for s in range(600)]
    assert until[:300] == draws[:300]  # the same draws before the step, the model's window after
    assert {d.attn_window for d in until[300:]} == {None}
    assert [d.n_loops for d in until] == [d.n_loops for d in draws]


def test_model_is_device_agnostic_dtype_bf16() -> None:
    model = make_model().to(torch.bfloat16)
    out = model(torch.randint(0, 12, (2, 5)), n_loops=2)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_pruned_forward_equals_full_at_answer_positions(attn_type: str) -> None:
    """Skipping padding in the FFN/MoE and computing logits only at the answer keeps its values."""
    model = make_model(attn_type=attn_type, coda_layers=2)
    lengths = torch.tensor([3, 9, 6])
    ids = torch.randint(0, 10, (3, 10))
    pos = torch.arange(10)[None, :]
    ids = torch.where(pos < lengths[:, None], ids, 11)
    ids[torch.arange(3), lengths] = 10  # EQ
    valid = pos <= lengths[:, None]
    full = model(ids, n_loops=3, loops_out=[1]).loop_logits
    pruned = model(ids, n_loops=3, loops_out=[1], valid_BT=valid, logits_at_B=lengths).loop_logits
    for n in (1, 3):
        assert pruned[n].shape == (3, 12)
        torch.testing.assert_close(pruned[n], full[n][torch.arange(3), lengths], rtol=1e-5, atol=1e-5)


def test_padding_does_not_count_toward_expert_load() -> None:
    model = make_model().train()
    router = model.recurrent.block.ffn.router
    router.load_E.zero_()
    ids = torch.randint(0, 10, (2, 8))
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[:, :5] = True
    model(ids, n_loops=2, valid_BT=valid)
    assert router.load_E.sum() == 2 * 5 * 2 * 2  # rows × valid tokens × loops × top-k


def test_rope_rotates_channel_pairs_and_scores_depend_on_offset_only() -> None:
    torch.manual_seed(0)
    theta, D = 10000.0, 8
    pos = torch.arange(5, 11)
    x = torch.randn(2, len(pos), 3, D)
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = (pos.double()[:, None] * inv_freq)[None, :, None, :]  # (1, T, 1, D/2)
    x1, x2 = x.double()[..., 0::2], x.double()[..., 1::2]
    expected = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)
    got = apply_rope(x, rope_rotations(pos, D, theta, torch.float32))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # q·k after rotation depends on the positions' difference only (decode relies on it)
    q, k = torch.randn(D), torch.randn(D)

    def score(i: int, j: int) -> torch.Tensor:
        rot = rope_rotations(torch.tensor([i, j]), D, theta, torch.float64)
        r = apply_rope(torch.stack([q, k]).double()[None, :, None, :], rot)[0, :, 0]
        return r[0] @ r[1]

    torch.testing.assert_close(score(3, 1), score(40, 38))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rmsnorm_matches_torch_forward_gradients_and_double_backward() -> None:
    torch.manual_seed(0)
    ours, ref = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    gx, gw = torch.autograd.grad(y, (x, ours.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, ref.weight), g)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    ours.double()  # the stability tools differentiate its backward again (double vjp)
    x64 = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x64,))
    assert torch.autograd.gradgradcheck(ours, (x64,))


@pytest.mark.parametrize("n", [1, 5, 8, 14, 15, 16, 17, 33])
def test_softmax_lastdim_equals_torch_with_gradients_and_double_backward(n: int) -> None:
    """Short rows are padded on CPU (torch's kernel is slow below 16): the same probabilities to float
    rounding, masked (−inf) entries exactly 0, first and second derivatives as torch's."""
    torch.manual_seed(n)
    x = torch.randn(6, 7, n, dtype=torch.float64) * 3
    x[:, :3, n // 2 + 1 :] = float("-inf")  # masked keys, as attention's
    x.requires_grad_()
    ours, ref = softmax_lastdim(x), torch.softmax(x, -1)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    assert (ours[:, :3, n // 2 + 1 :] == 0).all()
    torch.testing.assert_close(ours.float().sum(-1), torch.ones(6, 7), rtol=0, atol=1e-6)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(ours, x, g, create_graph=True)
    (gx_ref,) = torch.autograd.grad(ref, x, g, create_graph=True)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-14)
    h = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(gx, x, h)[0], torch.autograd.grad(gx_ref, x, h)[0])
    x32 = x.detach().float()
    torch.testing.assert_close(softmax_lastdim(x32), torch.softmax(x32, -1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("T_S", [(7, 7), (3, 10), (1, 5)])
@pytest.mark.parametrize(("window", "sink"), [(0, False), (3, False), (0, True), (3, True)])
def test_matmul_attention_equals_sdpa(
    heads: tuple[int, int], T_S: tuple[int, int], window: int, sink: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path for short sequences (grouped query heads stacked, no K/V repeat) and the SDPA
    path compute the same attention as an explicit softmax: causal (or sliding-window), bottom-
    right aligned after a cache, a value dim ≠ qk dim, and with a sink (an extra zero-valued key
    whose logit is learned per head), forward and gradients including the sink's."""
    from mythos_dist.model import attention
    from mythos_dist.model.attention import _attend, _attend_matmul

    (H, Hk), (T, S) = heads, T_S
    q, k = torch.randn(2, H, T, 8, requires_grad=True), torch.randn(2, Hk, S, 8, requires_grad=True)
    v = torch.randn(2, Hk, S, 6, requires_grad=True)
    sink_H = torch.randn(H, requires_grad=True) if sink else None
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if window:
        mask &= ~torch.ones(T, S, dtype=torch.bool).tril(S - T - window)
    k_rep, v_rep = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    scores = (q @ k_rep.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf"))
    if sink:
        scores = torch.cat([scores, sink_H[None, :, None, None].expand(2, H, T, 1)], dim=-1)
    ref = torch.softmax(scores, dim=-1)[..., :S] @ v_rep
    ours = _attend_matmul(q, k, v, 0.0, window, sink_H)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_attend(q, k, v, 0.0, window, sink_H), ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(attention, "_SMALL_ATTENTION", 0)  # _attend's SDPA path
    sdpa = _attend(q, k, v, 0.0, window, sink_H)
    torch.testing.assert_close(sdpa, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    inputs = [q, k, v] + ([sink_H] if sink else [])
    want = torch.autograd.grad(ref, inputs, g, retain_graph=True)
    for out in (ours, sdpa):
        for a, b in zip(torch.autograd.grad(out, inputs, g, retain_graph=True), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_carries_only_valid_rows_and_refuses_bad_masks() -> None:
    model = make_model()
    ids = torch.randint(0, 10, (2, 6))
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    full = model(ids, n_loops=2, track_deltas=True)
    part = model(ids, n_loops=2, track_deltas=True, valid_BT=valid)
    torch.testing.assert_close(part.logits[valid], full.logits[valid], rtol=1e-5, atol=1e-5)
    assert (part.logits[~valid] == 0).all() and (part.delta_norms[0][~valid] == 0).all()
    with pytest.raises(ValueError, match="prefix"):
        model(ids, n_loops=2, valid_BT=torch.tensor([[True, False, True, True, True, True]] * 2))
    with pytest.raises(ValueError, match="prefix"):  # the answer position must be kept
        model(ids, n_loops=2, valid_BT=valid, logits_at_B=torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, n_loops=2, valid_BT=valid, cache=KVCache())


def test_aux_loss_is_per_token_per_moe_layer_use_whatever_the_loop_count() -> None:
    """The looped MoE runs once per loop: the aux loss is the mean of its per-call losses, so its
    weight does not grow with the (sampled) loop count. A uniform router gives each call's minimum,
    aux_loss_coef · 1, at every loop count (the sum over loops gave n_loops times that)."""
    model = make_model(aux_loss_coef=0.1)
    ids_BT = torch.randint(0, model.cfg.vocab_size, (2, 8))
    calls: list[torch.Tensor] = []
    model.moe_layers()[0].router.register_forward_hook(lambda _m, _i, out: calls.append(out.aux_loss))
    for n_loops in (1, 3, 6):
        calls.clear()
        aux = model(ids_BT, n_loops).aux_loss
        assert len(calls) == n_loops
        torch.testing.assert_close(aux, torch.stack(calls).mean())
    with torch.no_grad():
        model.moe_layers()[0].router.gate.weight.zero_()
    for n_loops in (1, 3, 6):
        torch.testing.assert_close(model(ids_BT, n_loops).aux_loss, torch.tensor(0.1))
