"""The kernels of a model built on the ``-j`` threads (backends/tvm/parallel_build.py): real
TVM builds, whose libraries compute bit-identical results to the serial build's."""

from __future__ import annotations

import numpy as np
import torch

TARGET = "x86-64-v3"


class _SmallCnn(torch.nn.Module):
    """Convs of distinct shapes (each its own kernel), batch norms, pooling and a classifier:
    more kernels than :data:`~slimc.backends.tvm.parallel_build.MIN_KERNELS`."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c = 3
        for width, stride in ((16, 2), (24, 1), (32, 2), (40, 1), (48, 2)):
            layers += [torch.nn.Conv2d(c, width, 3, stride, 1), torch.nn.BatchNorm2d(width),
                       torch.nn.ReLU()]
            c = width
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(self.features(pixel_values), 1)
        return torch.softmax(self.head(torch.flatten(x, 1)), dim=-1)


def _ir():
    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    torch.manual_seed(0)
    model = _SmallCnn().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 32, 32)
    ir, _ = capture(LoadedModel("cnn", model, {"pixel_values": x}))
    with torch.no_grad():
        return ir, x.numpy(), model(x).numpy()


def _build(jobs: int, path, keep: dict | None = None):
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.lower import lower_to_relax

    from slimc.jobs import compile_jobs
    from slimc.targets import resolve_target

    ir, _, _ = _ir()
    with compile_jobs(jobs):
        return build_library(lower_to_relax(ir), resolve_target(TARGET), path,
                             **({"keep": keep} if keep is not None else {}))


def test_parallel_build_computes_what_the_serial_build_does(tmp_path):
    """The library built on 2 threads (kernels in 2 object files) and the one built serially
    give bit-identical outputs, both matching PyTorch."""
    from slimc.backends.tvm.runtime import NativeRunner

    _, x, want = _ir()
    outputs = {}
    for jobs in (1, 2):
        path = _build(jobs, tmp_path / f"model-j{jobs}.so")
        (outputs[jobs],) = NativeRunner(path, threads=1)([x])
    np.testing.assert_allclose(outputs[1], want, rtol=1e-4, atol=1e-5)
    assert np.array_equal(outputs[1], outputs[2])


def test_kernels_are_split_into_balanced_object_files(tmp_path):
    """``build_kernels`` on 2 jobs returns one ``static_library`` (an object file, linked as it
    is) per shard, every kernel in exactly one; on 1 job, TVM's single llvm module."""
    import tvm
    from slimc.backends.tvm.parallel_build import MIN_KERNELS, build_kernels

    from slimc.targets import resolve_target

    keep: dict = {}
    _build(1, tmp_path / "model.so", keep)
    kernels = tvm.IRModule({g: f for g, f in keep["scheduled"].functions_items()
                            if isinstance(f, tvm.tirx.PrimFunc)})
    assert len(kernels.get_global_vars()) >= MIN_KERNELS
    target = resolve_target(TARGET).tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        shards = build_kernels(kernels, target, jobs=2)
        serial = build_kernels(kernels, target, jobs=1)
    assert [m.kind for m in shards] == ["static_library", "static_library"]
    assert [m.kind for m in serial] == ["llvm"]


def test_balanced_shards_cover_every_kernel_once():
    from slimc.backends.tvm.parallel_build import _balanced_shards

    sizes = [900, 10, 10, 400, 500, 30, 20, 100]
    shards = _balanced_shards(sizes, 2)
    assert sorted(i for s in shards for i in s) == list(range(len(sizes)))
    totals = sorted(sum(sizes[i] for i in s) for s in shards)
    assert totals == [970, 1000]  # greedy, largest first: within one small kernel
    assert _balanced_shards([5, 7], 4) == [[1], [0]]  # never more shards than kernels
