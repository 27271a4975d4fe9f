"""Model builders and tolerance checks shared by the test files."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batch_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-default running stats and affine parameters, so a fused path
    that ignored any of them could not pass."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
    return model


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e|: one number per tensor, insensitive to near-zero elements."""
    assert not torch.isnan(actual).any(), "NaN in the result"
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def assert_low_precision_close(fused: torch.Tensor, unfused: torch.Tensor, exact: torch.Tensor, factor: float = 2.0):
    """The fused result's error against an fp64 ``exact`` is at most ``factor`` × the error of
    the unfused PyTorch computation in the same dtype (plus one ulp-scale floor for the cases
    where the unfused path happens to be exact)."""
    fused_err = (fused.double() - exact).abs().max().item()
    unfused_err = (unfused.double() - exact).abs().max().item()
    floor = torch.finfo(fused.dtype).eps * exact.abs().max().item()
    assert not torch.isnan(fused).any(), "NaN in the fused result"
    assert fused_err <= factor * unfused_err + floor, f"fused error {fused_err:.3g} > {factor} x unfused {unfused_err:.3g}"
