"""Keep a Relax executable's weights out of its serialized bytecode: a raw section of the library
that the executable reads in place, with no copy at load time.

Why (issue 18, peak memory at real sizes):

- *Compile*: TVM serializes a VM executable, constant pool included, into one in-memory string
  (``VMExecutable::SaveToBytes``), copies it into ``ffi::Bytes``, appends that to the
  packed-imports string and copies the result into a tensor (``runtime.ModulePackImportsToTensor``)
  before a byte reaches disk: three transient copies of every weight.
- *Load* (every loader: the Python runner, qemu verification, the C runner, an app on a board):
  tvm-ffi's ``ProcessLibraryBin`` reads the packed module out of the mapped library into a
  ``std::string``, copies that into ``ffi::Bytes`` for ``VMExecutable::LoadFromBytes``, which
  copies every constant into a new tensor (``Tensor::Load``): the mapped file pages, two copies
  of the executable and the constants are resident at once, ~4x the library (a 1.28 GB model
  peaked at 5.3 GB under qemu), and 2x stays (the file pages plus the tensors).

Here, after slimc's Relax pipeline (every ``FoldConstant`` has run: weights are final,
pre-transposed and pre-packed), each tensor constant of 64 KB or more is replaced in every
function by a variable bound, at the function's start, to ``slimc_library_weight(i)``: a packed
function the library itself exports (C, generated here, compiled and linked with the kernels).
At export the weights are written, 64-byte aligned, straight from their tensors' memory to a
file that the assembler pulls into a read-only section of the library with ``.incbin``; the
packed function wraps weight ``i`` of that section as a tensor *view* (DLPack, no deleter; made
once, cached). So TVM serializes only the bytecode and the small constants, and loading maps
the library and touches each weight page where it lies: one copy of the weights, file-backed
(shared between processes, and clean pages the kernel may drop and re-read under pressure).

Every loader works unchanged: the function is found by the VM among the library's own symbols
(``__tvm_ffi_slimc_library_weight``), through tvm-ffi's stable C ABI. Libraries built before
this keep their weights in the executable and load as before.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from slimc.isa import isa_section_asm

#: Constants smaller than this stay in the executable (bias vectors, scalars, shapes).
MIN_STREAMED_BYTES = 1 << 16
#: Packed function the library exports (symbol ``__tvm_ffi_`` + this): weight ``i`` as a view.
WEIGHT_FUNCTION = "slimc_library_weight"
#: TVM's generated kernels assume 64-byte aligned buffers (``kAllocAlignment``).
ALIGN = 64
#: dtypes whose bytes numpy can view without a copy (others stay in the executable).
_NUMPY_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "uint16",
                 "int32", "uint32", "int64", "uint64"}
_DL_CODES = {"int": 0, "uint": 1, "float": 2}


class StreamedConstants:
    """Moves large constants of a Relax module out of the executable before VM codegen and
    writes them into the exported library. One instance per build: :meth:`wrap_pipeline` for
    ``relax.build``, :meth:`pack_imports` as ``export_library``'s ``fpack_imports``."""

    def __init__(self, min_bytes: int = MIN_STREAMED_BYTES) -> None:
        self.min_bytes = min_bytes
        self.tensors: list[Any] = []  # the real tvm Tensors, by weight index
        self._index: dict[tuple, int] = {}

    def wrap_pipeline(self, pipeline):
        """``pipeline`` (a callable Relax pipeline), then the stubbing."""
        def run(mod, *args):
            return self.stub(pipeline(mod, *args) if args else pipeline(mod))
        return run

    def stub(self, mod):
        """Replace large tensor constants in ``mod``'s Relax functions (VM-lowered) by
        variables bound to ``slimc_library_weight(i)`` at each function's start."""
        import tvm
        from tvm import relax
        from tvm.relax.expr_functor import PyExprMutator, mutator

        owner = self

        @mutator
        class _Stubber(PyExprMutator):
            def __init__(self, mod=None):
                super().__init__(mod)
                self.bound: dict[int, Any] = {}  # weight index -> the function's variable
                self.bindings: list[Any] = []

            def visit_generic_const_(self, op):  # TVM's visitor name for constants
                value = op.value
                if not isinstance(value, tvm.runtime.Tensor):
                    return op
                index = owner._stub_index(value)
                if index is None:
                    return op
                var = self.bound.get(index)
                if var is None:
                    # the variable keeps the weight's type: calls are still checked against it
                    var = relax.Var(f"slimc_weight{index}", op.ty)
                    call = relax.Call(relax.ExternFunc(WEIGHT_FUNCTION),
                                      [relax.prim_value(index)], ty_args=[op.ty])
                    self.bound[index] = var
                    self.bindings.append(relax.VarBinding(var, call))
                return var

        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            stubber = _Stubber()
            body = stubber.visit_expr(func.body)
            if not stubber.bindings:
                continue
            if not isinstance(body, relax.SeqExpr):
                body = relax.SeqExpr([], body)
            body = relax.SeqExpr([relax.BindingBlock(stubber.bindings), *body.blocks], body.body)
            mod[gvar] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
        return mod

    def _stub_index(self, data) -> int | None:
        """Index of ``data`` among the streamed tensors (added on first sight); None when it
        stays in the executable (small, or a dtype/device not streamed)."""
        import numpy as np

        dtype = str(data.dtype)
        if dtype not in _NUMPY_DTYPES or data.device.dlpack_device_type() != 1:
            return None
        shape = tuple(int(s) for s in data.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes < self.min_bytes:
            return None
        # By content, not address: equal weights that reach here as separate tensors (a
        # generation library's prefill and decode copies of one folded weight) are written once.
        array = np.ascontiguousarray(np.from_dlpack(data))
        key = (shape, dtype, hashlib.blake2b(array.view(np.uint8).reshape(-1),
                                             digest_size=16).digest())
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.tensors)
            self.tensors.append(data)
        return index

    def pack_imports(self, module, is_system_lib: bool, prefix: str, workspace_dir: str,
                     isa: dict | None = None) -> str:
        """``fpack_imports``: a C file embedding the (small) packed imports and the weights with
        ``.incbin`` and defining ``slimc_library_weight``; ``isa`` (a
        :func:`slimc.isa.required_isa` record) goes to the library's ISA section."""
        import tvm

        from .blob_pack import BLOB_SYMBOL

        if is_system_lib or prefix:
            raise RuntimeError("library weights need a shared library (no system-lib)")
        blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module)
        blob_path = os.path.join(workspace_dir, "devc.bin")
        import numpy as np

        np.from_dlpack(blob).tofile(blob_path)  # zero-copy view of the serialized bytes
        del blob
        weights_path = os.path.join(workspace_dir, "weights.bin")
        with open(weights_path, "wb") as out:
            layout = self.write_weights(out)
        source = weight_source(layout, blob_path, weights_path, BLOB_SYMBOL, isa)
        c_path = os.path.join(workspace_dir, "devc.c")
        with open(c_path, "w") as f:
            f.write(source)
        return c_path

    def write_weights(self, out) -> list[tuple[int, str, tuple[int, ...]]]:
        """Write every weight to ``out``, each at a 64-byte aligned offset, from its tensor's
        memory; returns ``(offset, dtype, shape)`` per weight index."""
        import numpy as np

        layout = []
        pos = 0
        for tensor in self.tensors:
            array = np.from_dlpack(tensor)  # zero-copy view
            pad = -pos % ALIGN
            out.write(b"\0" * pad)
            pos += pad
            layout.append((pos, str(array.dtype), tuple(int(s) for s in array.shape)))
            out.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            pos += array.nbytes
        return layout


def _asm_path(path: str) -> str:
    """``path`` for ``.incbin "..."`` inside a C string literal (the build's temporary folder:
    no quotes or backslashes expected; refused rather than escaped twice over)."""
    if any(c in path for c in '"\\\n'):
        raise RuntimeError(f"cannot embed {path!r} with .incbin (quote, backslash or newline)")
    return path


def weight_source(layout: list[tuple[int, str, tuple[int, ...]]], blob_path: str,
                  weights_path: str, blob_symbol: str, isa: dict | None = None) -> str:
    """The C translation unit: both files embedded with ``.incbin`` and
    ``__tvm_ffi_slimc_library_weight``, written against tvm-ffi's C ABI (declared here, so the
    file compiles for any target without TVM's headers; as C, or as C++ by ``g++``)."""
    offsets, meta, shapes = [], [], []
    for offset, dtype, shape in layout:
        kind = dtype.rstrip("0123456789")
        offsets.append(str(offset))
        meta.append(f"{{{len(shapes)}, {len(shape)}, {_DL_CODES[kind]}, {dtype[len(kind):]}}}")
        shapes.extend(str(s) for s in shape)
    return _C_SOURCE % {
        "blob_symbol": blob_symbol,
        "blob_path": _asm_path(blob_path),
        "weights_path": _asm_path(weights_path),
        "count": len(layout),
        "offsets": ", ".join(f"{o}ULL" for o in offsets) or "0",
        "meta": ", ".join(meta) or "{0, 0, 0, 0}",
        "shapes": ", ".join(f"{s}LL" for s in shapes) or "0",
        "function": WEIGHT_FUNCTION,
        "align": ALIGN,
        "isa_asm": _c_string(isa_section_asm(isa)) if isa else "",
    }


def _c_string(text: str) -> str:
    """``text`` inside a C string literal (assembler directives: quotes and newlines)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_C_SOURCE = r"""/* Generated by slimc (backends/tvm/streamed_constants.py): the packed imports and
 * the weights of this library, and the function that hands the executable each weight in
 * place. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __cplusplus
extern "C" {
#endif

__asm__(
    ".pushsection .rodata.%(blob_symbol)s,\"a\",%%progbits\n"
    ".globl %(blob_symbol)s\n"
    ".type %(blob_symbol)s,%%object\n"
    ".p2align 4\n"
    "%(blob_symbol)s:\n"
    ".incbin \"%(blob_path)s\"\n"
    ".size %(blob_symbol)s, . - %(blob_symbol)s\n"
    ".popsection\n"
    ".pushsection .rodata.slimc_weights,\"a\",%%progbits\n"
    ".globl slimc_weights_data\n"
    ".hidden slimc_weights_data\n"
    ".type slimc_weights_data,%%object\n"
    ".p2align 12\n"
    "slimc_weights_data:\n"
    ".incbin \"%(weights_path)s\"\n"
    ".size slimc_weights_data, . - slimc_weights_data\n"
    ".popsection\n"
    "%(isa_asm)s");

extern const unsigned char slimc_weights_data[] __attribute__((visibility("hidden")));

/* tvm-ffi's C ABI (tvm/ffi/c_api.h) and DLPack's, the parts used here. */
typedef struct { int32_t device_type; int32_t device_id; } slimc_dl_device;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } slimc_dl_dtype;
typedef struct {
  void* data; slimc_dl_device device; int32_t ndim; slimc_dl_dtype dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
} slimc_dl_tensor;
typedef struct slimc_dl_managed {
  slimc_dl_tensor dl_tensor; void* manager_ctx; void (*deleter)(struct slimc_dl_managed*);
} slimc_dl_managed;
typedef struct {
  int32_t type_index; uint32_t zero_padding;
  union { int64_t v_int64; void* v_obj; double v_float64; } v;
} slimc_ffi_any;
int TVMFFITensorFromDLPack(slimc_dl_managed* from, int32_t require_alignment,
                           int32_t require_contiguous, void** out);
int TVMFFIObjectIncRef(void* obj);
int TVMFFIObjectDecRef(void* obj);
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);

#define SLIMC_WEIGHTS %(count)d
typedef struct { int32_t shape_at; int32_t ndim; uint8_t code; uint8_t bits; } slimc_weight_meta;
static const uint64_t slimc_offsets[] = {%(offsets)s};
static const slimc_weight_meta slimc_meta[] = {%(meta)s};
static const int64_t slimc_shapes[] = {%(shapes)s};
static void* slimc_cache[SLIMC_WEIGHTS + 1];

/* The view of weight i. Its DLPack struct and shape live on the heap and it has no deleter, so
 * a tensor that outlives this library (unloaded) never calls back into it. */
static int slimc_make_view(int64_t i, void** out) {
  const slimc_weight_meta* m = &slimc_meta[i];
  slimc_dl_managed* t = (slimc_dl_managed*)malloc(sizeof(slimc_dl_managed) +
                                                  sizeof(int64_t) * (m->ndim ? m->ndim : 1));
  if (t == NULL) {
    TVMFFIErrorSetRaisedFromCStr("MemoryError", "slimc_library_weight: out of memory");
    return -1;
  }
  memset(t, 0, sizeof(*t));
  t->dl_tensor.shape = (int64_t*)(t + 1);
  memcpy(t->dl_tensor.shape, &slimc_shapes[m->shape_at], sizeof(int64_t) * m->ndim);
  t->dl_tensor.data = (void*)(slimc_weights_data + slimc_offsets[i]);
  t->dl_tensor.device.device_type = 1; /* kDLCPU */
  t->dl_tensor.ndim = m->ndim;
  t->dl_tensor.dtype.code = m->code;
  t->dl_tensor.dtype.bits = m->bits;
  t->dl_tensor.dtype.lanes = 1;
  if (TVMFFITensorFromDLPack(t, %(align)d, 1, out) != 0) {
    free(t);
    return -1;
  }
  return 0;
}

__attribute__((visibility("default")))
int __tvm_ffi_%(function)s(void* self, const slimc_ffi_any* args, int32_t num_args,
                           slimc_ffi_any* result) {
  int64_t i;
  void* view;
  (void)self;
  if (num_args != 1 || args[0].type_index != 1 /* kTVMFFIInt */) {
    TVMFFIErrorSetRaisedFromCStr("TypeError", "slimc_library_weight takes one integer");
    return -1;
  }
  i = args[0].v.v_int64;
  if (i < 0 || i >= SLIMC_WEIGHTS) {
    TVMFFIErrorSetRaisedFromCStr("IndexError", "slimc_library_weight: no such weight");
    return -1;
  }
  view = __atomic_load_n(&slimc_cache[i], __ATOMIC_ACQUIRE);
  if (view == NULL) {
    void* expected = NULL;
    if (slimc_make_view(i, &view) != 0) return -1;
    if (!__atomic_compare_exchange_n(&slimc_cache[i], &expected, view, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
      TVMFFIObjectDecRef(view); /* another thread made it first */
      view = expected;
    }
  }
  TVMFFIObjectIncRef(view);
  result->type_index = 70; /* kTVMFFITensor */
  result->zero_padding = 0;
  result->v.v_obj = view;
  return 0;
}

#ifdef __cplusplus
}
#endif
"""
