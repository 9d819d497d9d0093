"""Embed a Relax executable's serialized blob (bytecode + weights) with ``.incbin``.

Why: ``export_library`` puts the serialized VM executable, which holds every weight, into the
library as one constant array. TVM's default does it through LLVM
(``ModulePackImportsToLLVM``): the blob is serialized to a string, copied with its size header,
turned into an LLVM ``ConstantDataArray`` and emitted into an object buffer before it reaches
disk, so a 540 MB model briefly holds four or more copies of its weights in the compiling
process (and ``ModulePackImportsToC`` would write a 3 GB hex C file instead).

Here the blob is written straight to a file from the tensor TVM serializes it into, and a
five-line assembly file pulls it in with ``.incbin``: the assembler (``zig cc`` or the system
compiler, a separate short-lived process) streams the bytes into the object. Same symbol
(``__tvm_ffi__library_bin``), same bytes, so the runtime loads the library exactly as before.
ELF targets only (Linux, which is all slimc links for); other cases keep TVM's default.
"""

from __future__ import annotations

import os
import sys

#: The symbol the TVM runtime looks up for the serialized imports (``tvm_ffi``'s
#: ``symbol::tvm_ffi_library_bin``), see ``ModulePackImportsToC``.
BLOB_SYMBOL = "__tvm_ffi__library_bin"

_ASM = """\
    .section .rodata.{sym},"a",%progbits
    .globl {sym}
    .type {sym},%object
    .p2align 4
{sym}:
    .incbin "{path}"
    .size {sym}, . - {sym}
    .section .note.GNU-stack,"",%progbits
"""


def pack_imports_incbin(module, is_system_lib: bool, prefix: str, workspace_dir: str,
                        isa: dict | None = None) -> str:
    """``fpack_imports`` for ``Module.export_library``: the blob as ``.incbin`` assembly;
    ``isa`` (a :func:`slimc.isa.required_isa` record) goes to the library's ISA section."""
    import numpy as np
    import tvm

    if is_system_lib or prefix:  # needs a registration constructor: TVM's C path does that
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        with open(path, "w") as f:
            f.write(tvm.get_global_func("runtime.ModulePackImportsToC")(
                module, is_system_lib, prefix))
        return path
    blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module)
    bin_path = os.path.join(workspace_dir, "devc.bin")
    np.from_dlpack(blob).tofile(bin_path)  # zero-copy view of the serialized bytes
    del blob
    return write_incbin(bin_path, workspace_dir, isa)


def write_incbin(bin_path: str, workspace_dir: str, isa: dict | None = None) -> str:
    """The assembly file that embeds ``bin_path`` as the packed-imports symbol (and ``isa``)."""
    from slimc.isa import isa_section_asm

    asm_path = os.path.join(workspace_dir, "devc.S")
    with open(asm_path, "w") as f:
        f.write(_ASM.format(sym=BLOB_SYMBOL, path=bin_path.replace("\\", "\\\\")))
        if isa:
            f.write(isa_section_asm(isa))
    return asm_path


def incbin_supported() -> bool:
    """ELF hosts/targets only (the ``.section``/``.type`` directives above are ELF's)."""
    return sys.platform.startswith("linux")
