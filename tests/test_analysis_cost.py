"""The cost analysis: exact counts checked against torch's FLOP counter, roofline properties."""

from __future__ import annotations

import pytest
import torch
from slimc.passes.analysis.cost import estimate_costs
from slimc.passes.analysis.hardware import get_hardware, hardware_for_target, hardware_table
from slimc.passes.analysis.op_costs import MATRIX_OPS
from torch.utils.flop_counter import FlopCounterMode

from slimc.capture import capture
from slimc.errors import UsageError
from slimc.loaders.base import LoadedModel
from slimc.targets import resolve_target
from tests.models import build_hf, small_cnn

torch.set_num_threads(2)


def _cnn():
    net, (image,) = small_cnn()
    ir, _ = capture(LoadedModel(name="cnn", module=net, example_inputs={"image": image}))
    return net, image, ir


def test_every_device_states_its_sources_and_targets_map_to_devices():
    table = hardware_table()
    assert {"host-znver4", "cortex-a72", "cortex-a78", "h100", "jetson-orin"} <= set(table)
    for hw in table.values():
        assert hw.sources and hw.peak_gflops["float32"] > 0 and hw.mem_bandwidth_gbs > 0
    # The host maps to its CPU's table entry, or to an estimate named after it that the cost
    # pass can look up by name (what `slimc analyze` hands it).
    from tvm.target import codegen

    host = hardware_for_target(resolve_target("llvm"))
    assert host.name == f"host-{codegen.llvm_get_system_cpu()}"
    assert get_hardware(host.name) == host
    assert hardware_for_target(resolve_target("raspberry-pi-4")).name == "cortex-a72"
    assert hardware_for_target(resolve_target("arm-v8.2")).name == "cortex-a78"
    assert get_hardware("orin-gpu").name == "jetson-orin"
    with pytest.raises(UsageError, match="Unknown hardware"):
        get_hardware("pdp-11")


def test_matrix_flops_equal_torch_flop_counter():
    net, image, ir = _cnn()
    cost = estimate_costs(ir, get_hardware("host-znver4"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(image)
    ours = sum(2 * n.macs for n in cost.nodes.values() if n.op in MATRIX_OPS)
    assert ours == counter.get_total_flops() > 0


def test_linear_counts_params_bytes_and_macs_per_module():
    model = build_hf("llama")
    model.config.use_cache = False
    ids = torch.randint(0, 128, (2, 16))
    ir, _ = capture(LoadedModel(name="llama", module=model, example_inputs={"input_ids": ids},
                                as_kwargs=True))
    cost = estimate_costs(ir, get_hardware("cortex-a72"))
    up = model.model.layers[0].mlp.up_proj
    row = cost.by_layer["model.layers.0.mlp.up_proj"]
    assert row["params"] == up.weight.numel()
    assert row["weight_bytes"] == up.weight.numel() * 4
    assert row["macs"] == 2 * 16 * up.in_features * up.out_features
    assert cost.by_module["model.layers.0.mlp.up_proj"]["macs"] == row["macs"]
    assert cost.total["params"] == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point())  # + rotary inv_freq
    assert cost.total["latency_s"] == pytest.approx(
        sum(n.latency_s for n in cost.nodes.values()))
    assert sum(r["nodes"] for r in cost.by_op.values()) == sum(
        1 for n in cost.nodes.values() if n.bound != "free")


def test_roofline_orders_devices_and_precision():
    _, _, ir = _cnn()
    latency = {name: estimate_costs(ir, get_hardware(name)).total["latency_s"]
               for name in ("cortex-a72", "cortex-a78", "h100")}
    assert latency["cortex-a72"] > latency["cortex-a78"]
    fp32 = estimate_costs(ir, get_hardware("cortex-a72"))
    head = next(n for n in ir.nodes("placeholder") if n.name == "p_head_weight")
    ir.annotations["weight_bits"] = {head.name: 4}
    int4 = estimate_costs(ir, get_hardware("cortex-a72"))
    assert int4.by_layer["head"]["weight_bytes"] * 8 == fp32.by_layer["head"]["weight_bytes"]
    assert int4.by_layer["head"]["latency_s"] <= fp32.by_layer["head"]["latency_s"]
    # weight-only int4 dequantizes and multiplies in float: priced at the float32 rate
    assert int4.nodes[next(iter(n.name for n in head.users))].dtype == "float32"


def test_int8_rate_follows_the_targets_dot_product():
    """W8A8 matmuls run at the table's int8 peak only with int8 dot-product instructions
    (VNNI, sdot), half of it with AVX2's two-instruction sequence, and at the float32 rate on a
    target without any (a generic widening kernel): no speed-up it cannot have. The target
    names resolve to their dot products through the backend's target-info."""
    from slimc.passes.analysis.cost import int8_peak
    from slimc.passes.analysis.target_info import target_info

    from slimc.targets import resolve_target

    host, a72, a78 = (get_hardware(n) for n in ("host-znver4", "cortex-a72", "cortex-a78"))
    assert int8_peak(host, "vnni") == host.peak_flops("int8")
    assert int8_peak(host, "avx2") == host.peak_flops("int8") / 2
    assert int8_peak(host, None) == host.peak_flops("float32")
    assert int8_peak(a78, "sdot") == 4 * a78.peak_flops("float32")
    assert int8_peak(a72, None) == a72.peak_flops("float32")
    dots = {t: target_info(resolve_target(t)).dot_product
            for t in ("x86-64-v4-vnni", "raspberry-pi-4", "arm-v8.2")}
    assert dots == {"x86-64-v4-vnni": "vnni", "raspberry-pi-4": None, "arm-v8.2": "sdot"}
