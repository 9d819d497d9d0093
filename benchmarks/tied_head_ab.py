"""A/B (issue 18): a tied embedding + output head of SmolLM2's shape (49152 x 576, 64 tokens).

Built tied (one ``E^T`` shared by the lookup and the head, head unpacked) and untied (head
packed into panels), run natively on 1 thread in interleaved rounds: per-call time, library
size, max difference from torch.

    python benchmarks/tied_head_ab.py
"""

from __future__ import annotations

import pathlib
import tempfile
import time

import numpy as np
import torch
from slimc.backends.tvm.build import build_library
from slimc.backends.tvm.lower import lower_to_relax
from slimc.backends.tvm.runtime import NativeRunner

from slimc.capture import capture
from slimc.loaders.base import LoadedModel
from slimc.targets import resolve_target


class EmbeddingHead(torch.nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(49152, 576)
        self.head = torch.nn.Linear(576, 49152, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.nn.functional.silu(self.emb(ids)))


def main() -> None:
    ids = torch.randint(0, 49152, (1, 64))
    work = pathlib.Path(tempfile.mkdtemp())
    runs = {}
    for tied in (True, False):
        torch.manual_seed(0)
        model = EmbeddingHead(tied).eval()
        ir, _ = capture(LoadedModel("head", model, {"ids": ids}))
        lib = build_library(lower_to_relax(ir), resolve_target("llvm"), work / f"h{tied}.so")
        runs[tied] = NativeRunner(lib, 1)
        out = runs[tied]([ids.numpy()])[0]
        diff = float(np.abs(out - model(ids).detach().numpy()).max())
        print(f"tied={tied}: max abs diff vs torch {diff:.2g}, "
              f"library {lib.stat().st_size / 1e6:.1f} MB")
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(7):
        for tied in (True, False):
            start = time.perf_counter()
            runs[tied]([ids.numpy()])
            times[tied].append(time.perf_counter() - start)
    tied_ms, untied_ms = (float(np.median(times[k])) * 1e3 for k in (True, False))
    print(f"median ms per call: tied {tied_ms:.1f}, untied {untied_ms:.1f}, "
          f"ratio {tied_ms / untied_ms:.2f}")


if __name__ == "__main__":
    main()
