"""Elementwise epilogues fused into the int8 kernels: requantization written by the producer.

Between two W8A8 convolutions the graph is ``conv -> ReLU6 -> quantize`` (``maximum``,
``minimum``, ``multiply`` by the next layer's input multiplier, ``round``, ``add`` the zero
point, clamp, ``astype`` int8/uint8): left as separate kernels, the convolution writes a float32
activation and a second pass reads it back and writes the int8 codes, 4 + 4 + 1 bytes per
element where the producer could write the 1-byte code directly (what ONNX Runtime's
``QLinearConv`` does). ``schedules.requantize_fusion`` finds such chains in the Relax graph and
rebuilds the producing kernel with the chain as its epilogue (:func:`apply`); this module is the
part the kernel builders share: the chain's description and its TE expression.

An epilogue is a tuple of ops, each a tuple of plain values (hashable, JSON-able: the kernel
builders are cached on it, and the rebuild recipe is stored as a function attribute):

* ``("round",)``: round half to even (``te.nearbyint``, what Relax's ``round`` legalizes to);
* ``("astype", dtype)``;
* ``(op, "scalar", value, swapped)`` and ``(op, "vector", index, swapped)`` for the binary ops
  :data:`BINARY`, the other operand a float32 scalar or the ``index``-th per-channel vector
  input (broadcast over the last, channel axis); ``swapped``: the chain value is the right-hand
  operand.

Each op is the same float32 operation, in the same order, as the legalized Relax op it replaces,
so the fused kernel's output is bit for bit the unfused graph's.
"""

from __future__ import annotations

import hashlib

#: Binary elementwise ops an epilogue may hold: Relax op name -> TIR expression builder.
BINARY = ("add", "subtract", "multiply", "divide", "maximum", "minimum")


def _binary(name: str, a, b):
    from tvm import tirx

    if name == "add":
        return a + b
    if name == "subtract":
        return a - b
    if name == "multiply":
        return a * b
    if name == "divide":
        return a / b
    if name == "maximum":
        return tirx.max(a, b)
    return tirx.min(a, b)


def vector_count(epilogue: tuple) -> int:
    """How many per-channel vector inputs the epilogue reads (kernel arguments after bias)."""
    return sum(1 for op in epilogue if len(op) == 4 and op[1] == "vector")


def output_dtype(epilogue: tuple, default: str = "float32") -> str:
    """The dtype the epilogue ends in (its last ``astype``), else ``default``."""
    casts = [op[1] for op in epilogue if op[0] == "astype"]
    return casts[-1] if casts else default


def suffix(epilogue: tuple) -> str:
    """A short, stable kernel-name suffix for the epilogue (empty when there is none)."""
    if not epilogue:
        return ""
    return "_e" + hashlib.sha1(repr(epilogue).encode()).hexdigest()[:10]


def placeholders(epilogue: tuple, shape: tuple) -> list:
    """The vector inputs' TE placeholders, ``shape`` (``(channels,)``) float32 each."""
    from tvm import te

    return [te.placeholder(shape, "float32", name=f"epilogue{i}")
            for i in range(vector_count(epilogue))]


def apply(value, channel, epilogue: tuple, vectors: list):
    """``value`` (a float32 TIR expression of output channel ``channel``) through the ops."""
    from tvm import tirx

    for op in epilogue:
        if op[0] == "round":
            value = tirx.nearbyint(value)
        elif op[0] == "astype":
            value = value.astype(op[1])
        else:
            name, kind, payload, swapped = op
            other = (tirx.const(float(payload), "float32") if kind == "scalar"
                     else vectors[payload][channel])
            value = _binary(name, other, value) if swapped else _binary(name, value, other)
    return value


def freeze(value):
    """JSON lists back to tuples (the kernel builders' caches hash their arguments)."""
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value
