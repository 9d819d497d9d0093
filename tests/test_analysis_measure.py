"""`--measure`: real per-op TVM kernels, built and timed, cached on disk, preferred by the cost
model; and the same over TVM RPC against a local RPC server. No timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from slimc.passes.analysis import measure
from slimc.passes.analysis.measure import MeasuredTable, kernel_keys, measure_ir

from slimc.analyze import AnalysisContext
from slimc.capture import capture
from slimc.loaders.base import LoadedModel
from slimc.passmanager import AnalysisManager, PassManager
from slimc.plugins import get_registry
from slimc.targets import resolve_target
from tests.models import small_cnn

torch.set_num_threads(2)


@pytest.fixture
def cnn_ir():
    net, (image,) = small_cnn()
    ir, inputs = capture(LoadedModel(name="cnn", module=net, example_inputs={"image": image}))
    return ir, inputs


def _cost(ir, inputs, **options):
    ctx = AnalysisContext(target=resolve_target("llvm"), example_inputs=inputs,
                          calibration_batches=[inputs])
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(get_registry().passes).lookup)
    return ctx.analyses.get("cost", **options)


def test_measured_table_is_built_cached_reused_and_preferred(cnn_ir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    ir, inputs = cnn_ir
    keys = kernel_keys(ir)
    ops = {key.split("|")[0] for key in keys.values()}
    assert {"aten.conv2d", "aten.linear"} <= ops

    cost = _cost(ir, inputs, measure=True)
    info = cost.measured
    assert info["built"] == info["kernels"] == len(set(keys.values())) and not info["failed"]
    assert info["identity"]["threads"] == 2
    table = tmp_path / "cache" / "measured" / f"{info['target_hash']}.json"
    assert table.is_file()
    stored = json.loads(table.read_text())["entries"]
    assert set(stored) == set(keys.values())
    assert all(entry["seconds"] > 0 for entry in stored.values())
    for name in keys:  # the cost model prefers the measurement over the roofline
        node = cost.nodes[name]
        assert node.source == "measured"
        assert node.latency_s == node.measured_s == stored[keys[name]]["seconds"]
        assert node.roofline_s > 0
    assert cost.total["latency_s"] == pytest.approx(sum(n.latency_s for n in cost.nodes.values()))
    roofline = _cost(ir, inputs)
    assert all(n.measured_s is None for n in roofline.nodes.values())
    assert cost.total["roofline_s"] == pytest.approx(roofline.total["latency_s"])

    def no_build(*args, **kwargs):
        raise AssertionError("a cached kernel was rebuilt")

    monkeypatch.setattr(measure, "_build", no_build)
    again = measure_ir(ir, resolve_target("llvm"), threads=2)
    assert again.built == [] and set(again.reused) == set(keys.values())
    assert again.node_seconds() == {n: stored[k]["seconds"] for n, k in keys.items()}
    # Another thread count is another target identity: a separate table.
    assert MeasuredTable.load({**info["identity"], "threads": 1}).entries == {}


def _rpc_server():
    """TVM's own Python RPC server loop (rpc.Server wraps it in a PopenWorker that needs
    cloudpickle, which this environment lacks), in a child process."""
    code = ("from tvm.rpc.server import _popen_start_rpc_server, PopenRPCServerState as S\n"
            "port = _popen_start_rpc_server('127.0.0.1', 19090, 19190, silent=True)\n"
            "print(port, flush=True)\n"
            "S.current.thread.join()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        pytest.skip(f"the TVM RPC server did not start ({line!r})")
    return proc, int(line)


def test_measure_over_rpc(cnn_ir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "cache"))
    ir, _ = cnn_ir
    proc, port = _rpc_server()
    try:
        result = measure_ir(ir, resolve_target("llvm"), rpc=f"127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert result.built and not result.failed
    assert result.table.identity["device"] == f"rpc://127.0.0.1:{port}"
    assert result.table.path.is_file()
    assert set(result.node_seconds()) == set(kernel_keys(ir))


def test_cross_target_without_rpc_is_a_usage_error(cnn_ir, tmp_path, monkeypatch):
    from slimc.errors import UsageError

    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="--rpc"):
        measure_ir(cnn_ir[0], resolve_target("rpi4"))
    with pytest.raises(UsageError, match="HOST:PORT"):
        measure.parse_rpc("nonsense")
