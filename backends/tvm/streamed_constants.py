"""Write a Relax executable's weights to the library file once, streamed, never serialized.

Why: TVM serializes a VM executable, constant pool included, into one in-memory string
(``VMExecutable::SaveToBytes``), copies it into ``ffi::Bytes``, appends that to the packed-imports
string and copies the result into a tensor (``runtime.ModulePackImportsToTensor``) before a byte
reaches disk. For a 540 MB model that is three transient copies of every weight on top of the
executable's own constants: the compile's peak memory (2.8 GB for SmolLM2-135M; issue 18).

Here the weights never enter the serialization. After slimc's Relax pipeline (every
``FoldConstant`` has run: weights are final, pre-transposed and pre-packed) each large tensor
constant is swapped for a 16-byte stub tensor that names it, so the VM code generator builds an
executable whose constant pool is tiny. At export the small packed-imports blob is serialized
as usual, every stub's record in it is located, and the blob is written to the file with each
stub's record replaced by the real tensor's, streamed from the tensor's own memory. Lengths
are patched (the blob's size header and the executable's length prefix); everything else is
TVM's bytes. The record format is checked on every export: each stub record must equal what
:func:`tensor_record_header` writes for the stub, byte for byte, or the export fails loudly
rather than write a library that cannot load. The library is identical in layout to TVM's own
(the runtime loads it unchanged) and is verified by running it, as every artifact is.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from typing import Any, BinaryIO

#: ``kTVMNDArrayMagic`` / ``kTVMTensorMagic``: first field of a serialized tensor.
TENSOR_MAGIC = 0xDD5E40F096B4A13F
#: Constants smaller than this stay in the executable (bias vectors, scalars, shapes).
MIN_STREAMED_BYTES = 1 << 16
#: dtypes whose bytes numpy can view without a copy (others stay in the executable).
_NUMPY_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "uint16",
                 "int32", "uint32", "int64", "uint64"}
_DL_CODES = {"int": 0, "uint": 1, "float": 2}


class StreamError(RuntimeError):
    """The serialized executable did not have the layout this module writes (a TVM change)."""


def tensor_record_header(dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """TVM's tensor serialization (``SaveDLTensor``) up to the data: magic, reserved, CPU
    device, ndim, DLDataType, shape, data size in bytes."""
    kind = dtype.rstrip("0123456789")
    bits = int(dtype[len(kind):])
    return (struct.pack("<QQiii", TENSOR_MAGIC, 0, 1, 0, len(shape))
            + struct.pack("<BBH", _DL_CODES[kind], bits, 1)
            + struct.pack(f"<{len(shape)}q", *shape) + struct.pack("<q", nbytes))


class StreamedConstants:
    """Stubs large constants out of a Relax module before VM codegen and streams them into the
    exported library. One instance per build: :meth:`wrap_pipeline` for ``relax.build``,
    :meth:`pack_imports` as ``export_library``'s ``fpack_imports``."""

    def __init__(self, min_bytes: int = MIN_STREAMED_BYTES) -> None:
        self.min_bytes = min_bytes
        self.token = secrets.token_bytes(8)
        self.tensors: list[Any] = []  # the real tvm Tensors, by stub index
        self._index: dict[tuple, int] = {}

    def wrap_pipeline(self, pipeline):
        """``pipeline`` (a callable Relax pipeline), then the stubbing."""
        def run(mod, *args):
            return self.stub(pipeline(mod, *args) if args else pipeline(mod))
        return run

    def stub(self, mod):
        """Replace large tensor constants in ``mod``'s Relax functions by stubs."""
        import tvm
        from tvm import relax
        from tvm.relax._ffi_api import MakeTensorConst as make_const
        from tvm.relax.expr_functor import PyExprMutator, mutator

        owner = self
        # One stub constant per weight, shared by every function that reads it (a generation
        # library's prefill and decode): the executable stores a constant once per object, so
        # a fresh stub per use would write the weight into the file once per function.
        stubs: dict[int, Any] = {}

        @mutator
        class _Stubber(PyExprMutator):
            def visit_generic_const_(self, op):  # TVM's visitor name for constants
                value = op.value
                if not isinstance(value, tvm.runtime.Tensor):
                    return op
                index = owner._stub_index(value)
                if index is None:
                    return op
                if index not in stubs:
                    # the stub keeps the weight's type: calls are still checked against it
                    stubs[index] = make_const(owner._marker(index), op.ty, None)
                return stubs[index]

        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = _Stubber().visit_expr(func)
        return mod

    def _marker(self, index: int):
        import numpy as np
        import tvm

        marker = np.frombuffer(self.token + struct.pack("<Q", index), dtype=np.uint8)
        return tvm.runtime.tensor(marker.copy())

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

    def stub_record(self, index: int) -> bytes:
        return tensor_record_header("uint8", (16,), 16) + self.token + struct.pack("<Q", index)

    def pack_imports(self, module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        """``fpack_imports``: the blob with the real tensors streamed in, as ``.incbin``."""
        import tvm

        from .blob_pack import write_incbin

        if is_system_lib or prefix:
            raise StreamError("streamed constants need a shared library (no system-lib)")
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy())
        bin_path = os.path.join(workspace_dir, "devc.bin")
        with open(bin_path, "wb") as out:
            self.write_blob(blob, out)
        return write_incbin(bin_path, workspace_dir)

    def write_blob(self, blob: bytes, out: BinaryIO) -> int:
        """Write ``blob`` (packed imports holding the stubs) to ``out`` with the real tensors in
        place of their stubs; returns the bytes written."""
        import numpy as np

        if not self.tensors:
            out.write(blob)
            return len(blob)
        spots = []  # (offset of the stub record, index)
        for index in range(len(self.tensors)):
            record = self.stub_record(index)
            at = blob.find(record)
            if at < 0 or blob.find(record, at + 1) >= 0:
                raise StreamError(f"stub {index} is not serialized exactly once in the "
                                  "executable (TVM's tensor format changed?)")
            spots.append((at, index))
        spots.sort()
        payload_len_at, payload_end = _payload_holding(blob, spots[0][0], spots[-1][0])
        arrays = [np.from_dlpack(t) for t in self.tensors]  # zero-copy views
        growth = sum(a.nbytes + len(tensor_record_header(str(a.dtype), a.shape, a.nbytes))
                     - len(self.stub_record(i)) for i, a in enumerate(arrays))
        total = len(blob) + growth
        (old_total,) = struct.unpack_from("<Q", blob, 0)
        (old_payload,) = struct.unpack_from("<Q", blob, payload_len_at)
        out.write(struct.pack("<Q", old_total + growth))
        pos = 8
        out.write(blob[pos:payload_len_at])
        out.write(struct.pack("<Q", old_payload + growth))
        pos = payload_len_at + 8
        stub_len = len(self.stub_record(0))
        for at, index in spots:
            out.write(blob[pos:at])
            array = arrays[index]
            out.write(tensor_record_header(str(array.dtype), array.shape, array.nbytes))
            out.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            pos = at + stub_len
        out.write(blob[pos:])
        assert payload_end <= len(blob)
        return total


def _payload_holding(blob: bytes, first: int, last: int) -> tuple[int, int]:
    """Offset of the length prefix of the packed module whose payload holds ``first..last``,
    and the payload's end. Layout (tvm_ffi ``ProcessLibraryBin``): ``<nbytes u64>
    <indptr vec<u64>> <child_indices vec<u64>>`` then per module ``<kind str>`` and, unless the
    kind is ``_lib``, ``<payload bytes>``; strings and vectors are a u64 count then items."""
    pos = 8
    for _ in range(2):
        (count,) = struct.unpack_from("<Q", blob, pos)
        pos += 8 + 8 * count
    while pos < len(blob):
        (size,) = struct.unpack_from("<Q", blob, pos)
        kind = blob[pos + 8:pos + 8 + size]
        pos += 8 + size
        if kind == b"_lib":
            continue
        (payload,) = struct.unpack_from("<Q", blob, pos)
        start, end = pos + 8, pos + 8 + payload
        if start <= first and last < end:
            return pos, end
        pos = end
    raise StreamError("the stubs are not inside one packed module's payload")
