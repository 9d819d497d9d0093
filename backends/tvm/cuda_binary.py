"""Compile the CUDA kernels of a built module ahead of time, so no source is compiled at load.

TVM 0.27's CUDA codegen on a machine without the CUDA runtime keeps each device module as CUDA
C++ (format ``cuda``); the runtime would compile it when the library is loaded, through a
Python callback (NVRTC or nvcc), which a C++-only deployment does not have. slimc compiles that
source here with nvcc (the ``nvidia-cuda-nvcc`` wheel: ``pip install slimc[cuda]``) into a
cubin for the target's ``sm_XX`` and stores the cubin in the library instead.

The swap happens where ``export_library`` packs imported modules (``fpack_imports``): the
serialized module tree (``runtime.ModulePackImportsToTensor``) is rewritten so each ``cuda``
module's format and code become ``cubin`` and the binary. The layout is TVM's (one ``u64``
length before every string/bytes field): ``[u64 size][import tree: u64 n, u64[n], u64 m,
u64[m]]`` then per module ``[kind]`` and, unless the kind is ``_lib``, ``[payload]``; a CUDA
payload is ``[fmt][function table][code]``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from slimc.errors import LoweringError, UsageError


def nvcc_bin_dir() -> Path | None:
    """Folder of an ``nvcc`` that can compile (pip wheel first, then ``PATH``/``CUDA_PATH``)."""
    try:
        import nvidia

        for root in map(Path, nvidia.__path__):
            for candidate in sorted(root.glob("cu*/bin/nvcc"), reverse=True):
                return candidate.parent
    except ImportError:
        pass
    if os.environ.get("CUDA_PATH") and (Path(os.environ["CUDA_PATH"]) / "bin/nvcc").exists():
        return Path(os.environ["CUDA_PATH"]) / "bin"
    found = shutil.which("nvcc")
    return Path(found).parent if found else None


def require_nvcc() -> Path:
    found = nvcc_bin_dir()
    if found is None:
        raise UsageError("Building for CUDA needs nvcc, which was not found.",
                         hint="pip install 'slimc[cuda]' (the nvidia-cuda-nvcc wheel, CUDA 13) "
                         "or put a CUDA toolkit's bin/ on PATH. No GPU is needed to build.")
    return found


def compile_cubin(source: str, arch: str, target_format: str = "cubin") -> bytes:
    """``source`` (CUDA C++) -> cubin for ``arch`` (``sm_90a``...) with nvcc (``ptx``: the
    assembly instead, which tests read)."""
    from tvm.support import nvcc

    bin_dir = require_nvcc()
    old_path = os.environ.get("PATH", "")
    old_fast_math = os.environ.get(_NO_FAST_MATH)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old_path}"
    # IEEE math, not nvcc's --use_fast_math (TVM's default): under fast math powf(x, 2.0f)
    # becomes exp2(2 * log2(x)), NaN for every negative x -- each RMSNorm's x ** 2 and GELU-tanh's
    # x ** 3 -- so every Llama/GPT-2/T5-family artifact computed NaN on an H200 (host numerics,
    # built for the CPU, could not see it).
    os.environ[_NO_FAST_MATH] = "1"
    try:
        # TVM picks ptxas options from the current target's arch: one for arch if none is set
        import tvm

        current = tvm.target.Target.current(allow_none=True)
        with contextlib.nullcontext() if current is not None else tvm.target.Target(
                {"kind": "cuda", "arch": arch}):
            return bytes(nvcc.compile_cuda(source, target_format=target_format, arch=arch,
                                           compiler="nvcc"))
    except RuntimeError as exc:
        tail = "\n".join(str(exc).splitlines()[-6:])
        raise LoweringError(f"nvcc could not compile the CUDA kernels for {arch}: {tail}",
                            hint="Please report it with the model (--save-ir keeps the IR).") \
            from exc
    finally:
        os.environ["PATH"] = old_path
        if old_fast_math is None:
            os.environ.pop(_NO_FAST_MATH, None)
        else:
            os.environ[_NO_FAST_MATH] = old_fast_math


#: TVM's switch (``tvm/support/nvcc.py``) that drops ``--use_fast_math`` from its nvcc command.
_NO_FAST_MATH = "TVM_CUDA_NVCC_NO_FAST_MATH"


def _read_u64(blob: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", blob, pos)[0], pos + 8


def _read_bytes(blob: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = _read_u64(blob, pos)
    return blob[pos:pos + size], pos + size


def _pack(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def replace_cuda_code(blob: bytes, compile_source: Callable[[str], bytes]) -> tuple[bytes, int]:
    """Rewrite every ``cuda`` module of a packed module tree to hold a cubin; returns the new
    blob and how many modules were compiled."""
    pos = 8  # total size, rewritten at the end
    header_start = pos
    for _ in range(2):  # import tree: row pointers, child indices
        count, pos = _read_u64(blob, pos)
        pos += 8 * count
    out = [blob[header_start:pos]]
    compiled = 0
    while pos < len(blob):
        kind, pos = _read_bytes(blob, pos)
        out.append(_pack(kind))
        if kind == b"_lib":
            continue
        payload, pos = _read_bytes(blob, pos)
        if kind == b"cuda":
            payload = _cuda_payload_to_cubin(payload, compile_source)
            compiled += 1
        out.append(_pack(payload))
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body, compiled


def cuda_modules(blob: bytes) -> list[tuple[str, bytes]]:
    """``(format, code)`` of every ``cuda`` module in a packed module tree (for checks)."""
    pos = 8
    for _ in range(2):
        count, pos = _read_u64(blob, pos)
        pos += 8 * count
    found = []
    while pos < len(blob):
        kind, pos = _read_bytes(blob, pos)
        if kind == b"_lib":
            continue
        payload, pos = _read_bytes(blob, pos)
        if kind == b"cuda":
            fmt, _ = _read_bytes(payload, 0)
            size = len(payload)
            code_start = next(i for i in range(8, size - 8) if struct.unpack_from(
                "<Q", payload, i)[0] == size - i - 8)
            found.append((fmt.decode(), payload[code_start + 8:]))
    return found


def library_blob(library: Path) -> bytes:
    """The packed module tree (``__tvm_ffi__library_bin``) of an exported host library."""
    from elftools.elf.elffile import ELFFile

    with open(library, "rb") as f:
        elf = ELFFile(f)
        symbol = elf.get_section_by_name(".symtab").get_symbol_by_name(
            "__tvm_ffi__library_bin")[0]
        for segment in elf.iter_segments():
            start = segment["p_vaddr"]
            if segment["p_type"] == "PT_LOAD" and start <= symbol["st_value"] < start + \
                    segment["p_filesz"]:
                f.seek(segment["p_offset"] + symbol["st_value"] - start)
                size = struct.unpack("<Q", f.read(8))[0]
                return struct.pack("<Q", size) + f.read(size)
    raise ValueError(f"{library} holds no packed TVM modules")


def _cuda_payload_to_cubin(payload: bytes, compile_source: Callable[[str], bytes]) -> bytes:
    fmt, pos = _read_bytes(payload, 0)
    if fmt != b"cuda":
        return payload  # already binary (cubin/fatbin/ptx)
    # The code is the payload's last field: find the length prefix that reaches the end.
    for start in range(pos, len(payload) - 8):
        size = struct.unpack_from("<Q", payload, start)[0]
        if size == len(payload) - start - 8:
            table, code = payload[pos:start], payload[start + 8:]
            break
    else:
        raise LoweringError("Unexpected CUDA module layout in this TVM version; cannot embed "
                            "a cubin.", hint="Please report it with `slimc --version`.")
    binary = compile_source(code.decode())
    return _pack(b"cubin") + table + _pack(binary)


def cubin_packer(target, source_out: Path | None = None) -> Callable:
    """An ``fpack_imports`` for ``export_library`` that stores cubins for ``target``'s arch;
    ``source_out``: also write the CUDA C++ the cubins were compiled from there (for reading
    what the kernels do: ``half`` loads, ``wmma::mma_sync`` tensor-core calls...)."""
    arch = str(target.attrs["arch"])

    def pack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        import tvm_ffi

        to_tensor = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")
        blob = bytes(to_tensor(module).numpy().tobytes())
        sources: list[str] = []

        def compile_source(source: str) -> bytes:
            sources.append(source)
            return compile_cubin(source, arch)

        with target:  # nvcc's driver reads the compute version from the current target
            blob, _ = replace_cuda_code(blob, compile_source)
        if source_out is not None and sources:
            Path(source_out).write_text("\n".join(sources))
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        Path(path).write_text(_c_array(blob, prefix))
        return path

    return pack


def _c_array(blob: bytes, prefix: str) -> str:
    """The C file ``runtime.ModulePackImportsToC`` would write for ``blob``."""
    symbol = f"{prefix}__tvm_ffi__library_bin"
    rows = ",\n".join(",".join(f"0x{b:02x}" for b in blob[i:i + 32])
                      for i in range(0, len(blob), 32))
    return ("#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
            f"__attribute__((visibility(\"default\"))) extern const unsigned char {symbol}[];\n"
            f"const unsigned char {symbol}[{len(blob)}] = {{\n{rows}\n}};\n"
            "#ifdef __cplusplus\n}\n#endif\n")
