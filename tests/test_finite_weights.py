"""The weight health check's one-pass min/max test agrees with ``torch.isfinite`` (issue 18:
the boolean-tensor check cost ~5 CPU-seconds per compile of a 320M decoder)."""

from __future__ import annotations

import pytest
import torch

from slimc.validate import _all_finite

SPECIALS = [float("nan"), float("inf"), float("-inf")]


def _reference(value: torch.Tensor, allow_neg_inf: bool) -> bool:
    finite = torch.isfinite(value)
    if allow_neg_inf:
        finite |= torch.isneginf(value)
    return bool(finite.all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("allow_neg_inf", [False, True])
def test_min_max_check_matches_isfinite(dtype, allow_neg_inf):
    torch.manual_seed(0)
    base = (torch.randn(48, 40) * 100).to(dtype)
    views = [lambda t: t, lambda t: t.t(), lambda t: t[:, ::3]]  # strided views too
    for special in [None, *SPECIALS]:
        for where in [(0, 0), (47, 39), (13, 21)]:
            value = base.clone()
            if special is not None:
                value[where] = special
            for view in views:
                got, want = _all_finite(view(value), allow_neg_inf), _reference(
                    view(value), allow_neg_inf)
                assert got == want, (dtype, special, where)


def test_all_minus_inf_mask_and_empty_tensors():
    assert _all_finite(torch.full((4, 4), float("-inf")), allow_neg_inf=True)
    assert not _all_finite(torch.full((4, 4), float("-inf")), allow_neg_inf=False)
    assert _all_finite(torch.empty(0), allow_neg_inf=False)
    both = torch.tensor([float("-inf"), float("inf")])
    assert not _all_finite(both, allow_neg_inf=True)


def test_trainable_parameters_are_checked_without_a_console_warning():
    """Weights of a freshly loaded model are ``requires_grad`` parameters; reading their min and
    max must not print torch's "Converting a tensor with requires_grad=True to a scalar"
    warning into the user's compile log."""
    import warnings

    weight = torch.nn.Parameter(torch.randn(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _all_finite(weight, allow_neg_inf=False)
        weight.data[2, 3] = float("nan")
        assert not _all_finite(weight, allow_neg_inf=False)
