"""int8 x int8 -> int32 matmul kernels with the dequantize epilogue fused (W8A8 linears).

One kernel computes ``y[m, n] = float(sum_k a[m, k] * w[n, k] - comp[n]) * scale[n] + bias[n]``
for activation codes ``a`` (quantized by the caller) and int8 weight codes ``w``, picking the
instruction the target has. ``comp[n] = c * sum_k w[n, k]`` takes a constant shift ``c`` of the
codes (the activation zero point, plus VNNI's offset) back out, in integers, before the float
epilogue (subtracting it after the conversion would cancel catastrophically).

* ``vnni`` (x86 with AVX-512 VNNI): ``vpdpbusd`` multiplies 64 unsigned x signed bytes and adds
  them in groups of four into 16 int32 lanes. Activations are shifted to ``uint8`` (code + 128).
* ``sdot`` (Armv8.2 dot product): ``sdot`` does the same for signed x signed bytes into 4 lanes.
* ``avx2`` (x86 with AVX2, no AVX-512 VNNI: Haswell to Zen 3, ``x86-64-v3``): ``vpmaddwd``
  multiplies 16 signed int16 pairs and adds each pair into 8 int32 lanes. Activations are int16
  codes (still -128..127: no pair sum comes near saturation, the result is exact); the int8
  weights are sign-extended to int16 in registers. 2.0-3.0x the generic kernel (3136x576x128,
  52x4608x512), and 1.2-1.7x faster than reading int8 codes and widening each pair in the
  kernel, which also lost end to end (MobileNetV2 1.21x, ResNet-18 1.33x slower; the
  measurements: docs/benchmarks.md). So activations travel as int16 codes into AVX2 layers.
* ``generic`` (any other CPU, e.g. plain NEON or SSE4): int8 widened to int32 in vector lanes
  over output features; LLVM picks the widening multiply-adds. Correct everywhere, the fallback.

Weights are packed at compile time so the kernel streams them contiguously: the dot-product
kernels read ``w`` as ``[N/L, K/G, L, G]`` (``L`` x ``G``: one instruction's worth of output
lanes x K elements each lane reduces; 16 x 4 for VNNI, 4 x 4 for sdot, 8 x 2 for AVX2), the
generic one as ``[N/t, K, t]``. ``K`` is a multiple of 4 for every dot kind (convolutions pad
their channels), so one packing rule serves all of them. The register block is
``ROWS`` activation rows x ``TILES`` weight tiles, so each weight load feeds ``ROWS``
dot-product instructions and each broadcast activation word feeds ``TILES``.

The LLVM intrinsics are declared here rather than taken from ``tvm.s_tir.tensor_intrin.x86``:
in apache-tvm 0.27 that module's ``dot_16x4_vnni`` passes ``<16 x i32>`` operands where LLVM 22's
``vpdpbusd.512`` takes ``<64 x i8>``, and codegen fails.
"""

from __future__ import annotations

import functools
import json

from slimc.backends.tvm import epilogue as epi

#: Activation rows x weight tiles computed per register block.
ROWS = 4
TILES = 2

#: Weight matrices up to this many bytes stay in L1 across row blocks: the parallel loop then
#: walks rows outermost, so each block writes whole output rows (MobileNetV2's 96 x 16 expand
#: conv wrote a 12544 x 96 output as three 32-column strips, 3x slower at 1 thread).
SMALL_WEIGHT_BYTES = 16384

#: Function attribute: ``[builder, args]`` (JSON), how :mod:`.schedules.requantize_fusion`
#: rebuilds a kernel with an epilogue fused (see :mod:`.epilogue`).
REBUILD_ATTR = "slimc_rebuild"

#: Dot-product kernels: output lanes per instruction, K elements each lane reduces (the
#: group), activation dtype, LLVM intrinsic.
DOT_KINDS = {"vnni": (16, 4, "uint8", "llvm.x86.avx512.vpdpbusd.512"),
             "sdot": (4, 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8"),
             "avx2": (8, 2, "int16", "llvm.x86.avx2.pmadd.wd")}

#: What every dot kind needs ``K`` to be a multiple of (the largest group).
K_MULTIPLE = 4

#: Set: every target gets this kind (the comparison of ``benchmarks/run.py``'s
#: ``slimc-w8a8-generic`` engine: the generic kernel on an AVX2 target). None: from the target.
FORCE_KIND: str | None = None


@functools.lru_cache(maxsize=4)
def _register_intrinsics() -> dict[str, tuple[str, int, str]]:
    """Register the dot-product tensor intrinsics once; name -> (intrin, lanes, act dtype)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    def make(lanes: int, grp: int, act_dtype: str, llvm_name: str):
        vec = lanes * grp
        word_dtype = "int32"  # grp activation codes, broadcast to every lane as one word

        @T.prim_func(s_tir=True)
        def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (grp,), act_dtype, offset_factor=1)
            B = T.match_buffer(b, (lanes, grp), "int8", offset_factor=1)
            C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:grp], B[0:lanes, 0:grp])
                T.writes(C[0:lanes])
                for i in T.serial(0, lanes):
                    for k in T.serial(0, grp):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

        if grp == 4:  # vpdpbusd / sdot: accumulate into C in the instruction
            @T.prim_func(s_tir=True)
            def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
                A = T.match_buffer(a, (grp,), act_dtype, offset_factor=1)
                B = T.match_buffer(b, (lanes, grp), "int8", offset_factor=1)
                C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
                with T.sblock("root"):
                    T.reads(C[0:lanes], A[0:grp], B[0:lanes, 0:grp])
                    T.writes(C[0:lanes])
                    word = T.reinterpret(A.vload([0], f"{act_dtype}x{grp}"), dtype=word_dtype)
                    C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(llvm_name),
                        C.vload([0], dtype=f"int32x{lanes}"),
                        T.reinterpret(T.broadcast(word, lanes), dtype=f"{act_dtype}x{vec}"),
                        B.vload([0, 0], dtype=f"int8x{vec}"),
                        dtype=f"int32x{lanes}",
                    )
        else:  # vpmaddwd: int16 pairs -> int32 lanes, then add C
            @T.prim_func(s_tir=True)
            def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
                A = T.match_buffer(a, (grp,), act_dtype, offset_factor=1)
                B = T.match_buffer(b, (lanes, grp), "int8", offset_factor=1)
                C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
                with T.sblock("root"):
                    T.reads(C[0:lanes], A[0:grp], B[0:lanes, 0:grp])
                    T.writes(C[0:lanes])
                    word = T.reinterpret(A.vload([0], f"{act_dtype}x{grp}"), dtype=word_dtype)
                    C[T.ramp(T.int32(0), 1, lanes)] = C.vload(
                        [0], dtype=f"int32x{lanes}") + T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(llvm_name),
                        T.reinterpret(T.broadcast(word, lanes), dtype=f"{act_dtype}x{vec}"),
                        T.cast(B.vload([0, 0], dtype=f"int8x{vec}"), f"{act_dtype}x{vec}"),
                        dtype=f"int32x{lanes}",
                    )

        return desc, impl

    registered = {}
    for kind, (lanes, grp, act_dtype, llvm_name) in DOT_KINDS.items():
        name = f"slimc_dot_{lanes}x{grp}_{kind}"
        TensorIntrin.register(name, *make(lanes, grp, act_dtype, llvm_name), override=True)
        registered[kind] = (name, lanes, act_dtype)
    return registered


def kernel_kind(target) -> str:
    """``vnni``, ``avx2``, ``sdot`` or ``generic`` for a TVM target (``None``: generic).

    ``avx2`` needs AVX2 and no AVX-512 VNNI (``vpdpbusd`` does 4x the work per instruction);
    plain ``x86-64`` and ``x86-64-v2`` (SSE only) stay generic."""
    if FORCE_KIND is not None:
        return FORCE_KIND
    if target is None:
        return "generic"
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    try:
        if triple.startswith(("x86_64", "i686")) and codegen.target_has_features(
                ["avx512vnni"], target):
            return "vnni"
        if triple.startswith(("x86_64", "i686")) and codegen.target_has_features(
                ["avx2"], target):
            return "avx2"
        if triple.startswith("aarch64") and codegen.target_has_features(["dotprod"], target):
            return "sdot"
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe gets the safe kernel
        return "generic"
    return "generic"


def lanes(kind: str) -> int:
    """Output features per packed weight tile for ``kind`` (generic: see ``tile_for``)."""
    return DOT_KINDS[kind][0]


def group(kind: str) -> int:
    """K elements each output lane of one ``kind`` instruction reduces (the packed weight's
    innermost axis)."""
    return DOT_KINDS[kind][1]


def activation_dtype(kind: str) -> str:
    """The dtype the ``kind`` kernel reads activation codes in (AVX2: int16, the operand of
    ``vpmaddwd``; the codes themselves are still -128..127)."""
    return DOT_KINDS[kind][2] if kind in DOT_KINDS else "int8"


def activation_offset(kind: str) -> int:
    """What the caller adds to the signed activation code before the kernel reads it."""
    return 128 if kind == "vnni" else 0


def with_rebuild(func, builder: str, *args):
    """``func`` with its rebuild recipe attached (:data:`REBUILD_ATTR`)."""
    return func.with_attr(REBUILD_ATTR, json.dumps([builder, list(args)]))


@functools.lru_cache(maxsize=256)
def dot_kernel(kind: str, m: int | None, k: int, n: int, epilogue: tuple = (),
               row_scaled: bool = False):
    """Scheduled PrimFunc ``(a[m,k], w[N/L,K/G,L,G], comp[n], scale[n], bias[n], *vectors,
    y[m,n])``: ``y = epilogue(float(acc - comp) * scale + bias)`` (:mod:`.epilogue`; float32
    ``y`` without one). ``row_scaled``: a per-row scale ``rs[m]`` follows ``bias`` (dynamic
    per-token activation scales), ``y = float(acc - comp) * scale[j] * rs[i] + bias[j]``.

    ``m`` None: a symbolic row count (a dynamic sequence length). The kernel then reads
    ``a[q, ROWS, k]`` and writes ``y[q, ROWS, n]``, ``q`` bound from the shape at run time: the
    caller pads the rows to a multiple of ``ROWS`` and slices ``y`` back
    (:func:`.quantized_ops.int8_matmul`). Why: tensorize needs the fixed ``ROWS`` x ``TILES``
    register block, and a row loop split on a symbolic extent carries a predicate that the
    tensorized block cannot have; with the row block as its own axis nothing is partial.
    """
    if m is None:
        return _dot_kernel_rows(kind, k, n, epilogue, row_scaled)
    from tvm import s_tir, te

    intrin, width, act_dtype = _register_intrinsics()[kind]
    g = group(kind)
    a = te.placeholder((m, k), act_dtype, name="a")
    w = te.placeholder((n // width, k // g, width, g), "int8", name="w")
    comp = te.placeholder((n,), "int32", name="comp")
    scale = te.placeholder((n,), "float32", name="scale")
    bias = te.placeholder((n,), "float32", name="bias")
    ko = te.reduce_axis((0, k // g), name="ko")
    ki = te.reduce_axis((0, g), name="ki")
    acc = te.compute(
        (m, n // width, width),
        lambda i, jo, ji: te.sum(a[i, ko * g + ki].astype("int32")
                                 * w[jo, ko, ji, ki].astype("int32"), axis=[ko, ki]),
        name="acc")
    vectors = epi.placeholders(epilogue, (n,))
    rows_in = _row_scales(row_scaled, (m,))
    y = te.compute((m, n), lambda i, j: epi.apply(
        _scaled((acc[i, j // width, j % width] - comp[j]).astype("float32") * scale[j],
                rows_in, (i,)) + bias[j], j, epilogue, vectors), name="y")
    sch = s_tir.Schedule(te.create_prim_func([a, w, comp, scale, bias, *rows_in, *vectors, y]))

    rows = next(r for r in (ROWS, 2, 1) if m % r == 0)
    i, j = sch.get_loops(sch.get_sblock("y"))
    io, ii = sch.split(i, [None, rows])
    _tile_and_tensorize(sch, io, ii, j, n, k, width, intrin)
    name = f"slimc_linear_w8a8_{kind}_{m}x{k}x{n}{epi.suffix(epilogue)}" + (
        "_rs" if row_scaled else "")
    func = sch.mod["main"].with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    # a per-row scale needs the whole row first: no next layer's codes written from here
    return func if epilogue or row_scaled else with_rebuild(func, "dot", kind, m, k, n)


def _row_scales(row_scaled: bool, shape: tuple) -> list:
    """``[rs]``, the per-row scale placeholder of a row-scaled int8 kernel, or ``[]``."""
    from tvm import te

    return [te.placeholder(shape, "float32", name="rs")] if row_scaled else []


def _scaled(value, rows_in: list, index: tuple):
    """``value * rs[index]`` for a row-scaled kernel, else ``value``."""
    return value * rows_in[0][index] if rows_in else value


def _dot_kernel_rows(kind: str, k: int, n: int, epilogue: tuple, row_scaled: bool = False):
    """:func:`dot_kernel` for a symbolic row count: ``a[q, ROWS, k]`` -> ``y[q, ROWS, n]``."""
    from slimc.backends.tvm.quantized_ops import row_var
    from tvm import s_tir, te

    intrin, width, act_dtype = _register_intrinsics()[kind]
    g = group(kind)
    q = row_var(None)
    a = te.placeholder((q, ROWS, k), act_dtype, name="a")
    w = te.placeholder((n // width, k // g, width, g), "int8", name="w")
    comp = te.placeholder((n,), "int32", name="comp")
    scale = te.placeholder((n,), "float32", name="scale")
    bias = te.placeholder((n,), "float32", name="bias")
    ko = te.reduce_axis((0, k // g), name="ko")
    ki = te.reduce_axis((0, g), name="ki")
    acc = te.compute(
        (q, ROWS, n // width, width),
        lambda b, i, jo, ji: te.sum(a[b, i, ko * g + ki].astype("int32")
                                    * w[jo, ko, ji, ki].astype("int32"), axis=[ko, ki]),
        name="acc")
    vectors = epi.placeholders(epilogue, (n,))
    rows_in = _row_scales(row_scaled, (q, ROWS))
    y = te.compute((q, ROWS, n), lambda b, i, j: epi.apply(
        _scaled((acc[b, i, j // width, j % width] - comp[j]).astype("float32") * scale[j],
                rows_in, (b, i)) + bias[j], j, epilogue, vectors), name="y")
    sch = s_tir.Schedule(te.create_prim_func([a, w, comp, scale, bias, *rows_in, *vectors, y],
                                               "int64"))

    io, ii, j = sch.get_loops(sch.get_sblock("y"))
    _tile_and_tensorize(sch, io, ii, j, n, k, width, intrin)
    name = f"slimc_linear_w8a8_{kind}_dynx{k}x{n}{epi.suffix(epilogue)}" + (
        "_rs" if row_scaled else "")
    return sch.mod["main"].with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)


def _tile_and_tensorize(sch, io, ii, j, n: int, k: int, width: int, intrin: str) -> None:
    """The dot kernels' schedule once the row axis is split into row blocks ``io`` and the
    register block ``ii`` (fixed rows split it; symbolic rows come as ``a[q, ROWS, k]``):
    output tiles of ``TILES`` vectors, blocks fused into one parallel loop (weights outer when
    they do not fit in cache), the accumulator in registers, its lane loop tensorized."""
    tiles = next(t for t in (TILES, 1) if (n // width) % t == 0)
    jo, jj = sch.split(j, [None, tiles * width])
    if n * k <= SMALL_WEIGHT_BYTES:
        sch.reorder(io, jo, ii, jj)
        outer = sch.fuse(io, jo)
    else:
        sch.reorder(jo, io, ii, jj)
        outer = sch.fuse(jo, io)
    sch.parallel(outer)
    _, vec = sch.split(jj, [None, width])
    sch.vectorize(vec)

    block = sch.get_sblock("acc")
    sch.compute_at(block, outer)
    sch.set_scope(block, 0, "local")
    # compute_at drops unit loops: the row / tile loops exist only when rows / tiles > 1.
    loops = list(sch.get_loops(block)[1:])
    cki, cko, cji = loops.pop(), loops.pop(), loops.pop()
    sch.reorder(cko, *loops, cji, cki)
    init = sch.decompose_reduction(block, cko)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in loops:
        sch.unroll(loop)
    sch.tensorize(cji, intrin)


@functools.lru_cache(maxsize=256)
def generic_kernel(m: int | None, k: int, n: int, t: int, epilogue: tuple = (),
                   row_scaled: bool = False):
    """Portable PrimFunc ``(a[m,k] int8, w[N/t,K,t] int8, comp, scale, bias, *vectors,
    y[m,n])``, ``y`` through ``epilogue`` and ``row_scaled`` as in :func:`dot_kernel`; ``m``
    None: a symbolic row count (a dynamic batch or sequence length)."""
    from slimc.backends.tvm.quantized_ops import index_dtype, row_var
    from tvm import s_tir, te

    a = te.placeholder((row_var(m), k), "int8", name="a")
    w = te.placeholder((n // t, k, t), "int8", name="w")
    comp = te.placeholder((n,), "int32", name="comp")
    scale = te.placeholder((n,), "float32", name="scale")
    bias = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute((a.shape[0], n), lambda i, j: te.sum(
        a[i, r].astype("int32") * w[j // t, r, j % t].astype("int32"), axis=r), name="acc")
    vectors = epi.placeholders(epilogue, (n,))
    rows_in = _row_scales(row_scaled, (a.shape[0],))
    y = te.compute((a.shape[0], n), lambda i, j: epi.apply(
        _scaled((acc[i, j] - comp[j]).astype("float32") * scale[j], rows_in, (i,)) + bias[j],
        j, epilogue, vectors), name="y")
    sch = s_tir.Schedule(te.create_prim_func([a, w, comp, scale, bias, *rows_in, *vectors, y],
                                               index_dtype(m)))
    out = sch.get_sblock("y")
    i, j = sch.get_loops(out)
    jo, ji = sch.split(j, [None, t])
    sch.reorder(jo, i, ji)
    outer = sch.fuse(jo, i)
    sch.parallel(outer)
    if t > 1:
        sch.vectorize(ji)
    block = sch.get_sblock("acc")
    sch.compute_at(block, outer)
    sch.set_scope(block, 0, "local")
    loops = sch.get_loops(block)[1:]  # (lanes if t > 1, k)
    ck = loops[-1]
    if t > 1:  # vectorize before decompose_reduction: the update block alone is no reduction
        sch.reorder(ck, loops[0])
        sch.vectorize(loops[0])
    init = sch.decompose_reduction(block, ck)
    if t > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    name = f"slimc_linear_w8a8_generic_{m or 'dyn'}x{k}x{n}{epi.suffix(epilogue)}" + (
        "_rs" if row_scaled else "")
    func = sch.mod["main"].with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    if epilogue or row_scaled or m is None:  # symbolic rows: the Relax shapes are not static
        return func
    return with_rebuild(func, "generic", m, k, n, t)
