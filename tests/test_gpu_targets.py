"""GPU targets without a GPU: what the libraries hold, and that every kernel is GPU-scheduled.

CUDA libraries must carry a compiled cubin for the requested ``sm_XX`` (parsed with
pyelftools: ``e_machine`` EM_CUDA, the SM number in ``e_flags``) and no CUDA source (nothing is
compiled when the library loads); OpenCL libraries carry the kernel source the driver compiles.
The GPU lowerings of the quantized ops are checked numerically by building the same
(unscheduled) PrimFuncs for the CPU.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from slimc import CompileOptions, compile_model

pytest.importorskip("elftools")
from elftools.elf.elffile import ELFFile  # noqa: E402

MODEL = "tests/test_gpu_targets.py:tiny_mlp"


def _have_nvcc() -> bool:
    from slimc.backends.tvm.cuda_binary import nvcc_bin_dir

    return nvcc_bin_dir() is not None


#: CUDA builds need nvcc (the `nvidia-cuda-nvcc` wheel is in the test extra); no GPU.
needs_nvcc = pytest.mark.skipif(not _have_nvcc(), reason="pip install 'slimc[cuda]' (nvcc)")


def tiny_mlp():
    """Embedding -> Linear -> LayerNorm -> GELU -> Linear -> softmax: matmul, GEMV-shaped,
    reduction and gather kernels in a few hundred parameters."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 32)
            self.up = torch.nn.Linear(32, 64)
            self.norm = torch.nn.LayerNorm(64)
            self.down = torch.nn.Linear(64, 32)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.up(self.emb(ids)))
            return self.down(torch.nn.functional.gelu(h)).softmax(-1)

    torch.manual_seed(0)
    return Net().eval(), {"ids": torch.randint(0, 50, (2, 8))}


def cubins(library: Path) -> list[ELFFile]:
    """The CUDA ELF images embedded in a host shared library (every ELF after the host's)."""
    data = library.read_bytes()
    starts = [m.start() for m in re.finditer(b"\x7fELF", data)][1:]
    return [ELFFile(io.BytesIO(data[s:])) for s in starts]


def sm_of(cubin: ELFFile) -> int:
    return (cubin["e_flags"] >> 8) & 0xFF


def kernels(cubin: ELFFile) -> set[str]:
    return {s.name[len(".text."):] for s in cubin.iter_sections() if s.name.startswith(".text.")}


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "mlp.slimc"
    result = compile_model(MODEL, CompileOptions(target="h100", output=out))
    return result


@needs_nvcc
def test_cuda_library_holds_a_cubin_for_the_tagged_arch(cuda_artifact):
    library = cuda_artifact.output / cuda_artifact.manifest["library"]
    images = [c for c in cubins(library) if c["e_machine"] == "EM_CUDA"]
    assert len(images) == 1
    assert sm_of(images[0]) == 90  # nvidia/nvidia-h100 -> sm_90a
    names = kernels(images[0])
    assert any("matmul" in n for n in names) and any("layer_norm" in n or "mean" in n
                                                      for n in names)
    assert b"__global__" not in library.read_bytes()  # no CUDA source to compile at load time
    # The packed module the TVM runtime loads says "cubin" (format "cuda" would be compiled
    # from source when loaded) and holds the same ELF.
    from slimc.backends.tvm.cuda_binary import cuda_modules, library_blob

    ((fmt, code),) = cuda_modules(library_blob(library))
    assert fmt == "cubin" and code[:4] == b"\x7fELF"
    assert sm_of(ELFFile(io.BytesIO(code))) == 90


@needs_nvcc
def test_cuda_artifact_is_written_unverified_and_run_says_why(cuda_artifact, cli):
    verification = cuda_artifact.manifest["verification"]
    assert verification["passed"] is None
    assert verification["reason"] == "built, not verified: no CUDA device"
    assert cuda_artifact.manifest["target"]["backend"] == "tvm-cuda"
    assert any("no CUDA device" in w for w in cuda_artifact.warnings)
    result = cli("run", cuda_artifact.output)
    assert result.code == 2
    assert "built, not verified: no CUDA device" in result.err


@needs_nvcc
def test_cuda_arch_option_and_int4_weights(tmp_path):
    """``cuda:arch=sm_80`` picks the arch; int4 weight-only GEMMs build with the dequant inside
    the matmul kernel (no separate decode kernel)."""
    result = compile_model(MODEL, CompileOptions(
        target="cuda:arch=sm_80", pipeline="quantize{weights=int4,group_size=32}",
        output=tmp_path / "q"))
    (image,) = cubins(result.output / result.manifest["library"])
    assert sm_of(image) == 80
    names = kernels(image)
    assert any(n.startswith("gpu_linear_int4") for n in names)
    assert not any("decode" in n for n in names)


def test_every_gpu_kernel_is_bound_to_threads_within_limits():
    """dlight schedules every kernel of a model; the checker rejects the unscheduled module."""
    import tvm
    from slimc.backends.tvm.gpu import check_gpu_kernels, schedule_for_gpu, unbound_loops
    from tvm.relax.frontend.torch import from_exported_program

    from slimc.errors import LoweringError

    model, inputs = tiny_mlp()
    program = torch.export.export(model, tuple(inputs.values()))
    mod = from_exported_program(program, keep_params_as_input=False)
    target = tvm.target.Target("nvidia/nvidia-a100")
    scheduled = schedule_for_gpu(mod, target)
    report = check_gpu_kernels(scheduled, target)
    assert len(report) >= 4
    assert all(v["shared_bytes"] <= 49152 for v in report.values())
    with target:
        legalized = tvm.relax.transform.LegalizeOps()(mod)
    funcs = [f for _, f in legalized.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(unbound_loops(f) for f in funcs)
    with pytest.raises(LoweringError, match="not bound to GPU threads"):
        check_gpu_kernels(legalized, target)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp16", "bf16"])
def test_gpu_linear_lowering_matches_the_dialect(kind):
    """The GPU decode+matmul PrimFunc, built for the CPU, against the reference maths."""
    import tvm
    from slimc.backends.tvm.gpu_quantized import linear_func
    from slimc.passes.quantize.formats import int4_codes, int4_params, pack_int4

    from slimc.dialect import dequantize_int4, dequantize_int8

    m, k, n, group = 3, 40, 8, 16
    torch.manual_seed(1)
    w, x = torch.randn(n, k), torch.randn(m, k)
    if kind == "int8":
        scale = w.abs().amax(1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        args, dense = [q, scale], dequantize_int8(q, scale)
        func = linear_func("int8", m, k, n)
    elif kind == "int4":
        params = int4_params(w, group, False)
        packed = pack_int4(int4_codes(w, params))
        args = [packed, params.scale, params.zero]
        dense = dequantize_int4(packed, params.scale, params.zero, group, k)
        func = linear_func("int4", m, k, n, group, params.scale.shape[1])
    else:
        stored = w.to(torch.float16 if kind == "fp16" else torch.bfloat16)
        args, dense = [stored], stored.float()
        func = linear_func(kind, m, k, n)
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    tensors = [tvm.runtime.from_dlpack(a.contiguous()) for a in [x, *args]]
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["main"](*tensors, out)
    np.testing.assert_allclose(out.numpy(), (x @ dense.t()).numpy(), rtol=1e-5, atol=1e-5)


def test_opencl_and_metal_hold_kernel_source_and_vulkan_says_why(tmp_path, cli):
    opencl = compile_model(MODEL, CompileOptions(target="opencl", output=tmp_path / "cl"))
    data = (opencl.output / opencl.manifest["library"]).read_bytes()
    assert data.count(b"__kernel void") >= 4
    assert opencl.manifest["verification"]["passed"] is None

    metal = compile_model(MODEL, CompileOptions(target="metal", output=tmp_path / "mtl"))
    archive = metal.output / metal.manifest["library"]
    assert archive.suffix == ".tar"
    with tarfile.open(archive) as tar:
        objects = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert all(blob[:4] == b"\xcf\xfa\xed\xfe" for blob in objects.values())  # Mach-O 64
    assert any(b"kernel void" in blob for blob in objects.values())  # Metal shader source

    result = cli("compile", MODEL, "--target", "vulkan", "-o", tmp_path / "vk")
    assert result.code == 2
    assert "SPIR-V" in result.err and not (tmp_path / "vk").exists()


def test_targets_say_what_they_compile_to_and_need(cli):
    result = cli("targets", "--json")
    rows = {r["name"]: r for r in json.loads(result.out)["targets"]}
    for name in ("llvm", "arm", "cuda", "h100", "jetson-orin", "opencl", "mali", "adreno",
                 "metal"):
        row = rows[name]
        assert row["available"] and row["compiles_to"] and row["build_needs"]
        assert row["run_needs"] and row["verified_by"]
    assert "sm_87" in rows["jetson-orin"]["compiles_to"]
    assert "aarch64" in rows["jetson-orin"]["compiles_to"]
    assert not rows["vulkan"]["available"] and "SPIR-V" in rows["vulkan"]["reason"]


@needs_nvcc
def test_cuda_arch_nvcc_cannot_build_is_a_usage_error(cli, tmp_path):
    result = cli("compile", MODEL, "--target", "cuda:arch=sm_70", "-o", tmp_path / "old")
    assert result.code == 2 and "sm_70" in result.err and "sm_75" in result.err


class RecordingCpuBackend:
    """A third-party backend (through ``slimc_register_backends``): the CPU backend's build,
    under its own name, recording what the driver asked of it."""

    name = "recording-cpu"
    aliases = ()
    kinds = ()

    def __init__(self) -> None:
        from slimc.backends.tvm.cpu import TvmCpuBackend

        self.inner, self.calls = TvmCpuBackend(), []

    def __getattr__(self, attr):
        method = getattr(self.inner, attr)

        def record(*args, **kwargs):
            self.calls.append(attr)
            return method(*args, **kwargs)

        return record


def test_a_plugin_backend_gets_the_whole_compile(tmp_path):
    """The driver knows no code generator by name: a target naming a plugin's backend is
    checked, lowered, built and verified by that backend alone."""
    from slimc.hookspec import hookimpl
    from slimc.plugins import build_registry
    from slimc.targets import TargetSpec

    backend = RecordingCpuBackend()

    class Plugin:
        @hookimpl
        def slimc_register_backends(self):
            return [backend]

        @hookimpl
        def slimc_register_targets(self):
            return [TargetSpec(name="recorded", description="host CPU via a plugin backend",
                               tvm={"kind": "llvm"}, backend="recording-cpu")]

    registry = build_registry([Plugin()])
    result = compile_model(MODEL, CompileOptions(target="recorded", output=tmp_path / "r"),
                           registry=registry)
    assert result.manifest["target"]["backend"] == "recording-cpu"
    assert result.manifest["verification"]["passed"] is True
    for step in ("check", "lower", "build", "run", "required_isa"):
        assert step in backend.calls


# -- generation (prefill + decode over a KV cache) on CUDA -------------------------------------

GEN = dict(generate=True, max_length=48, prefill_length=8, threads=1)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, vocab_size=128, max_position_embeddings=64,
                           num_key_value_heads=2)
    config.architectures = ["LlamaForCausalLM"]
    path = tmp_path_factory.mktemp("llama") / "model"
    T.LlamaForCausalLM(config).eval().save_pretrained(path)
    return str(path)


def vm_functions(library: Path) -> set[str]:
    """Names of the Relax VM functions packed into a (GPU) library, read without a device."""
    import tvm
    from slimc.backends.tvm.cuda_binary import _read_bytes, _read_u64, library_blob

    blob = library_blob(library)
    pos = 8
    for _ in range(2):
        count, pos = _read_u64(blob, pos)
        pos += 8 * count
    while pos < len(blob):
        kind, pos = _read_bytes(blob, pos)
        if kind == b"_lib":
            continue
        payload, pos = _read_bytes(blob, pos)
        if kind == b"relax.VMExecutable":
            load = tvm.get_global_func("ffi.Module.load_from_bytes.relax.VMExecutable")
            return set(re.findall(r"^@(\w+)", load(payload)["as_text"](), re.M))
    return set()


@needs_nvcc
def test_cuda_generation_artifact_builds_with_both_entry_points(tiny_llama, tmp_path, cli):
    """``--generate --target h100``: one cubin for sm_90 with every kernel GPU-scheduled (the
    build's kernel-binding check passed), ``prefill``/``decode`` entry points, the manifest's
    generation section, written unverified; ``slimc generate`` says why it cannot run here."""
    result = compile_model(tiny_llama, CompileOptions(target="h100", output=tmp_path / "g",
                                                      **GEN))
    manifest = result.manifest
    library = result.output / manifest["library"]
    (image,) = [c for c in cubins(library) if c["e_machine"] == "EM_CUDA"]
    assert sm_of(image) == 90
    names = kernels(image)
    assert any("matmul" in n for n in names) and any("softmax" in n for n in names)
    assert b"__global__" not in library.read_bytes()
    assert {"prefill", "decode"} <= vm_functions(library)
    generation = manifest["generation"]
    assert generation["max_length"] == 48 and generation["prefill_length"] == 8
    assert set(generation["entry_points"]) == {"prefill", "decode"}
    assert generation["layers"] == 2 and generation["kv_heads"] == 2
    assert manifest["target"]["backend"] == "tvm-cuda"
    assert manifest["verification"]["passed"] is None
    assert manifest["verification"]["reason"] == "built, not verified: no CUDA device"

    run = cli("generate", result.output, "--prompt", "hello", "--max-new-tokens", "2")
    assert run.code == 2, run.err
    assert "built, not verified: no CUDA device" in run.err


def test_generate_on_a_backend_without_a_generation_runtime_is_a_usage_error(
        tiny_llama, tmp_path, cli):
    result = cli("compile", tiny_llama, "--generate", "--target", "opencl",
                 "-o", tmp_path / "cl")
    assert result.code == 2
    assert "--generate is not available for opencl" in result.err and "cuda" in result.err
    assert not (tmp_path / "cl").exists()


def test_generation_loop_keeps_the_cache_on_a_device(tiny_llama, tmp_path):
    """The device path of the loop (cache as device tensors, rows copied device-to-device,
    logits copied back) driven with an explicit device (the CPU here; cuda:0 on a GPU) gives
    the host path's tokens, logits and cache contents exactly."""
    import tvm

    import slimc
    from slimc.generation.loop import Generator, Sampling

    out = compile_model(tiny_llama, CompileOptions(output=tmp_path / "cpu", **GEN)).output
    model = slimc.load(out)
    host = model.generator()
    assert host.device is None
    device = Generator(model._runner.vm, model.manifest["generation"], device=tvm.cpu())
    prompt = [(7 * i) % 128 for i in range(21)]  # three prefill chunks
    for sampling in (Sampling(), Sampling(temperature=0.8, top_k=20, seed=3)):
        tokens, stats = host.generate(prompt, 8, sampling)
        dev_tokens, dev_stats = device.generate(prompt, 8, sampling)
        assert dev_tokens == tokens
        np.testing.assert_array_equal(dev_stats.first_logits, stats.first_logits)
        for cache, tensor in zip(host.caches, device.cache_tensors, strict=True):
            np.testing.assert_array_equal(tensor.numpy(), cache)


@needs_nvcc
def test_cuda_kernels_compile_with_ieee_math():
    """TVM compiles CUDA with --use_fast_math by default, under which powf(x, 2.0f) is
    exp2(2 * log2(x)): NaN for negative x, so every RMSNorm (Llama, T5) and GELU-tanh (GPT-2)
    artifact computed NaN on an H200 (measured: docs/benchmarks.md, session 26). In the PTX,
    fast math's powf is one ``lg2.approx`` + ``ex2.approx``; IEEE powf has no ``lg2``."""
    from slimc.backends.tvm.cuda_binary import compile_cubin

    source = ('extern "C" __global__ void square(float* y, const float* x) '
              '{ y[threadIdx.x] = powf(x[threadIdx.x], 2.0f) + expf(x[threadIdx.x]); }')
    ptx = compile_cubin(source, "sm_90a", target_format="ptx").decode()
    assert ".entry square" in ptx
    assert "lg2.approx" not in ptx
