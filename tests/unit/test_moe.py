"""MoE pieces: dispatch equals a naive per-expert reference, grouped matmul paths agree, balancing works."""

import pytest
import torch
import torch.nn.functional as F

from mythos_dist.model import moe as moe_mod
from mythos_dist.model.moe import MoEFFN, grouped_matmul


def naive_moe(layer: MoEFFN, x_BTD: torch.Tensor) -> torch.Tensor:
    """Reference: loop over tokens × chosen experts with the same router decisions."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    route = layer.router(x_ND)
    cap = layer.capacity(x_ND.shape[0])
    used = torch.zeros(layer.n_experts, dtype=torch.long)
    out = []
    for n in range(x_ND.shape[0]):
        y = torch.zeros_like(x_ND[n])
        for k in range(layer.top_k):
            e = int(route.expert_ids_NK[n, k])
            if cap is not None and used[e] >= cap:
                continue
            used[e] += 1
            gate, up = (x_ND[n] @ layer.experts.w_in_EDH[e]).chunk(2)
            y = y + route.weights_NK[n, k] * ((F.silu(gate) * up) @ layer.experts.w_out_EHD[e])
        out.append(y)
    y_ND = torch.stack(out)
    if layer.shared is not None:
        y_ND = y_ND + layer.shared(x_ND)
    return y_ND.view_as(x_BTD)


def make_layer(capacity_factor: float = 0.0, n_shared: int = 1) -> MoEFFN:
    torch.manual_seed(0)
    layer = MoEFFN(
        16,
        n_experts=6,
        top_k=2,
        expert_dim=8,
        n_shared=n_shared,
        shared_dim=8,
        capacity_factor=capacity_factor,
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
def test_dispatch_matches_naive_forward_and_grads(capacity_factor: float) -> None:
    layer = make_layer(capacity_factor)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y, _ = layer(x)
    y_ref = naive_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [x, layer.experts.w_in_EDH, layer.experts.w_out_EHD, layer.router.gate.weight]
    grads = torch.autograd.grad((y * g).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_drops_assignments() -> None:
    layer = make_layer(capacity_factor=0.25, n_shared=0)
    x = torch.randn(1, 24, 16)
    y, _ = layer(x)
    # cap = ceil(0.25·24·2/6) = 2 per expert: at most 12 of 48 assignments survive, so some tokens get 0.
    assert layer.capacity(24) == 2
    assert (y.abs().sum(-1) == 0).any()


def test_grouped_matmul_fallback_equals_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    y_fast = grouped_matmul(x, w, counts)
    gx_fast, gw_fast = torch.autograd.grad(y_fast.square().sum(), [x, w])
    monkeypatch.setattr(moe_mod, "_grouped_mm_works", lambda *a: False)
    y_loop = grouped_matmul(x, w, counts)
    gx_loop, gw_loop = torch.autograd.grad(y_loop.square().sum(), [x, w])
    ref = torch.cat([x[0:3] @ w[0], x[3:8] @ w[2], x[8:9] @ w[3]])
    torch.testing.assert_close(y_fast, ref)
    torch.testing.assert_close(y_loop, ref)
    torch.testing.assert_close(gx_fast, gx_loop)
    torch.testing.assert_close(gw_fast, gw_loop)
    assert gw_fast[1].abs().sum() == 0  # an expert with no tokens gets no gradient


def test_balancing_bias_moves_load_toward_uniform() -> None:
    torch.manual_seed(0)
    layer = MoEFFN(16, n_experts=8, top_k=2, expert_dim=8, n_shared=0, shared_dim=8, bias_update_rate=0.002)
    with torch.no_grad():  # skew the router toward experts 0 and 1
        layer.router.gate.weight.normal_(0, 0.3)
        layer.router.gate.weight[:2] += 0.4
    x = torch.randn(512, 16) + 0.5

    def load_cv() -> float:
        load = layer.router(x).tokens_per_expert_E.float()
        return float(load.std() / load.mean())

    cv_before = load_cv()
    layer.router.load_E.zero_()
    for _ in range(300):
        layer.router(x)
        layer.router.update_bias()
    cv_after = load_cv()
    assert cv_before > 1.0
    assert cv_after < 0.3 * cv_before
    assert layer.router.load_E.sum() > 0  # counting continues after an update


def test_bias_changes_selection_not_weights_gradient() -> None:
    """The balancing bias picks the experts; the weights (and their gradient) are those of the
    unbiased scores: two biases choosing the same experts give identical weights and gradients."""
    layer = make_layer()
    x = torch.randn(10, 16)
    layer.router.expert_bias.fill_(0.0)
    layer.router.expert_bias[0] = 10.0  # force expert 0 into every top-k
    route = layer.router(x)
    assert (route.expert_ids_NK == 0).any(-1).all()
    scores_NE = torch.softmax(layer.router.gate(x).float(), -1).detach()
    chosen_NK = scores_NE.gather(-1, route.expert_ids_NK)
    torch.testing.assert_close(route.weights_NK, chosen_NK / chosen_NK.sum(-1, keepdim=True))
    upstream_NK = torch.randn(10, layer.top_k)  # stands in for the task loss's gradient
    (g,) = torch.autograd.grad((route.weights_NK * upstream_NK).sum(), [layer.router.gate.weight])
    layer.router.expert_bias += 5.0  # the same shift for every expert: the same choice
    shifted = layer.router(x)
    assert torch.equal(shifted.expert_ids_NK, route.expert_ids_NK)
    (g_shifted,) = torch.autograd.grad((shifted.weights_NK * upstream_NK).sum(), [layer.router.gate.weight])
    assert torch.equal(shifted.weights_NK, route.weights_NK) and torch.equal(g_shifted, g)
    assert g.abs().sum() > 0  # the gate does learn from the weights
    assert not layer.router.expert_bias.requires_grad
    assert all(p is not layer.router.expert_bias for p in layer.parameters())  # not trained


def test_top1_gate_learns_from_the_task_loss() -> None:
    """top-1: the weight is the chosen expert's softmax probability (Switch), not a renormalised
    1, so the task loss reaches the gate with a gradient comparable to top-2's."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    grads = {}
    for k in (1, 2):
        torch.manual_seed(1)
        layer = MoEFFN(16, n_experts=4, top_k=k, expert_dim=8, n_shared=0, shared_dim=8)
        torch.nn.init.normal_(layer.experts.w_in_EDH, std=0.3)
        torch.nn.init.normal_(layer.experts.w_out_EHD, std=0.3)
        y, _ = layer(x)
        route = layer.router(x.reshape(-1, 16))
        if k == 1:
            scores_NE = torch.softmax(layer.router.gate(x.reshape(-1, 16)).float(), -1)
            torch.testing.assert_close(route.weights_NK, scores_NE.gather(-1, route.expert_ids_NK))
            assert (route.weights_NK < 1).all()
        (grads[k],) = torch.autograd.grad(y.square().mean(), [layer.router.gate.weight])
    assert grads[1].norm() > 0.05 * grads[2].norm() > 0, grads


def test_aux_loss_is_positive_and_differentiable() -> None:
    layer = MoEFFN(16, n_experts=4, top_k=1, expert_dim=8, n_shared=0, shared_dim=8, aux_loss_coef=0.1)
    _, aux = layer(torch.randn(2, 5, 16))
    assert aux > 0
    (g,) = torch.autograd.grad(aux, [layer.router.gate.weight])
    assert g.abs().sum() > 0


def test_grouped_products_ignore_rows_past_the_last_group() -> None:
    """A padded dispatch leaves rows past the last group: neither kernel lets them into a real
    row or a weight gradient (F.grouped_mm leaves them unwritten, the per-expert fallback zero)."""
    from mythos_dist.model.moe import _mm_groups

    torch.manual_seed(0)
    a, w = torch.randn(10, 16), torch.randn(2, 16, 8)
    a[7:] = float("nan")  # the padding: anything at all
    offs, counts = torch.tensor([3, 7], dtype=torch.int32), [3, 4]
    want = torch.cat([a[:3] @ w[0], a[3:7] @ w[1]])
    dy = torch.randn(10, 8)
    dy[7:] = float("nan")
    want_dw = torch.stack([a[:3].t() @ dy[:3], a[3:7].t() @ dy[3:7]])
    for c in (None, counts):  # grouped kernel, fallback
        torch.testing.assert_close(_mm_groups(a, w, offs, c)[:7], want)
        torch.testing.assert_close(_mm_groups(a.t(), dy, offs, c), want_dw)
    assert torch.equal(_mm_groups(a, w, offs, counts)[7:], torch.zeros(3, 8))
