"""Integer bit shifts (``x << k``, ``x >> k``, ``torch.bitwise_left_shift``): TVM 0.27 has the
Relax ops but no converter ("cannot lower op(s) __lshift__.Scalar"), found by the session-24
hunt in hashing / bit-packing code. ``>>`` of a signed integer is arithmetic in both.

Shift counts outside ``0..bits-1`` are undefined in the generated code (LLVM), where PyTorch
gives 0 (or -1): models shift by in-range constants; such counts are not guarded.
"""

from __future__ import annotations

from typing import Any


def _shift(op_name: str):
    def convert(node, importer) -> Any:
        from tvm import relax

        def operand(arg, like):
            if isinstance(arg, (int, bool)):
                return relax.const(int(arg), str(like.ty.dtype))
            return importer.env[arg]

        first = node.args[0]
        tensor = importer.env[first] if not isinstance(first, (int, bool)) \
            else importer.env[node.args[1]]
        lhs, rhs = operand(node.args[0], tensor), operand(node.args[1], tensor)
        return importer.block_builder.emit(getattr(relax.op, op_name)(lhs, rhs))

    return convert


def converters() -> dict[str, Any]:
    """Converters keyed like TVM's ``custom_convert_map``."""
    table: dict[str, Any] = {}
    for torch_name, op_name in (("__lshift__", "left_shift"), ("__rshift__", "right_shift"),
                                ("bitwise_left_shift", "left_shift"),
                                ("bitwise_right_shift", "right_shift")):
        for overload in ("Scalar", "Tensor", "Tensor_Scalar", "Scalar_Tensor"):
            table[f"{torch_name}.{overload}"] = _shift(op_name)
    return table
