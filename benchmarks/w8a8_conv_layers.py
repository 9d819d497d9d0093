"""Single W8A8 convolution layers (+ ReLU), compiled by slimc for this host, best-of-40 ms
with one thread: where a W8A8 network's time goes, layer type by layer type.

    python benchmarks/w8a8_conv_layers.py                  # l1 l4 dw pw
    python benchmarks/w8a8_conv_layers.py dw

``l1``: ResNet-18 layer1 3x3 (64->64, 56x56); ``l4``: layer4 3x3 (512->512, 7x7); ``dw``:
MobileNetV2 depthwise 3x3 (96, 112x112); ``pw``: pointwise 1x1 (96->24, 56x56). The op has
random integer weights (``tests/test_w8a8_conv.py``'s ``W8A8Conv``); min over calls, because
on a shared, loaded host the minimum is what the code costs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ["SLIMC_CACHE"] = "0"  # the case travels in an environment variable
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: name -> (in, out, kernel, stride, padding, dilation, groups, height, width)
LAYERS = {"l1": (64, 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 56, 56),
          "l4": (512, 512, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 7, 7),
          "dw": (96, 96, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 96, 112, 112),
          "pw": (96, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 56, 56)}


def factory():
    """``benchmarks/w8a8_conv_layers.py:factory``: the layer named by ``SLIMC_CONV_LAYER``."""
    import torch

    from tests.w8a8_reference import W8A8Conv

    spec = LAYERS[os.environ["SLIMC_CONV_LAYER"]]
    conv = W8A8Conv(spec, 3).eval()

    class Relu(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    return Relu().eval(), (torch.randn(1, spec[0], spec[7], spec[8]),)


def main(names: list[str]) -> int:
    import numpy as np
    from slimc.backends.tvm.runtime import NativeRunner

    import slimc

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "slimc-w8a8-conv-layers"
    for name in names or list(LAYERS):
        os.environ["SLIMC_CONV_LAYER"] = name
        result = slimc.compile_model(f"{Path(__file__).resolve()}:factory", slimc.CompileOptions(
            output=out / name, threads=1))
        runner = NativeRunner(result.output / "model.so", 1)
        spec = LAYERS[name]
        x = np.random.default_rng(0).standard_normal((1, spec[0], spec[7], spec[8]),
                                                     dtype=np.float32)
        best = float("inf")
        for _ in range(40):
            start = time.perf_counter()
            runner([x])
            best = min(best, time.perf_counter() - start)
        print(f"{name}: {best * 1e3:.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
