"""RMSNorm with a hand-written backward on CPU.

torch's RMSNorm is composite on CPU: ~8 kernels forward and ~14 backward per call, and the looped
model calls it 3× per loop. This one is 6 forward and 8 backward (statistics in fp32). With
create_graph its backward recomputes the statistics from x, so second derivatives (the double-vjp
Jacobian products of mythos_dist.stability) are exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x / rms(x), 1 / rms(x)), in fp32 (float64 stays float64)."""
        x32 = x if x.dtype == torch.float64 else x.float()
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
        return x32 * rstd, rstd

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xhat, rstd = _RMSNormFn.normalize(x, eps)
        ctx.save_for_backward(x, weight, xhat, rstd)
        ctx.eps = eps
        return (xhat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, xhat, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: recompute from x so second derivatives are exact
            xhat, rstd = _RMSNormFn.normalize(x, ctx.eps)
        g32 = grad.to(xhat.dtype)
        grad_w = (g32 * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        g_xhat = g32 * weight
        grad_x = rstd * (g_xhat - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
        return grad_x.to(grad.dtype), grad_w.to(weight.dtype), None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight over the last dim; same parameters as nn.RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # torch has fused RMSNorm kernels there
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return _RMSNormFn.apply(x, self.weight, self.eps)
