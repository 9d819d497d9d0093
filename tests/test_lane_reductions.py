"""Row reductions summed in vector lanes (``RowReduction``'s ``rfactor`` accumulators).

Layer norm, RMS norm and softmax rows of the lengths real models use, built with slimc's
pipeline and compared with PyTorch; the scheduled kernels are checked for the shape of the
lane reduction (``rfactor`` blocks under the row loop, vectorized at the target's width),
and a few are rebuilt for aarch64 (NEON, 4 lanes) and run under qemu.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from slimc.targets import resolve_target
from tests.test_schedules import Norms, _build_run, _check, _lower


def _scheduled(module, inputs, target: str = "llvm") -> list[str]:
    """TVMScript of every row-reduction kernel of ``module``, as the CPU rules schedule it."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func

    spec = resolve_target(target).tvm_target()
    with spec:
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs))
    return [schedule_prim_func(f, spec, name=gv.name_hint).script()
            for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("kind,shape", [
    ("layernorm", (1, 197, 384)),   # ViT-Small: 4 accumulators of 16 lanes
    ("rmsnorm", (2, 3, 576)),       # SmolLM2
    ("softmax", (1, 2, 9, 1500)),   # Whisper: 1500 = 375 x 4 lanes
    ("softmax", (1, 3, 5, 197)),    # ViT: a prime row keeps the scalar chain
    ("layernorm", (3, 40)),         # shorter than two chunks of 16
])
def test_lane_reductions_match_pytorch(kind, shape, tmp_path, caplog):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1  # an offset mean: the variance pass must subtract it
    _check(Norms(kind, shape[-1]), (x,), tmp_path, caplog, "row-reduction", tol=1e-5)


def _lane_widths(text: str) -> list[int]:
    """Widths of the vectorized loops that update ``rfactor`` partials."""
    pattern = r"T\.vectorized\(T\.int64\((\d+)\)\):\s*\n\s*with T\.sblock\(\"\w+_rf_update"
    return [int(match.group(1)) for match in re.finditer(pattern, text)]


def test_layer_norm_is_reduced_in_lanes_on_x86_and_neon():
    x = (torch.randn(1, 197, 384),)
    for target, lanes in (("llvm", None), ("arm", 4)):
        texts = [t for t in _scheduled(Norms("layernorm", 384), x, target) if "_rf" in t]
        assert texts, target
        widths = _lane_widths(texts[0])
        # sum and variance: k accumulators of a vector each, then one vector
        assert len(widths) == 4, texts[0]
        if lanes is not None:
            assert widths == [4 * lanes, lanes] * 2, widths
        else:
            assert widths[1] in (4, 8, 16) and widths[0] == 4 * widths[1], widths
        # the partials are computed per row: no row-sized scratch buffer
        assert "T.parallel" in texts[0] or target == "arm"


def test_prime_rows_keep_the_scalar_chain():
    texts = _scheduled(Norms("softmax", 197), (torch.randn(1, 2, 7, 197),))
    assert texts and not any("_rf" in t for t in texts)


def test_lane_reductions_on_aarch64_under_qemu(tmp_path, aarch64_emulator):
    torch.manual_seed(0)
    for kind, shape in (("layernorm", (2, 3, 96)), ("softmax", (1, 2, 3, 36))):
        module = Norms(kind, shape[-1])
        x = torch.randn(*shape) * 2 + 0.5
        got, _ = _build_run(module, (x,), tmp_path, target="arm", cross="aarch64-linux-gnu")
        with torch.no_grad():
            want = module(x).numpy()
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
