import math

import pytest
import torch

from mythos_dist.config import ModelConfig
from mythos_dist.model import RDT
from mythos_dist.stability import (
    contraction_ratios,
    injection_radius,
    jacobian_spectral_radius,
    spectral_report,
)


def seeded(seed: int) -> torch.Generator:
    """On the default device, so the tests also run under MYTHOS_TEST_DEVICE=cuda (tests/conftest.py)."""
    return torch.Generator(torch.get_default_device()).manual_seed(seed)


def tiny_model(**kw) -> RDT:
    torch.manual_seed(0)
    return RDT(ModelConfig(dim=32, n_heads=4, n_kv_heads=2, expert_dim=16, n_experts=4, **kw)).eval()


def test_radius_diagonal_map():
    d_N = torch.tensor([0.3, -0.95, 0.5, 0.1, 0.7])
    est = jacobian_spectral_radius(lambda x: d_N * x, torch.zeros(5), 80)
    assert est.radius == pytest.approx(0.95, rel=1e-3)
    assert est.rayleigh == pytest.approx(-0.95, rel=1e-3)  # signed dominant eigenvalue


def test_radius_nonnormal_linear_map_with_known_spectrum():
    g = seeded(1)
    eig = torch.tensor([0.9, 0.6, -0.5, 0.3, 0.2, -0.1, 0.05, 0.0])
    Q = torch.randn(8, 8, generator=g, dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64)
    M = Q @ torch.diag(eig.double()) @ torch.linalg.inv(Q)  # non-normal, eigenvalues = eig
    assert torch.linalg.matrix_norm(M, 2) > 1.0  # one step can grow though ρ < 1
    est = jacobian_spectral_radius(lambda x: M @ x, torch.zeros(8, dtype=torch.float64), 200)
    assert est.radius == pytest.approx(0.9, rel=2e-2)


def test_radius_complex_pair_dominant():
    # rotation by 1 rad scaled by 0.8 (eigenvalues 0.8·e^{±i}) next to a real 0.5
    c, s = 0.8 * math.cos(1.0), 0.8 * math.sin(1.0)
    M = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    est = jacobian_spectral_radius(lambda x: M @ x, torch.zeros(3, dtype=torch.float64), 60)
    assert est.radius == pytest.approx(0.8, rel=1e-3)


@pytest.mark.parametrize("value", [1e4, -1e4])
def test_rho_A_below_one_at_extreme_parameters(value):
    model = tiny_model()
    with torch.no_grad():
        model.recurrent.injection.log_A.fill_(value)
        model.recurrent.injection.log_dt.fill_(value)
    rho = injection_radius(model)
    assert 0 <= rho < 1


def test_contraction_ratios_from_deltas():
    deltas = [torch.full((2, 3), 4.0), torch.full((2, 3), 2.0), torch.full((2, 3), 1.0)]
    assert contraction_ratios(deltas) == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_spectral_report_real_model_at_init_is_finite(attn_type):
    model = tiny_model(attn_type=attn_type)
    ids_BT = torch.randint(0, 10, (2, 9), generator=seeded(0))
    rep = spectral_report(model, ids_BT, n_loops=4, n_iters=12)
    assert 0 < rep["rho_A"] < 1
    assert math.isfinite(rep["jacobian_radius"]) and rep["jacobian_radius"] > 0
    assert len(rep["contraction_ratios"]) == 3
    assert all(math.isfinite(r) for r in rep["contraction_ratios"])
    assert not model.training


def test_jacobian_radius_matches_dense_jacobian_on_model():
    """On a small state the dense Jacobian is computable: compare with its eigenvalues."""
    from mythos_dist.stability import loop_state

    model = tiny_model()
    ids_BT = torch.randint(0, 10, (1, 4), generator=seeded(2))

    model.double()
    h64, _, _, step = loop_state(model, ids_BT, 3)
    h64 = h64.detach()
    f = lambda s: step(s, 3)  # noqa: E731
    J = torch.autograd.functional.jacobian(f, h64).reshape(h64.numel(), h64.numel())
    rho = torch.linalg.eigvals(J).abs().max().item()
    est = jacobian_spectral_radius(f, h64, 300)
    assert est.radius == pytest.approx(rho, rel=5e-2)


class _SavedBytes:
    """Bytes of tensors held by autograd graphs, now and at most (saved_tensors_hooks)."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor) -> "_Held":
        return _Held(self, t.detach())  # detached: holding the tensor itself would make a cycle

    @staticmethod
    def unpack(held: "_Held") -> torch.Tensor:
        return held.t


class _Held:
    def __init__(self, counter: _SavedBytes, t: torch.Tensor) -> None:
        self.counter, self.t, self.n = counter, t, t.numel() * t.element_size()
        counter.now += self.n
        counter.peak = max(counter.peak, counter.now)

    def __del__(self) -> None:
        self.counter.now -= self.n


def test_spectral_report_in_blocks_equals_one_graph_and_holds_one_blocks_graph():
    """batch_size=2 over 7 samples (blocks of 2, 2, 1, 2): the same radius, Rayleigh quotient and
    contraction ratios as one graph of all 7, with at most ~2/7 of its saved activations alive."""
    model = tiny_model()
    ids_BT = torch.randint(0, 10, (7, 9), generator=seeded(4))
    valid_BT = torch.ones(7, 9, dtype=torch.bool)
    valid_BT[3, 6:] = False  # right padding in one sample
    held = {}
    reports = {}
    for bs in (None, 2):
        counter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            reports[bs] = spectral_report(model, ids_BT, 3, valid_BT, n_iters=16, batch_size=bs)
        held[bs] = counter.peak
    whole, blocks = reports[None], reports[2]
    assert blocks["jacobian_radius"] == pytest.approx(whole["jacobian_radius"], rel=1e-5)
    assert blocks["jacobian_rayleigh"] == pytest.approx(whole["jacobian_rayleigh"], rel=1e-4, abs=1e-6)
    assert blocks["jacobian_norm_ratios"] == pytest.approx(whole["jacobian_norm_ratios"], rel=1e-5)
    assert blocks["contraction_ratios"] == whole["contraction_ratios"]
    assert 0 < held[2] <= 0.4 * held[None], held  # the largest block holds 2 of 7 samples
    with pytest.raises(ValueError, match="batch_size"):
        spectral_report(model, ids_BT, 3, batch_size=0)
