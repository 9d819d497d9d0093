"""One copy of a tied embedding table: the gather reads the output head's packed layout.

A tied table (SmolLM2's 49152 x 576 embedding is also its LM head) is read two ways: the
embedding gathers rows, the head streams it as a matmul weight. The head's lowering packs the
weight into tiles (``[N/t, K, t]`` for the weight-only kernels, ``[N/lanes, K/g, lanes, g]``
for the int8 dot-product kernels), a relayout ``FoldConstant`` evaluates into a new constant.
A gather reading the unpacked table kept the original too, so the library stored the table
twice (SmolLM2 int8: +28 MB, 21% over the reported weight bytes).

Here the head's packed operands are built once per importer (:func:`packed_once`, keyed by
the head node) and the gather of the same table reads them through a :class:`TableLayout`:
row ``v``, column ``a`` of the table is element :meth:`TableLayout.at` of the packed array.
A gather reads a handful of rows per call (one per token), so the strided reads cost nothing
measurable; the matmul keeps its contiguous tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TableLayout:
    """How a ``[V, A]`` table (``A``: stored columns; int4 packs two codes per byte) is laid
    out in the array a gather reads.

    ``rows``: as is. ``tiles``: ``[V/tile, width, tile]`` (``_tiles``). ``dot``:
    ``[V/tile, width/group, tile, group]`` (the int8 dot-product kernels' packing).
    ``width``: stored columns after the head's zero padding (0: ``A`` itself).
    """

    kind: str = "rows"
    tile: int = 1
    group: int = 1
    width: int = 0

    def shape(self, vocab: int, columns: int) -> tuple[int, ...]:
        width = self.width or columns
        if self.kind == "rows":
            return (vocab, width)
        if self.kind == "tiles":
            return (vocab // self.tile, width, self.tile)
        return (vocab // self.tile, width // self.group, self.tile, self.group)

    def at(self, table, v, a):
        """Element ``(v, a)`` of the logical table (a TE expression)."""
        if self.kind == "rows":
            return table[v, a]
        if self.kind == "tiles":
            return table[v // self.tile, a, v % self.tile]
        return table[v // self.tile, a // self.group, v % self.tile, a % self.group]

    @property
    def suffix(self) -> str:
        """Kernel name suffix (distinct layouts are distinct kernels)."""
        if self.kind == "rows":
            return ""
        return f"_{self.kind}{self.tile}" + (f"x{self.group}" if self.kind == "dot" else "") \
            + (f"_w{self.width}" if self.width else "")


ROWS = TableLayout()


def packed_once(importer, head, key: str, make: Callable[[], Any]) -> Any:
    """``make()`` the first time ``(head, key)`` is asked for in this import, the same Relax
    value afterwards: the gather and the head then read one constant after folding."""
    memo = importer.__dict__.setdefault("_slimc_packed_tables", {})
    if (head, key) not in memo:
        memo[(head, key)] = make()
    return memo[(head, key)]


def head_reading(table, ops: tuple) -> Any | None:
    """The first node using the fx node ``table`` as its matmul weight (argument 1) through one
    of ``ops``, or None."""
    for user in table.users:
        if user.target in ops and len(user.args) > 1 and user.args[1] is table:
            return user
    return None
