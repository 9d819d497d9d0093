"""Register-tiled multiply-accumulate rule: dense/matmul, batched matmul, conv2d, depthwise.

All of these are one reduction block ``C[..] += X[..] * Y[..]`` plus an elementwise epilogue
(bias, activation, residual add). The rule picks

* the **vector axis**: the innermost output axis, which must also be the innermost (contiguous)
  axis of one input -- ``j`` of ``W[k, j]`` (weights are pre-transposed at compile time by
  ``FoldConstant``), the output channel ``f`` of an NHWC conv's ``HWIO`` weights (the pipeline
  converts convs to NHWC), or ``x`` of an NCHW image;
* the **reuse axis**: the innermost output axis the vector-loaded input does not depend on
  (``i`` of a matmul, the output column of an NHWC conv), so one vector load feeds ``MR``
  accumulators;

and builds the classic micro-kernel: an ``MR x NR`` accumulator tile in a buffer of its own (on
the stack when small, see :func:`.common.tile_buffer_scope`, and kept in registers by LLVM
once the tile loops are unrolled/vectorized), reductions in between, the
epilogue computed straight from the accumulators, and all outer tiles fused into one parallel
loop. Vector tiles are walked outside reuse tiles, so each core keeps its ``K x NR`` weight
panel in L2 while it sweeps the rows. Tile sizes come from the target's vector width and SIMD
register count; a size that does not divide its axis gets a predicated tail, never a wrong
result. Depthwise convs have no reuse axis and get a wide single-row tile instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import ir, s_tir, tirx
from tvm.target import Target

from slimc import interrupts

from .common import (
    MIN_PARALLEL_MEMORY_WORK,
    MIN_PARALLEL_WORK,
    STACK_ALLOCA_BYTES,
    block_writes_output,
    extent,
    intermediate_buffers,
    is_spatial,
    loaded_buffer,
    log,
    parallelize,
    realize_bindings,
    simd_registers,
    tile_buffer_scope,
    vars_in,
    vector_lanes,
)
from .conv_prologue import PROLOGUE_ATTR
from .fallback import schedule_block
from .panel_prefetch import PREFETCH_PANEL
from .whole_tiles import CLAMP_PADDED_ROWS, PADDED_READS, WHOLE_TILES, is_guarded_read, padded_read

#: Kernel attribute listing the parameters that are constants (weights), set before scheduling.
CONSTANT_OPERANDS = "slimc.constant_operands"
#: Block annotation that makes ``SplitLayoutRewritePreproc`` hoist a weight rewrite out of a kernel.
PREPROC = "meta_schedule.layout_rewrite_preproc"

#: Multiply-accumulates below which a matmul runs on one thread.
MATMUL_PARALLEL_WORK = MIN_PARALLEL_WORK * 16
#: Walk the vector tiles (weight panels) outside the other spatial loops too (conv output rows),
#: so consecutive tasks of a core reuse one weight panel.
PANEL_OUTSIDE_ROWS = True
#: ... except for a conv whose whole filter is at most SMALL_WEIGHT_BYTES (a 1 x 1 conv over few
#: input channels: MobileNets' expansions, 16 -> 96 over 112 x 112): it stays in L1 anyway,
#: so the pixel rows go outside and each thread writes a contiguous half of the output
#: instead of every other panel of every pixel, and reads only its half of the input.
#: (Depthwise convs keep the panel outside: rows outside measured 1.04-1.07x slower there.)
SMALL_WEIGHT_ROWS_OUTSIDE = True
SMALL_WEIGHT_BYTES = 8 * 1024
#: ... and, beyond that, a kernel whose constant operand (filter, Winograd's transformed
#: filter) is smaller than the activation it multiplies and at most ROWS_OUTSIDE_MAX_WEIGHT
#: bytes splits its rows (pixels, Winograd tiles) over the threads too, so each core reads the
#: part of the activation its own previous kernel wrote and writes the part its next kernel
#: reads (:func:`_rows_outside`): with the panel outside, a core writes every other channel
#: panel of every pixel and the next kernel's core fetches half its input from the other
#: core's cache. The cap keeps the whole filter in one core's L2 (1 MiB: Zen 4's L2; Intel's
#: server cores have 2 MiB) while that core sweeps its rows. Depthwise convs keep the panel
#: outside (their filter is a few KiB; see above).
LARGER_OPERAND_ROWS_OUTSIDE = True
ROWS_OUTSIDE_MAX_WEIGHT = 1 << 20
#: A matmul whose row operand and output exceed COLUMN_BLOCK_MIN_BYTES walks its panels in
#: blocks of at most COLUMN_BLOCK_BYTES of weight, rows outside each block's panels
#: (:func:`_column_block_panels`; off only to measure what it saves).
COLUMN_BLOCKS = True
COLUMN_BLOCK_MIN_BYTES = 2 << 20
COLUMN_BLOCK_BYTES = 1 << 19
#: A batched matmul of two run-time operands (attention) walks each batch's rows outside its
#: panels (:func:`_runtime_rows_outside`; off only to measure what it saves) ...
RUNTIME_ROWS_OUTSIDE = True
#: ... when one batch of the vector operand fits in L2 (half of Zen 4's; Intel's is 2 MiB) ...
RUNTIME_ROWS_OUTSIDE_MAX_OPERAND_BYTES = 1 << 19
#: ... and one batch of the output is at least this large (256 x 256 floats).
RUNTIME_ROWS_OUTSIDE_MIN_OUTPUT_BYTES = 1 << 18
#: Pad symbolic (dynamic-length) tile axes to whole tiles instead of predicating every step
#: (see :func:`_pad_symbolic_tiles`; off only to measure what it saves).
PAD_SYMBOLIC_TILES = True
#: Pad fixed-size tile axes that the tile does not divide (ViT's 197 tokens) the same way, when
#: the padded operands are computed at run time (see :func:`_pad_symbolic_tiles`).
PAD_STATIC_TAILS = True
#: Largest share of extra (padded) rows or columns a static axis may get.
MAX_PAD_FRACTION = 0.25
#: ... and for the vector axis of a matmul (one reduction, no conv window) any share: its
#: predicated tail turns the whole micro-kernel scalar (TVM vectorizes no predicated loop), so
#: Swin's 49-key attention scores, 49 -> 64 columns (+31%), ran 7.8 ms predicated and ~0.5 ms
#: padded (192 windows x heads, 2 threads). Whole vectors cost ``ceil(n / lanes)`` operations
#: per row either way; the padding costs one copy of the runtime operand.
MATMUL_TAIL_PAD_FRACTION = 1.0
#: A constant operand (a weight) is padded along a static vector tail too, on every call, when
#: at least this many output rows reuse it: the copy (``K x N``) is then at most 1/64 of the
#: kernel's ``M x K x N`` work, while the predicated tail makes the whole micro-kernel scalar
#: (SegFormer-B0's 150-class 1 x 1 classifier over 128 x 128 pixels: 34% of the model's time).
CONSTANT_PAD_MIN_ROWS = 64

#: A matmul vector axis only a narrow (< lanes) panel divides is padded to one full vector
#: per panel when two would add too much (:func:`_pad_symbolic_tiles`; off only to measure).
NARROW_PANEL_PADDING = True
#: Grouped convs get vector tiles inside one group (:func:`_group_width`).
GROUPED_CONV_TILES = True
#: Convs over inputs of at most FEW_CHANNELS channels (a network's RGB stem) read their zero
#: padding in place like depthwise convs (:func:`_few_input_channels`).
FEW_CHANNEL_PADDING = True
FEW_CHANNELS = 4
#: Prefer a tile one row shorter when that puts its accumulators on the stack
#: (:func:`_stack_tile_rows`; off only to measure what it saves).
STACK_TILE_ROWS = True
#: Depthwise convs read their zero padding through a guarded load, dropped in the tiles that
#: lie inside the image (:func:`_read_padding_in_place`), instead of a window copied per tile.
INLINE_DEPTHWISE_PADDING = True
#: The elementwise chain between an accumulator and a broadcast into a larger map (a
#: squeeze-excite gate) runs once per accumulator element, not once per element of the map
#: (:func:`_inline_epilogue`; off only to measure what it saves).
BROADCAST_EPILOGUE_ONCE = True
#: A depthwise conv whose input image is larger than this splits its pixel rows over the
#: threads, like the dense convs above (:func:`_rows_outside`), instead of its channel panels.
#: Why: with the panel outside, every panel sweeps the whole image, reading its own
#: ``NR``-channel slice of each pixel, and each thread reads every pixel row -- half of them
#: written by the other core's previous kernel (the 1x1 convs before split rows too); an image
#: beyond one core's L2 is streamed from L3 / memory once per panel. Rows outside read each
#: row once, on the core that wrote it. Measured in the model, not alone: a kernel timed alone
#: (20 calls back to back) has its image hot in its own L2, and there the 56 x 56 x 144 conv
#: ran 1.2-1.37x *slower* with rows outside at 2 threads (wt/mob18); in the model the same
#: conv ran 3-4x its alone time with the panel outside (``benchmarks/call_gap.py``), and rows
#: outside for every depthwise image over 256 KiB made MobileNetV2 0.95x and V3-Large 0.93x
#: as long at 2 threads, 0.96x / 0.99x at one (wt/mnv3pad, interleaved A/B). 7 x 7 maps (at
#: most 188 KiB in these nets) keep the panel outside: 7 rows over 2 threads split 4 : 3.
DEPTHWISE_ROWS_OUTSIDE_BYTES = 256 << 10
#: A tall tile (below) over a packed constant weight of at least PREFETCH_MIN_WEIGHT_BYTES
#: prefetches the next weight panel's row in each reduction step (:mod:`.panel_prefetch`).
#: Measured, not assumed: with it the 10 x 16 kernels of CLIP B/32's dense layers ran
#: 0.74-0.92x as long as without (one thread, ``benchmarks/weight_stream.py``), mostly
#: because LLVM then addresses the activation rows base + displacement, not base + index
#: (an indexed memory operand unlaminates each of the ten broadcast FMAs on Intel); on the
#: 5 x 32 tiles it measured 1.04-1.06x slower, so it is not used there.
PANEL_PREFETCH = True
PREFETCH_MIN_WEIGHT_BYTES = 1 << 20
#: A matmul whose rows only allow a short tile on two-vector panels (50 tokens: 5 x 32 on
#: AVX-512) takes a tile twice as tall on one-vector panels instead (10 x 16; see
#: :func:`_tall_tile_rows`; off only to measure what it saves).
TALL_NARROW_TILES = True
#: ... only in place of tiles of at most this many rows: 7- and 8-row tiles (49 tokens, CNN
#: widths of 14 / 28, 196 patches) were not measured against 14 x 16.
TALL_TILE_MAX_SHORT_ROWS = 6

#: Reduction steps of a conv's multi-row register tile unrolled into one loop iteration
#: (:func:`_reduction_unroll`; 1: LLVM's choice, one step per iteration).
REDUCTION_UNROLL = 4

#: A dense conv's zero-padded input copy splits its rows over the threads from this many
#: elements on (:func:`_padding_over_threads`; off only to measure what it saves).
DENSE_PADDING_OVER_THREADS = True
DENSE_PADDING_PARALLEL_ELEMENTS = 1 << 15

#: A conv's prologue (a pre-activation batch norm + ReLU, :mod:`.conv_prologue`) is computed
#: per tile (:func:`_prologue_per_tile`) instead of as a pass over the whole map (off only to
#: measure what it saves).
CONV_PROLOGUE_PER_TILE = True
#: ... once per row tile, its output panels walked inside the tile's task
#: (:func:`_prologue_panels_inside`), when that leaves at least this many parallel tasks.
PROLOGUE_PANELS_INSIDE = True
PROLOGUE_PANELS_INSIDE_MIN_TASKS = 16

#: On 16-register targets (AVX2) a conv whose output width 4 rows do not divide (14 / 7-pixel
#: maps) takes one-vector panels with up to 8 rows instead of two-vector ones with 4 rows and a
#: predicated tail (:func:`_sixteen_register_panel`; off only to measure what it saves;
#: ``"all"``: at every width, measured slower on 28 / 56 / 112-pixel maps).
SIXTEEN_REGISTER_NARROW: bool | str = True
#: ... depthwise convs too (two vector loads per multiply-add, no broadcast; off only to
#: measure what it saves).
SIXTEEN_REGISTER_NARROW_DEPTHWISE = True


@dataclass
class _Axes:
    """Loops of the main block, classified."""

    shared: list  # spatial loops every operand depends on (batch, heads, image)
    extra: list  # other spatial loops (conv output rows)
    reuse: object | None
    vector: object
    reduce: list
    contiguous: int  # read index of the operand loaded along the vector axis
    #: Output channels per group of a grouped conv (the image is read at ``f // G * G + c``),
    #: when a vector tile fits in one group; None otherwise.
    group: int | None = None


class TiledMatmul:
    """Matmul / batched matmul / conv2d rule (see module docstring)."""

    name = "tiled-matmul"

    def apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        reductions = [b for b in blocks if not is_spatial(sch, b)]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        if not _is_multiply_accumulate(sch.get(main)):
            return None
        axes = _classify(sch, main)
        if axes is None:
            return None
        # decided before padding (a padded copy of a weight is no longer a constant parameter)
        runtime_rows = _runtime_rows_outside(sch, main, axes, func)
        if PAD_SYMBOLIC_TILES and _pad_symbolic_tiles(sch, main, axes, target, runtime_rows):
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            main = next(b for b in blocks if not is_spatial(sch, b))
            axes = _classify(sch, main)
            if axes is None:
                return None
        position = blocks.index(main)
        intermediates = intermediate_buffers(sch)
        producers = blocks[:position]
        epilogue = _inline_epilogue(sch, blocks[position + 1:], intermediates,
                                    sch.get(main).writes[0].source.shape)
        # a grouped conv whose vector tiles fit in a group reads its image like a dense conv
        lanes = vector_lanes(target, sch.get(main).writes[0].source.dtype.bits)
        grouped = _group_panel(axes.group, extent(sch, axes.vector), lanes) is not None
        depthwise = not grouped and _reads_input_along_vector(sch, main, axes)
        prologues = [b for b in producers if PROLOGUE_ATTR in sch.get(b).annotations]
        fused = _tile(sch, main, axes, target, epilogue, func, depthwise, bool(prologues),
                      runtime_rows)
        for block in producers:  # padding, reshapes feeding the kernel
            if any(block.same_as(b) for b in prologues):
                continue  # after the copies it feeds are inlined (below)
            if _inline_copy(sch, block, intermediates):
                continue
            if (depthwise or FEW_CHANNEL_PADDING and _few_input_channels(sch, main, axes)) \
                    and INLINE_DEPTHWISE_PADDING \
                    and _read_padding_in_place(sch, block, main, fused):
                continue
            if depthwise and _pad_per_tile(sch, block, fused, target):
                continue
            if not depthwise and _padding_over_threads(sch, block, target):
                continue
            if sch.get(block).name_hint.endswith("_pad"):
                _schedule_padding(sch, block, target)
            else:
                schedule_block(sch, block, target)
        for block in prologues:
            if not (CONV_PROLOGUE_PER_TILE and _prologue_per_tile(sch, block, fused, target)):
                schedule_block(sch, block, target)
        return sch


def _prologue_per_tile(sch: s_tir.Schedule, block, fused, target: Target) -> bool:
    """Compute a conv's prologue (:mod:`.conv_prologue`: a pre-activation batch norm and
    ReLU) per tile, into a buffer of the tile's ``MR`` pixels by all input channels,
    vectorized over the channels.

    Why: made as its own pass the normalized map is written to memory and read back by the
    conv; per tile it stays in L1/L2. Inlined into the micro-kernel instead, it would run
    scalar, once per pixel and channel and output panel, next to the broadcast each
    multiply-add already needs. Per tile it costs ``MR x K / lanes`` vector operations once
    per output panel, a few percent of the tile's ``MR x K x NR / lanes`` multiply-adds.
    """
    try:
        sch.compute_at(block, fused, preserve_unit_loops=True)
    except Exception:  # noqa: BLE001 - keep it a pass of its own
        interrupts.check()
        return False
    inner = sch.get_loops(block)[-1]
    n = extent(sch, inner)
    lanes = vector_lanes(target, sch.get(block).writes[0].source.dtype.bits)
    if n is not None and n % lanes == 0:
        if n > lanes:
            inner = sch.split(inner, factors=[None, lanes])[-1]
        sch.vectorize(inner)
    return True


def _inline_copy(sch: s_tir.Schedule, block, intermediates: set) -> bool:
    """Read a producer that only copies its input (the ``pad_temp`` TVM's legalizer puts in
    front of every conv, also without padding: all 1x1 convs) straight from that input.

    Left alone it is a full pass over the feature map before each 1x1 conv, on one thread
    below :data:`~.common.MIN_PARALLEL_MEMORY_WORK` elements (ResNet-50's 14 x 14 x 1024
    inputs); inlined, the kernel loads the same addresses from the input itself.
    """
    stmt = sch.get(block)
    store = stmt.body
    if not isinstance(store, tirx.BufferStore) or loaded_buffer(store.value) is None \
            or block_writes_output(sch, block, intermediates) or not is_spatial(sch, block):
        return False
    load = list(store.value.indices)
    if len(load) != len(store.indices) or not all(
            isinstance(a, tirx.Var) and a.same_as(b) for a, b in zip(load, store.indices,
                                                                     strict=True)):
        return False  # a reshape or a shifted (padded) read: index arithmetic per load
    try:
        sch.compute_inline(block)
    except Exception:  # noqa: BLE001 - keep the copy, scheduled as before
        interrupts.check()
        return False
    return True


def _reads_input_along_vector(sch: s_tir.Schedule, main, axes: _Axes) -> bool:
    """Whether the image operand too is indexed by the vector (output channel) axis: a
    depthwise conv, whose channels are not reduced over, so each input element feeds only
    the ``kh x kw`` taps of its own channel."""
    stmt = sch.get(main)
    var = next(iv.var for iv, b in zip(stmt.iter_vars, realize_bindings(sch, sch.get_loops(main)),
                                       strict=True)
               if isinstance(b, tirx.Var) and b.same_as(sch.get(axes.vector).loop_var))
    other = [r.min for r in stmt.reads[1 - axes.contiguous].region]
    return var in vars_in(other)


def _pad_per_tile(sch: s_tir.Schedule, block, fused, target: Target) -> bool:
    """Compute a depthwise conv's zero-padded input per tile, from the tile's loop.

    Made as its own pass, the padded copy of the whole feature map is more memory traffic
    than the conv itself, which does only ``kh x kw`` multiply-adds per input element
    (EfficientNet's stride-2 3 x 3 over 112 x 112 x 144: a 7.5 MB copy, 4x ONNX Runtime's
    time for the conv). Per tile, the window (``kh`` rows, the tile's columns plus the halo,
    ``NR`` channels) is copied into a few KiB that stay in L1 while the taps read it.
    """
    try:
        sch.compute_at(block, fused, preserve_unit_loops=True)
    except Exception:  # noqa: BLE001 - keep the whole-map copy
        interrupts.check()
        return False
    loops = sch.get_loops(block)
    inner = loops[-1]
    n = extent(sch, inner)
    lanes = vector_lanes(target, sch.get(block).writes[0].source.dtype.bits)
    if n is not None and n % lanes == 0:
        if n > lanes:
            inner = sch.split(inner, factors=[None, lanes])[-1]
        sch.vectorize(inner)
    return True


def _padding_over_threads(sch: s_tir.Schedule, block, target: Target) -> bool:
    """Copy a dense conv's zero-padded input (``pad_temp``) with its rows split over the
    threads once it has :data:`DENSE_PADDING_PARALLEL_ELEMENTS` elements, its channels
    vectorized.

    Why: scheduled like any elementwise block, the copy stays on one thread below
    :data:`~.common.MIN_PARALLEL_MEMORY_WORK` elements, while the conv after it is parallel:
    ResNet-50's stride-2 3 x 3 convs copy 16 x 16 x 512 and 30 x 30 x 256 floats (0.5 and
    0.9 MB) on one core while the other waits, and the conv then reads the half of the
    copy that is in the other core's cache.
    """
    if not DENSE_PADDING_OVER_THREADS:
        return False
    store = sch.get(block).body
    if not isinstance(store, tirx.BufferStore) or padded_read(store.value) is None \
            or not is_spatial(sch, block):
        return False
    loops = sch.get_loops(block)
    extents = [extent(sch, lp) for lp in loops]
    if len(loops) < 2 or any(e is None for e in extents):
        return False
    if math.prod(extents) < DENSE_PADDING_PARALLEL_ELEMENTS:
        return False
    lanes = vector_lanes(target, sch.get(block).writes[0].source.dtype.bits)
    if extents[-1] % lanes == 0:
        inner = sch.split(loops[-1], factors=[None, lanes])[-1] if extents[-1] > lanes \
            else loops[-1]
        sch.vectorize(inner)
    rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    parallelize(sch, rows, DENSE_PADDING_PARALLEL_ELEMENTS)
    return True


def _few_input_channels(sch: s_tir.Schedule, main, axes: _Axes) -> bool:
    """Whether ``main`` is a conv over an image of at most :data:`FEW_CHANNELS` channels (a
    network's stem: RGB), whose zero-padded input copy is worth reading in place.

    Why: such a copy is a scalar loop (3 channels cannot be vectorized) over the whole
    input, serial below :data:`~.common.MIN_PARALLEL_MEMORY_WORK` elements, in front of a
    conv that does only ``kh x kw x 3`` multiply-adds per output vector (MobileNetV2's
    3 x 3 stride-2 stem over 224 x 224 x 3); it was the part of the stem that did not get
    faster with a second thread.
    """
    if len(axes.reduce) != 3:  # kh, kw, input channels
        return False
    channels = extent(sch, axes.reduce[-1])
    return channels is not None and channels <= FEW_CHANNELS


def _read_padding_in_place(sch: s_tir.Schedule, block, main, fused) -> bool:
    """Read a depthwise conv's zero padding through a guarded load: the padded copy is
    inlined (``if_then_else(inside, X[y + ry - 1, ..], 0)`` per tap) and the tile loop split
    into tiles inside the image, which load ``X`` unguarded, and edge tiles
    (:mod:`.whole_tiles`).

    Why: with ``kh x kw`` multiply-adds per input element, a depthwise conv is dominated by
    memory traffic, and a padded window copied per tile (:func:`_pad_per_tile`) was half its
    time on one thread (a 3 x 3 over 56 x 56 x 144: 0.47 ms, 0.22 ms on an input padded
    beforehand); the workspace each window is allocated from costs per tile too.
    """
    store = sch.get(block).body
    if not isinstance(store, tirx.BufferStore) or padded_read(store.value) is None \
            or not is_spatial(sch, block):
        return False
    try:
        sch.compute_inline(block)
    except Exception:  # noqa: BLE001 - keep the copy (per tile)
        interrupts.check()
        return False
    sch.annotate(main, PADDED_READS, 1)
    sch.annotate(fused, WHOLE_TILES, 1)
    return True


def _is_multiply_accumulate(block: s_tir.SBlock) -> bool:
    """``C[..] = C[..] + X * Y`` (casts allowed) with two distinct inputs."""
    if len(block.writes) != 1 or len(block.reads) != 2:
        return False
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return False
    acc, prod = store.value.a, store.value.b
    buffer = loaded_buffer(acc)
    if buffer is None or not buffer.same_as(store.buffer):
        return False
    while isinstance(prod, tirx.Cast):
        prod = prod.value
    return isinstance(prod, tirx.Mul)


def _classify(sch: s_tir.Schedule, main) -> _Axes | None:
    stmt = sch.get(main)
    loops = sch.get_loops(main)
    bindings = realize_bindings(sch, loops)
    if bindings is None or len(loops) != len(stmt.iter_vars):
        return None
    loop_of = {}
    for loop, iv, binding in zip(loops, stmt.iter_vars, bindings, strict=True):
        if not (isinstance(binding, tirx.Var) and binding.same_as(sch.get(loop).loop_var)):
            return None
        loop_of[iv.var] = (loop, iv.iter_type)
    spatial = [(v, lp) for v, (lp, t) in loop_of.items() if t == tirx.IterVar.DataPar]
    reduce = [lp for v, (lp, t) in loop_of.items() if t == tirx.IterVar.CommReduce]
    if not spatial or not reduce or len(spatial) + len(reduce) != len(loops):
        return None
    out_index = [r.min for r in stmt.writes[0].region]
    vec_var, vec_loop = spatial[-1]
    if not (isinstance(out_index[-1], tirx.Var) and out_index[-1].same_as(vec_var)):
        return None
    # The input read contiguously along the vector axis, and the other one.
    contiguous = None
    for i, region in enumerate(stmt.reads):
        idx = [r.min for r in region.region]
        if vec_var in vars_in(idx[-1]) and not any(vec_var in vars_in(e) for e in idx[:-1]):
            contiguous = i
    if contiguous is None:
        return None
    vec_operand = vars_in([r.min for r in stmt.reads[contiguous].region])
    other_operand = vars_in([r.min for r in stmt.reads[1 - contiguous].region])
    # Reuse axis: the innermost output axis the vector-loaded operand does not depend on (the
    # rows of a matmul, the output pixels of an NHWC conv, the output channels of an NCHW one).
    reuse_var = next((v for v, _ in reversed(spatial[:-1])
                      if v not in vec_operand and v in other_operand), None)
    reuse, shared, extra = None, [], []
    for var, loop in spatial[:-1]:
        if reuse_var is not None and var.same_as(reuse_var):
            reuse = loop
        elif var in vec_operand and var in other_operand:
            shared.append(loop)
        else:
            extra.append(loop)
    # convs only (a window or several reduction axes): a matmul's operands are not grouped
    conv = bool(extra) or len(reduce) > 1
    group = _group_width(stmt.reads[1 - contiguous], vec_var) \
        if GROUPED_CONV_TILES and conv else None
    return _Axes(shared, extra, reuse, vec_loop, reduce, contiguous, group)


def _group_width(region, vec_var) -> int | None:
    """``G`` when the image operand is read at ``f // G * G + c`` (a grouped conv with ``G``
    output channels per group; ``f`` the vector axis), else None.

    Why: a vector tile inside one group reads one image element for all its lanes (a
    broadcast, as in a dense conv), where a tile straddling two groups (32 lanes over 48
    channels per group) reads it through a gather and was treated as depthwise: wav2vec2's
    positional conv (768 channels in 16 groups, kernel 128 over 99 frames) ran 85 ms, 7x
    PyTorch.
    """
    widths: list[int] = []

    def visit(node) -> None:  # index arithmetic: binary ops and casts
        if isinstance(node, tirx.FloorDiv) and isinstance(node.b, tirx.IntImm) \
                and vec_var in vars_in(node.a):
            widths.append(int(node.b.value))
        for child in (getattr(node, "a", None), getattr(node, "b", None),
                      getattr(node, "value", None)):
            if isinstance(child, ir.expr.Expr):
                visit(child)

    for r in region.region:
        visit(r.min)
    return widths[0] if len(widths) == 1 and widths[0] > 1 else None


def _pad_symbolic_tiles(sch: s_tir.Schedule, main, axes: _Axes, target: Target,
                        runtime_rows: bool = False) -> bool:
    """Pad a symbolic reuse / vector axis (a dynamic sequence length) to whole tiles.

    Split by the tile size, a symbolic axis leaves a predicate ``row < seq`` in every step of
    the micro-kernel, which then no longer keeps its accumulators in registers (MiniLM's dense
    layers ran 2x slower than at a fixed length). ``pad_einsum`` instead computes on inputs
    copied into zero-padded buffers, whose extents are multiples of the tile, and copies the
    valid rows out: two cheap passes over the activations for an unpredicated kernel.

    The same holds for a fixed vector axis that is not a multiple of its tile (the key axis of
    ViT's 197-token attention scores): the tail's predicate sits on every vector load and
    store of the micro-kernel (6 x 197 x 64 x 197 scores: 40 ms predicated, 3 ms padded, on
    the loaded host). Such an axis is padded too (``PAD_STATIC_TAILS``) when that adds at most
    ``MAX_PAD_FRACTION`` and every operand it pads is computed at run time -- a padded weight
    would be copied on every call instead of once, at build time, by
    :func:`_pack_constant_operand`. A fixed *reuse* axis is padded only along with such a
    vector axis: on its own its predicated tail guards just the last row tile, and padding it
    measured no faster (197-row dense layers).
    """
    dtype_bits = sch.get(main).writes[0].source.dtype.bits
    mr, nr, _ = _tile_sizes(sch, axes, target, dtype_bits, runtime_rows)
    loops = sch.get_loops(main)
    factors = [1] * len(loops)
    vector_size = extent(sch, axes.vector)
    # matmuls only: a padded conv input copy measured 10x slower (Whisper's conv1d over 3000
    # frames)
    matmul = len(axes.reduce) == 1 and not axes.extra
    pad_static = (PAD_STATIC_TAILS and vector_size is not None
                  and _static_tail_worth_padding(
                      sch, main, axes.vector, vector_size, nr,
                      MATMUL_TAIL_PAD_FRACTION if matmul else MAX_PAD_FRACTION,
                      # a conv's window indexing is no einsum: pad_einsum refuses it
                      pad_constants=len(axes.reduce) == 1))
    lanes = vector_lanes(target, dtype_bits)
    # any one-reduction (einsum) kernel: also a matmul over NHWC pixels, whose second
    # spatial axis is an ``extra`` loop (a 1x1 conv as a matmul) -- padding the vector axis
    # copies the weight and the output, never the image
    if PAD_STATIC_TAILS and vector_size is not None and nr < lanes and len(axes.reduce) == 1:
        # Only a narrow panel divides the axis (Whisper's 1500 keys: 4 of AVX-512's 16
        # lanes, a quarter of the machine): pad it to whole full-width panels instead --
        # two vectors wide when that adds little, else one (MobileViT's 36-wide attention
        # heads: ``P @ V`` on 4-lane panels, 36 -> 48 columns is 3 whole vectors a row
        # instead of 9 quarter ones; ``MATMUL_TAIL_PAD_FRACTION`` as for any vector tail).
        # A constant weight is padded too when ``CONSTANT_PAD_MIN_ROWS`` rows reuse it
        # (ShuffleNetV2's 116-channel 1x1 convs over 14 x 14 pixels, as matmuls).
        wide = next((t for t, limit in ((2 * lanes, MAX_PAD_FRACTION),
                                        (lanes, MATMUL_TAIL_PAD_FRACTION))
                     if NARROW_PANEL_PADDING or t == 2 * lanes
                     if _static_tail_worth_padding(sch, main, axes.vector, vector_size, t,
                                                   limit, pad_constants=True)), None)
        if wide is not None:
            nr, pad_static = wide, True
    for tile, loop in ((mr, axes.reuse), (nr, axes.vector)):
        if loop is None or tile <= 1:
            continue
        size = extent(sch, loop)
        # With a padded vector axis a predicated row tail would lose its guard on the
        # write-back (TVM drops the row condition there), so the rows are padded along.
        if size is None or pad_static and size % tile and size > tile:
            factors[[sch.get(lp).same_as(sch.get(loop)) for lp in loops].index(True)] = tile
    if all(f == 1 for f in factors):
        return False
    symbolic_rows = axes.reuse is not None and extent(sch, axes.reuse) is None
    symbolic_columns = vector_size is None  # e.g. the key axis of attention scores
    sch.pad_einsum(main, factors)
    if symbolic_rows:
        _read_operand_in_place(sch, main, 1 - axes.contiguous)
    if symbolic_columns:
        _read_operand_in_place(sch, main, axes.contiguous)
    return True


def _output_rows(stmt, columns: int) -> int:
    """Output elements of ``stmt`` per column of its ``columns``-wide vector axis: the rows
    that reuse each weight column (0 when an extent is symbolic)."""
    total = 1
    for dim in stmt.writes[0].source.shape:
        if not isinstance(dim, tirx.IntImm):
            return 0
        total *= int(dim)
    return total // max(columns, 1)


def _static_tail_worth_padding(sch: s_tir.Schedule, main, loop, size: int, tile: int,
                               max_fraction: float = MAX_PAD_FRACTION,
                               pad_constants: bool = False) -> bool:
    """Whether a fixed axis of ``size`` should be padded to a multiple of ``tile``."""
    if size <= tile or size % tile == 0:
        return False
    padded = -(-size // tile) * tile
    if padded - size > max_fraction * size:
        return False
    var = sch.get(loop).loop_var
    stmt = sch.get(main)
    bindings = dict(zip([iv.var for iv in stmt.iter_vars],
                        realize_bindings(sch, sch.get_loops(main)), strict=True))
    ivar = next((v for v, b in bindings.items() if isinstance(b, tirx.Var) and b.same_as(var)),
                None)
    func = sch.mod["main"]
    if pad_constants and _output_rows(stmt, size) >= CONSTANT_PAD_MIN_ROWS:
        return True
    constant = func.attrs.get(CONSTANT_OPERANDS) if func.attrs is not None else None
    constant_params = [func.params[int(i)] for i in (constant or [])]
    for region in stmt.reads:
        if ivar is not None and any(ivar in vars_in(r.min) for r in region.region) \
                and any(p.same_as(region.source) for p in constant_params):
            return False
    return True


def _read_operand_in_place(sch: s_tir.Schedule, main, operand: int) -> None:
    """Read a padded operand straight from its buffer instead of a zero-padded copy.

    The rows (or columns) beyond the length only feed output rows (columns) that are never
    stored, so their values do not matter, only that reading them stays in bounds: the copy
    is inlined (a guarded read ``row < seq ? X[row, k] : 0``), the whole tiles drop the guard
    (:mod:`.whole_tiles`) and :func:`clamp_padded_rows` turns the edge tiles' guard into
    ``X[min(row, seq - 1), k]``. One pass over the activations fewer per dense layer (the
    copy cost as much as the fixed-length kernel's whole epilogue at short lengths), and no
    copy of ``K^T`` per attention layer. A symbolic vector (columns) operand read this way is
    a gather in the edge tiles only.
    """
    reads = sch.get(main).reads
    if operand not in (0, 1) or len(reads) != 2:
        return
    padded = reads[operand].source
    for block in sch.get_producers(main):
        if any(w.source.same_as(padded) for w in sch.get(block).writes):
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - keep the copy
                interrupts.check()
                return
            sch.annotate(main, CLAMP_PADDED_ROWS, 1)
            return


def clamp_padded_rows(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """In blocks marked :data:`CLAMP_PADDED_ROWS`, ``if_then_else(i < n, X[.., i, ..], 0)``
    becomes ``X[.., min(i, n - 1), ..]`` (see :func:`_read_operand_in_place`)."""
    import tvm_ffi
    from tvm.ir.expr import Call

    def clamp(call):
        guarded = is_guarded_read(call)
        if guarded is None:
            return call
        row, bound, then = guarded
        last = tirx.Min(row, bound - tirx.const(1, "int64"))
        return tvm_ffi.structural_map(
            then, [(tirx.Var, lambda v: last if v.same_as(row) else v)])

    def on_block(block):
        if CLAMP_PADDED_ROWS not in block.annotations:
            return block
        return tvm_ffi.structural_map(block, [(Call, clamp)])

    return tvm_ffi.structural_map(func, [(s_tir.SBlock, on_block)])


def _schedule_padding(sch: s_tir.Schedule, block, target: Target) -> None:
    """A ``pad_einsum`` input copy: parallel over its first axis, the last one vectorized.

    Not fused like other elementwise blocks: fusing loops with symbolic extents leaves a
    division and modulo by the padded length per element.
    """
    loops = sch.get_loops(block)
    bits = sch.get(block).writes[0].source.dtype.bits
    lanes = vector_lanes(target, bits)
    n = extent(sch, loops[-1])
    if n is None or n % lanes == 0 and n > lanes:
        _, inner = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(inner)
    if len(loops) > 1:
        parallelize(sch, loops[0], MIN_PARALLEL_MEMORY_WORK)


def _inline_epilogue(sch: s_tir.Schedule, consumers: list, intermediates: set,
                     accumulated=None) -> list:
    """Inline intermediate elementwise consumers; return the blocks left to schedule.

    A block of the accumulator's size whose consumer broadcasts it into a larger map (a
    squeeze-excite gate: bias + sigmoid of a 1 x 1 x C conv, times an H x W x C feature map)
    is kept: inlined into the broadcast it would be recomputed for every pixel (the whole
    sigmoid, ``exp`` and a division, H x W times per channel); kept, it becomes an epilogue
    of the accumulator tile (:func:`_tile`), computed once per channel.
    """
    remaining = []
    for block in consumers:
        if not block_writes_output(sch, block, intermediates) \
                and not _feeds_a_broadcast(sch, block, accumulated):
            try:
                sch.compute_inline(block)
                continue
            except Exception:  # noqa: BLE001 - keep it, scheduled on its own below
                interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                pass
        remaining.append(block)
    return remaining


def _feeds_a_broadcast(sch: s_tir.Schedule, block, accumulated) -> bool:
    """Whether ``block`` writes no more than the accumulator ``accumulated`` and one of its
    consumers writes more (:func:`_broadcasts_beyond`)."""
    if not BROADCAST_EPILOGUE_ONCE or accumulated is None:
        return False
    if _broadcasts_beyond(sch.get(block).writes[0].source.shape, accumulated):
        return False
    return any(_broadcasts_beyond(sch.get(c).writes[0].source.shape, accumulated)
               for c in sch.get_consumers(block))


def panel_width(n: int | None, lanes: int, single_row: bool = False) -> int:
    """``NR``: output columns per micro-kernel tile, and the width of the panels a constant
    weight is packed into (:func:`_pack_constant_operand`). Matrix-vector kernels that read the
    same weight (``gemv.py``) pack it with the multi-row width, so both store it identically."""
    wide = [4 * lanes, 2 * lanes] if single_row else [2 * lanes]
    nr = next((v for v in [*wide, lanes, lanes // 2, 4] if n and v <= n and n % v == 0), None)
    if nr is None:
        nr = n if n is not None and n <= 2 * lanes else lanes
    return nr


def _group_panel(group: int | None, n: int | None, lanes: int) -> int | None:
    """The widest vector tile inside one group of ``group`` channels (and dividing ``n``)."""
    if group is None:
        return None
    return next((v for v in (2 * lanes, lanes, lanes // 2, 4)
                 if v > 1 and group % v == 0 and (n is None or n % v == 0)), None)


def _tile_sizes(sch, axes: _Axes, target: Target, dtype_bits: int,
                runtime_rows: bool = False, depthwise: bool = False) -> tuple[int, int, bool]:
    """``(MR, NR, tall)`` of the micro-kernel; ``tall``: a :func:`_tall_tile_rows` tile.

    ``runtime_rows`` (:func:`_runtime_rows_outside`): the tile stays two vectors wide and on
    the stack (:func:`_stack_rows`) -- the tall tile reads its vector operand one vector per
    ``MR`` broadcasts, which pays off for a weight packed at build time, not for an unpacked
    ``K^T`` (Whisper's scores: 15 x 16 ran ~1.4x as long as 6 x 32), and T5's 8 x 32 tile
    (256 rows) was a workspace allocation per tile.
    """
    lanes = vector_lanes(target, dtype_bits)
    n = extent(sch, axes.vector)
    m = extent(sch, axes.reuse) if axes.reuse is not None else 1
    nr = _group_panel(axes.group, n, lanes) or panel_width(n, lanes, single_row=m == 1)
    accumulators = simd_registers(target) // 2  # leave room for the loads and broadcasts
    mr_max = max(1, min(8, accumulators * lanes // max(nr, 1)))
    if m is None:
        return mr_max, nr, False
    if _sixteen_register_panel(axes, target, m, nr, lanes, mr_max, dtype_bits, runtime_rows,
                               depthwise):
        nr = lanes
        mr_max = max(1, min(8, accumulators * lanes // nr))
    mr = next((v for v in range(mr_max, 0, -1) if m % v == 0 and v * 2 > mr_max), None)
    mr = mr or min(mr_max, m)
    if runtime_rows:
        return _stack_rows(m, mr, nr, dtype_bits), nr, False
    if STACK_TILE_ROWS:
        mr = _stack_tile_rows(m, mr, nr, dtype_bits)
    if TALL_NARROW_TILES and not axes.extra and axes.group is None and len(axes.reduce) == 1 \
            and nr == 2 * lanes and dtype_bits == 32 and simd_registers(target) >= 32 \
            and lanes * dtype_bits >= 512:
        tall = _tall_tile_rows(m, mr, lanes, dtype_bits)
        if tall:
            return tall, lanes, True
    return mr, nr, False


def _sixteen_register_panel(axes: _Axes, target: Target, m: int, nr: int, lanes: int,
                            mr_max: int, dtype_bits: int, runtime_rows: bool,
                            depthwise: bool = False) -> bool:
    """Whether a conv on a 16-register target (AVX2: 8 float lanes) takes one-vector panels
    (``NR = lanes``, up to 8 rows) instead of two-vector ones.

    Why: with 16 registers the two-vector tile has 4 rows (8 accumulators, room for two panel
    loads and a broadcast; 7 x 16's 14 accumulators leave none), and 4 does not divide the
    14- and 7-pixel widths of a 224-pixel CNN's last stages, so every row's last tile ran
    predicated. ``7 x 8`` tiles are whole there. Alone, 2 threads, AMD Zen 3 (wt/cnn24,
    ``benchmarks/conv_variants.py`` variant ``narrow``, folded batch norm): ResNet-50's
    1024 -> 256 / 256 -> 1024 over 14 x 14 and 512 -> 2048 over 7 x 7 ran 0.54-0.72x as
    long, MobileNetV2's 576 -> 96, 96 -> 576, 384 -> 64, 64 -> 384, 576 -> 160, 160 -> 960,
    960 -> 320 0.70-0.80x; 7 x 16 tiles (spilling) only 0.82-0.95x, and 14 x 8 ones over
    14 x 14 (14 accumulators) 1.1-3x as long as 7 x 8. On the 28 / 56 /
    112-pixel maps, where 4 x 16 is whole, one-vector panels ran 1.1-1.6x as long
    (``SIXTEEN_REGISTER_NARROW = "all"``), so they keep it. The 32-register targets
    (AVX-512, aarch64) are not changed: their 7 x 32 / 8 x 16 tiles divide these widths.
    Depthwise convs alike (:data:`SIXTEEN_REGISTER_NARROW_DEPTHWISE`, variant ``dwnarrow``):
    MobileNetV3 / EfficientNet's 5 x 5 672-channel one over 14 x 14 0.70x, MobileNetV2's
    3 x 3 960-channel one over 7 x 7 0.85x, its 576-channel one over 14 x 14 0.97x. Convs
    only (a window, or a second spatial axis), not grouped ones.
    """
    if depthwise and not SIXTEEN_REGISTER_NARROW_DEPTHWISE:
        return False
    if not SIXTEEN_REGISTER_NARROW or runtime_rows or simd_registers(target) != 16 \
            or dtype_bits != 32 or axes.group is not None or nr != 2 * lanes \
            or not (axes.extra or len(axes.reduce) > 1):
        return False
    return SIXTEEN_REGISTER_NARROW == "all" or m % mr_max != 0


def _tall_tile_rows(m: int, mr: int, lanes: int, dtype_bits: int) -> int | None:
    """Rows of a one-vector-wide tile at least twice as tall as ``mr`` that divide ``m`` and
    keep the accumulators on the stack (under :data:`~.common.STACK_ALLOCA_BYTES`), or None.

    Why: each step of the reduction loads the tile's ``NR``-wide row of the weight panel
    (from L2: a ``K x NR`` panel is larger than L1) and reuses it for ``MR`` rows, so the
    weight bytes read per multiply-add are ``4 * 16 / MR`` whatever ``NR`` is. With 50 rows
    the two-vector panel's tile is 5 x 32 (8, 7 and 6 do not divide 50, and 8 x 32 floats is
    no longer a stack buffer); 10 x 16 reads half as much weight per multiply-add for one
    broadcast per vector multiply-add: CLIP B/32's 50-row dense layers (768 -> 3072, 3072 ->
    768, 768 -> 2304) ran 0.87-0.91x as long at one thread (``benchmarks/weight_stream.py``,
    with the prefetch of :data:`PANEL_PREFETCH`). AVX-512 only (32 registers hold 15 accumulators, a
    weight vector and a broadcast); the weight is packed in 16-wide panels then, so a weight
    also multiplied by a GEMV (``gemv.shared_panel_width``, 32-wide) in the same artifact
    (a fixed-length prefill next to decode) would be stored twice.
    """
    if mr > TALL_TILE_MAX_SHORT_ROWS:
        return None
    fits = (STACK_ALLOCA_BYTES - 1) // (lanes * dtype_bits // 8)
    return next((v for v in range(fits, 2 * mr - 1, -1) if m % v == 0), None)


def _stack_tile_rows(m: int, mr: int, nr: int, dtype_bits: int) -> int:
    """One row fewer per tile when that puts the accumulator tile on the stack and still
    divides the ``m`` rows.

    Why: an ``MR x NR`` tile of exactly :data:`~.common.STACK_ALLOCA_BYTES` (8 x 32 floats,
    AVX-512's widest) is a workspace allocation per tile, which LLVM cannot keep in
    registers; 7 x 32 is an ``alloca`` it promotes. CNN feature maps of 224-pixel inputs
    are 112 / 56 / 28 / 14 / 7 wide, all multiples of 7, so 7-row tiles are also whole
    tiles there (MobileNetV2's 1 x 1 16 -> 96 conv over 112 x 112 is 8-row tiles today, its
    largest kernel). Rows that 7 does not divide (a 128-token matmul) keep their tile.
    """
    row_bytes = nr * dtype_bits // 8
    if mr < 2 or mr * row_bytes < STACK_ALLOCA_BYTES:
        return mr
    fits = (STACK_ALLOCA_BYTES - 1) // max(row_bytes, 1)
    if fits == mr - 1 and m % fits == 0:
        return fits
    return mr


def _stack_rows(m: int, mr: int, nr: int, dtype_bits: int) -> int:
    """The tallest tile of at most ``mr`` rows that divides ``m`` and whose ``MR x NR``
    accumulators stay under :data:`~.common.STACK_ALLOCA_BYTES` (on the stack, promoted to
    registers), or ``mr`` when none does."""
    row_bytes = nr * dtype_bits // 8
    return next((v for v in range(mr, 0, -1) if m % v == 0 and v * row_bytes < STACK_ALLOCA_BYTES),
                mr)


def _gemv_chunk(sch, axes: _Axes, lanes: int) -> int | None:
    """Output-column chunk for a matrix-vector product (decode), or None for a real GEMM.

    With one row there is no register reuse to win, only weight bandwidth: each parallel task
    takes a contiguous run of columns and streams the weight rows over it, so every row read is
    a long contiguous segment (up to 4 KiB) instead of one ``NR``-wide sliver per row.
    """
    if axes.extra or any(extent(sch, lp) != 1 for lp in axes.shared):
        return None
    if axes.reuse is not None and extent(sch, axes.reuse) != 1:
        return None
    n = extent(sch, axes.vector)
    if n is None or n % lanes:
        return None
    chunks = [c for c in range(lanes, min(1024, n // 4) + 1, lanes) if n % c == 0]
    return max(chunks) if chunks else None


def _tile(sch: s_tir.Schedule, main, axes: _Axes, target: Target, epilogue: list,
          func: tirx.PrimFunc, depthwise: bool = False, prologue: bool = False,
          runtime_rows: bool = False):
    dtype_bits = sch.get(main).writes[0].source.dtype.bits
    mr, nr, tall = _tile_sizes(sch, axes, target, dtype_bits, runtime_rows, depthwise)
    lanes = vector_lanes(target, dtype_bits)
    chunk = _gemv_chunk(sch, axes, lanes)
    # decided before the weight is packed (the packed copy is no longer the constant parameter)
    rows_outside = _rows_outside(sch, main, axes, func, depthwise)
    packed = not chunk and _pack_constant_operand(sch, main, axes, func, nr)
    work = _work(sch, axes)
    blocks = None if chunk else _column_block_panels(sch, main, axes, nr)
    vo, vi = sch.split(axes.vector, factors=[None, chunk or nr])
    if axes.reuse is not None:
        ro, ri = sch.split(axes.reuse, factors=[None, 1 if chunk else mr])
        tile_inner = [ri, vi]
    else:
        ro, tile_inner = None, [vi]
    # Weight panel (vector tile) outside the reuse tiles: each core keeps its K x NR panel of the
    # constant operand in L2 while it walks the rows (matmul) or pixels (NHWC conv).
    panel_outside = PANEL_OUTSIDE_ROWS and not rows_outside and not runtime_rows
    outer = (axes.shared + [vo] + axes.extra if panel_outside
             else axes.shared + axes.extra + [vo]) + ([ro] if ro is not None else [])
    if runtime_rows and ro is not None:  # per batch (head): its row tiles outside its panels
        outer = axes.shared + [ro, vo]
    blocked = bool(blocks) and panel_outside and ro is not None and not prologue
    if blocked:  # panels in L2-sized blocks, each block's row tiles outside its panels
        vo, vb = sch.split(vo, factors=[None, blocks])
        outer = axes.shared + [vo, ro, vb]
        panel_outside = False
    if rows_outside and not axes.extra and ro is not None:
        # a batched matmul over a constant batch of filters (Winograd's M[k] = V[k] @ U[k]):
        # rows (tiles) outermost, so a core's rows of every batch are the tiles its
        # transforms wrote and read
        outer = [ro] + axes.shared + [vo]
    panels_inside = prologue and _prologue_panels_inside(sch, axes, vo, ro)
    reduce = list(axes.reduce)
    unroll = _reduction_unroll(sch, axes, depthwise or bool(chunk) or ro is None or tall
                               or prologue)
    if unroll:
        reduce[-1:] = sch.split(reduce[-1], factors=[None, unroll])
    if panels_inside:  # each task: one row tile's prologue, then all its panels
        outer = [lp for lp in outer if not sch.get(lp).same_as(sch.get(vo))]
        sch.reorder(*outer, vo, *reduce, *tile_inner)
    else:
        sch.reorder(*outer, *reduce, *tile_inner)
    if unroll:
        sch.unroll(reduce[-1])
    if packed and tall and PANEL_PREFETCH and (panel_outside or blocked) \
            and (_weight_bytes(sch, main, axes) or 0) >= PREFETCH_MIN_WEIGHT_BYTES:
        weight = sch.get(main).reads[axes.contiguous].source
        sch.annotate(reduce[0], PREFETCH_PANEL, f"{weight.name}|{len(weight.shape) - 3}")
    symbolic_tiles = extent(sch, vo) is None or ro is not None and extent(sch, ro) is None
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    # Loop kinds are set while the block still has its init (a "reduction block" for TVM).
    if chunk:
        _vectorize_chunk(sch, main, 2 * lanes)
    else:
        _vectorize_tile(sch, main, len(tile_inner))
    if work >= MATMUL_PARALLEL_WORK:  # smaller: waking the thread pool costs more than it saves
        parallelize(sch, fused, MATMUL_PARALLEL_WORK)
    if symbolic_tiles:  # padded symbolic tiles: bounds checks in the edge tiles only
        sch.annotate(fused, WHOLE_TILES, 1)

    tile_bytes = (chunk or nr) * (1 if chunk or axes.reuse is None else mr) * dtype_bits // 8
    writeback = sch.cache_write(main, 0, tile_buffer_scope(tile_bytes))
    sch.reverse_compute_at(writeback, vo if panels_inside else fused, preserve_unit_loops=True)
    init = sch.decompose_reduction(main, reduce[0])
    for block in (init, writeback):
        if chunk:
            _vectorize_chunk(sch, block, 2 * lanes)
        else:
            # below the task loop (and the panel loop walked inside it, kept rolled)
            _vectorize_tile(sch, block, len(sch.get_loops(block)) - (2 if panels_inside else 1))

    out_shape = sch.get(main).writes[0].source.shape
    for block in epilogue:
        if _broadcasts_beyond(sch.get(block).writes[0].source.shape, out_shape):
            # Broadcast into a larger output (a squeeze-excite gate times the feature map):
            # not an epilogue of the accumulators, so it runs as its own loop nest. (A
            # smaller output is the crop of whole-tile padding: still an epilogue.)
            schedule_block(sch, block, target)
            continue
        try:
            sch.reverse_compute_inline(block)
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. a reshape; computed on its own instead
            interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
            log.debug("tiled-matmul: epilogue %s not inlined: %s", sch.get(block).name_hint,
                      str(exc).splitlines()[-1] if str(exc) else exc)
        schedule_block(sch, block, target)
    return fused


def _reduction_unroll(sch: s_tir.Schedule, axes: _Axes, skip: bool) -> int | None:
    """Reduction steps of a conv's register tile unrolled into one loop iteration
    (:data:`REDUCTION_UNROLL`, when it divides the innermost reduction), or None.

    Why: LLVM keeps one step per iteration of the 7 x 32 micro-kernel (7 broadcasts, 2 panel
    loads, 14 FMAs), so a third of its non-FMA uops are the loop's counter, pointer bump and
    branch. Four steps per iteration: ResNet-50's 1 x 1 convs over 14 x 14 / 56 x 56 and
    MobileNetV2's 14 x 14 ones ran 0.89-0.97x as long alone (2 threads, Intel host, wt/conv23,
    ``benchmarks/conv_variants.py`` variant ``ku4``). 1 x 1 convs only (an image axis, a
    one-pixel window): transformer matmuls, Winograd's batched matmuls and the tall tiles were
    not measured, and on 3 x 3 convs the split channel loop cost ResNet-18's stage-4 convs
    their prepacked filters (the whole model 8x as long), and so did ResNet-18's strided 1 x 1
    downsample convs with a prologue (:mod:`.conv_prologue`, the add before them).
    ``skip``: depthwise convs, matrix-vector chunks, single-row tiles and convs with a prologue.
    """
    if skip or REDUCTION_UNROLL < 2 or not axes.extra \
            or any(extent(sch, lp) != 1 for lp in axes.reduce[:-1]):
        return None
    k = extent(sch, axes.reduce[-1])
    return REDUCTION_UNROLL if k is not None and k >= 2 * REDUCTION_UNROLL \
        and k % REDUCTION_UNROLL == 0 else None


def _prologue_panels_inside(sch: s_tir.Schedule, axes: _Axes, vo, ro) -> bool:
    """Whether a conv with a prologue (:func:`_prologue_per_tile`) walks its output panels
    inside each parallel row tile, so the tile's prologue is computed once, not once per
    panel: when there are several panels and at least :data:`PROLOGUE_PANELS_INSIDE_MIN_TASKS`
    row tiles left to spread over the threads."""
    if not PROLOGUE_PANELS_INSIDE or ro is None or axes.reuse is None:
        return False
    panels, tiles = extent(sch, vo), extent(sch, ro)
    if panels is None or tiles is None or panels < 2:
        return False
    for loop in axes.shared + axes.extra:
        n = extent(sch, loop)
        if n is None:
            return False
        tiles *= n
    return tiles >= PROLOGUE_PANELS_INSIDE_MIN_TASKS


def _broadcasts_beyond(shape, accumulated) -> bool:
    """Whether an epilogue writing ``shape`` covers more than the accumulator tile's buffer
    ``accumulated``: another rank, or a static extent larger than the accumulator's (symbolic
    extents are not compared: padded tiles make them differ without a broadcast)."""
    if len(shape) != len(accumulated):
        return True
    return any(isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm)
               and int(a) > int(b) for a, b in zip(shape, accumulated, strict=True))


def _pack_constant_operand(sch: s_tir.Schedule, main, axes: _Axes, func: tirx.PrimFunc,
                           nr: int) -> bool:
    """Store a constant operand (a weight) as contiguous ``NR``-wide panels, at build time.

    The micro-kernel reads its weight operand one ``NR``-wide sliver per reduction step; in the
    natural layout (``W^T[K, N]``, a conv's ``HWIO``) consecutive slivers are a whole row apart,
    so a task streaming its panel from memory gets no help from the hardware prefetcher (the
    ResNet 7x7 stage's 9.4 MB filters: 1.51 -> 1.29 ms per conv with cold caches). The weight is
    rewritten ``[..., N] -> [N / NR, ..., NR]`` (batch axes stay in front). The rewrite is a
    separate block marked as a layout-rewrite preprocess: ``SplitLayoutRewritePreproc`` moves
    it out of the kernel and ``FoldConstant`` runs it once, at build time, on the constant.
    Operands computed at run time (not in the kernel's :data:`CONSTANT_OPERANDS`) stay as
    they are. Returns whether the operand was packed.
    """
    free = func.attrs.get(CONSTANT_OPERANDS) if func.attrs is not None else None
    stmt = sch.get(main)
    operand = stmt.reads[axes.contiguous]
    params = [i for i, p in enumerate(func.params) if p.same_as(operand.source)]
    n = extent(sch, axes.vector)
    if not free or not params or int(params[0]) not in {int(i) for i in free} \
            or n is None or n <= nr or n % nr:
        return False
    index = [r.min for r in operand.region]
    if not all(isinstance(e, tirx.Var) for e in index):
        return False
    shared = {sch.get(loop).loop_var for loop in axes.shared}
    bindings = dict(zip([iv.var for iv in stmt.iter_vars], realize_bindings(
        sch, sch.get_loops(main)), strict=True))
    batch = [i for i, e in enumerate(index[:-1])
             if e in bindings and any(bindings[e].same_as(loop_var) for loop_var in shared)]

    def panels(*dims):
        rest = [d for i, d in enumerate(dims[:-1]) if i not in batch]
        return [*(dims[i] for i in batch), dims[-1] // nr, *rest, dims[-1] % nr]

    cache = sch.cache_read(main, axes.contiguous, "global")
    sch.transform_layout(main, ("read", axes.contiguous), panels)
    sch.annotate(cache, PREPROC, True)
    return True


def _rows_outside(sch: s_tir.Schedule, main, axes: _Axes, func: tirx.PrimFunc,
                  depthwise: bool) -> bool:
    """Whether the kernel splits its rows (a conv's pixel rows, a batched matmul's rows) over
    the threads instead of its weight panels.

    A (non-depthwise) conv with a filter of at most :data:`SMALL_WEIGHT_BYTES`, or with a
    constant filter smaller than its image and at most :data:`ROWS_OUTSIDE_MAX_WEIGHT`; a
    matmul batched over a constant operand (Winograd) under the same size test. Plain matmuls
    (a transformer's linears, ``[batch, tokens, features]``: no 2-D image, no batch of
    filters) keep the panel outside.
    """
    if depthwise:
        image = _operand_bytes(sch.get(main).reads[1 - axes.contiguous].source)
        return image is not None and image > DEPTHWISE_ROWS_OUTSIDE_BYTES
    if not SMALL_WEIGHT_ROWS_OUTSIDE:
        return False
    weight = _weight_bytes(sch, main, axes)
    if weight is None:
        return False
    if axes.extra and weight <= SMALL_WEIGHT_BYTES:
        return True
    if not LARGER_OPERAND_ROWS_OUTSIDE or not _reads_constant(sch, main, axes, func):
        return False
    buffer = sch.get(main).reads[1 - axes.contiguous].source
    if not (axes.extra and len(buffer.shape) == 4 or not axes.extra and axes.shared):
        return False  # neither a 2-D conv's NHWC image nor a batch of constant filters
    image = _operand_bytes(buffer)
    return image is not None and weight <= min(image, ROWS_OUTSIDE_MAX_WEIGHT)


def _runtime_rows_outside(sch: s_tir.Schedule, main, axes: _Axes,
                          func: tirx.PrimFunc) -> bool:
    """Whether a batched matmul of two run-time operands (attention's ``Q @ K^T`` and
    ``P @ V``) walks each batch's row tiles outside its panels, with a stack-resident,
    two-vector-wide tile (:func:`_tile_sizes`).

    Why: with the panel outside, a panel of the vector operand (a head's ``K^T``, 64 rows)
    is kept while the rows are swept, which only pays for a weight panel too large for L1;
    here the whole per-batch vector operand fits in L2 (at most
    :data:`RUNTIME_ROWS_OUTSIDE_MAX_OPERAND_BYTES`), and the sweep instead writes the output
    in ``NR``-wide column strips, one cache line per row at a row stride of the key count
    (Whisper's 1500 x 1536 scores per head: 9.2 MB, every line on another page), and reads
    the row operand (``P``: the same 9.2 MB) once per panel. Rows outside, each task writes
    whole rows and reads its rows once. Whisper-tiny's ``Q @ K^T`` (6 heads x 1500 x 64 x
    1536) ran 119 -> 60 ms and ``P @ V`` 87 -> 58 ms per model call (4 layers, 2 threads,
    Intel host, loaded; docs/benchmarks.md, wt/attn20).
    Only where a head's output is at least :data:`RUNTIME_ROWS_OUTSIDE_MIN_OUTPUT_BYTES`:
    smaller outputs stay in L2 in either order and were not measured.
    """
    if not RUNTIME_ROWS_OUTSIDE or axes.extra or not axes.shared or axes.reuse is None \
            or len(axes.reduce) != 1 or _reads_constant(sch, main, axes, func):
        return False
    stmt = sch.get(main)
    operand = _operand_bytes(stmt.reads[axes.contiguous].source)
    output = _operand_bytes(stmt.writes[0].source)
    batch = 1
    for loop in axes.shared:
        batch *= extent(sch, loop) or 0
    if operand is None or output is None or not batch:
        return False
    return operand // batch <= RUNTIME_ROWS_OUTSIDE_MAX_OPERAND_BYTES \
        and output // batch >= RUNTIME_ROWS_OUTSIDE_MIN_OUTPUT_BYTES


def _column_block_panels(sch: s_tir.Schedule, main, axes: _Axes, nr: int) -> int | None:
    """Panels per column block of a matmul whose row operand and output are too large for
    L2, or None to keep each panel outside the rows.

    Why: with the panel outside, every ``NR``-wide panel sweeps all rows: the row operand
    (``M x K``) is read once per panel and the output written in ``NR``-wide column strips,
    one cache line per row at a stride of the row length. When those no longer fit in L2
    (Whisper's fc1: 1500 x 384 in, 1500 x 1536 out, 9.2 MB) both stream from L3 or memory once
    per panel. In blocks of panels whose weight fits :data:`COLUMN_BLOCK_BYTES`, each row tile
    is reused across the block's panels (in L2) and the output is written in block-wide row
    segments; the row operand is read once per block. In Whisper-tiny (Intel host, 2
    threads, per model call): fc1 63 -> 50 ms, its 384 -> 384 projections 15-25% faster,
    fc2 unchanged (with :data:`PANEL_PREFETCH` kept; without it fc2 ran 52 -> 70 ms).
    """
    if not COLUMN_BLOCKS or axes.extra or len(axes.reduce) != 1 or axes.reuse is None:
        return None
    m, n, k = extent(sch, axes.reuse), extent(sch, axes.vector), extent(sch, axes.reduce[0])
    if m is None or n is None or k is None or n % nr:
        return None
    bits = sch.get(main).writes[0].source.dtype.bits
    rows_bytes, out_bytes = m * k * bits // 8, m * n * bits // 8
    if rows_bytes + out_bytes < COLUMN_BLOCK_MIN_BYTES:
        return None
    panels = n // nr
    panel_bytes = k * nr * bits // 8
    block = next((p for p in range(panels, 0, -1)
                  if panels % p == 0 and p * panel_bytes <= COLUMN_BLOCK_BYTES), 1)
    return block if block > 1 else None


def _reads_constant(sch: s_tir.Schedule, main, axes: _Axes, func: tirx.PrimFunc) -> bool:
    """Whether the operand loaded along the vector axis is one of the kernel's constants."""
    free = func.attrs.get(CONSTANT_OPERANDS) if func.attrs is not None else None
    operand = sch.get(main).reads[axes.contiguous].source
    params = [i for i, p in enumerate(func.params) if p.same_as(operand)]
    return bool(free) and bool(params) and int(params[0]) in {int(i) for i in free}


def _operand_bytes(buffer) -> int | None:
    """Bytes of a buffer, or None when an extent is symbolic."""
    total = buffer.dtype.bits // 8
    for dim in buffer.shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        total *= int(dim)
    return total


def _weight_bytes(sch: s_tir.Schedule, main, axes: _Axes) -> int | None:
    """Bytes of the operand loaded along the vector axis (a conv's filters), or None when an
    extent is symbolic."""
    return _operand_bytes(sch.get(main).reads[axes.contiguous].source)


def _work(sch: s_tir.Schedule, axes: _Axes) -> float:
    """Multiply-accumulates of the kernel (a symbolic extent counts as large)."""
    total = 1.0
    for loop in [*axes.shared, *axes.extra, *axes.reduce, axes.vector, axes.reuse]:
        if loop is not None:
            total *= extent(sch, loop) or 1024
    return total


def _vectorize_chunk(sch: s_tir.Schedule, block, width: int) -> None:
    """Vectorize a long innermost loop ``width`` lanes at a time."""
    loop = sch.get_loops(block)[-1]
    n = extent(sch, loop)
    if n is not None and n > width and n % width == 0:
        loop = sch.split(loop, factors=[None, width])[-1]
    sch.vectorize(loop)


def _vectorize_tile(sch: s_tir.Schedule, block, tile_dims: int) -> None:
    """Vectorize the innermost tile loop and unroll the other ``tile_dims - 1`` ones."""
    loops = sch.get_loops(block)
    sch.vectorize(loops[-1])
    for loop in loops[len(loops) - tile_dims:-1]:
        sch.unroll(loop)
