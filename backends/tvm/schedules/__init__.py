"""Default CPU schedules: make an untuned artifact fast without MetaSchedule.

``relax.build`` on its own compiles every kernel as naive single-threaded loops. slimc instead
runs the CPU Relax pipeline with one extra step after operator fusion: each fused ``PrimFunc`` is
given to the rules below in order, and the first that claims it schedules it:

1. :class:`~.winograd.WinogradTransform` -- the tile transforms of Winograd convolutions;
2. :class:`~.cpu_matmul.TiledMatmul` -- dense / batched matmul / conv2d micro-kernels;
3. :class:`~.cpu_reduction.RowReduction` -- softmax, layer/RMS norm;
4. :class:`~.fallback.Fallback` -- parallel + vectorized loops for everything else.

A rule that raises is skipped (logged at debug level) and the next one is tried, so a kernel is
at worst left as TVM's correct, unscheduled loops. Before fusion (:func:`fusion_passes`) slimc
sends matrix-vector products to packed-panel kernels (``gemv``), decomposes the batch norms
lowering did not fold, turns convs NHWC, then swaps in vectorizable transcendental functions
(``fast_math``, after the layout passes so activations stay NHWC) and rewrites 3x3 stride-1
convs on large feature maps as Winograd transforms + a batched matmul (``winograd``).
Weights are bound as constants, so the ``FoldConstant`` that runs after legalization turns
``permute_dims(W)`` into a pre-transposed constant, and after scheduling
(:func:`prepack_passes`) the weights a rule asked for in another layout (``TiledMatmul``'s
``NR``-wide panels) are rewritten once, at build time: no layout work happens at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from slimc import interrupts

from .common import log
from .cpu_matmul import CONSTANT_OPERANDS, PREPROC, TiledMatmul, clamp_padded_rows
from .cpu_reduction import RowReduction
from .fallback import Fallback
from .panel_prefetch import prefetch_next_panel
from .parallel_guard import guard_parallel_loops
from .symbolic_tails import peel_symbolic_tails
from .whole_tiles import split_whole_tiles
from .winograd import WinogradTransform

if TYPE_CHECKING:
    import tvm

__all__ = [
    "DEFAULT_RULES", "apply_cpu_schedules", "cpu_pipeline", "fusion_passes", "prepack_passes",
    "schedule_prim_func",
]


class Rule(Protocol):
    name: str

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target): ...


DEFAULT_RULES: tuple[Rule, ...] = (WinogradTransform(), TiledMatmul(), RowReduction(), Fallback())


def schedule_prim_func(func: tvm.tirx.PrimFunc, target: tvm.target.Target,
                       rules: Sequence[Rule] = DEFAULT_RULES, name: str = "") -> tvm.tirx.PrimFunc:
    """Return ``func`` scheduled by the first rule that accepts it (or ``func`` unchanged)."""
    from tvm import tirx

    if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
        return func
    for rule in rules:
        try:
            sch = rule.apply(func, target)
        except Exception as exc:  # noqa: BLE001 - ScheduleError and friends: try the next rule
            interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
            log.debug("rule %s failed on %s: %s", rule.name, name, _last_line(exc))
            continue
        if sch is not None:
            log.debug("rule %s scheduled %s", rule.name, name)
            _peel(sch, name)
            return _guard(_prefetch(_clamp(_whole_tiles(sch.mod["main"], name), name), name),
                          name).with_attr("tirx.is_scheduled", True)
    return func


def _peel(sch, name: str) -> None:
    """Peel symbolic-length tails (:mod:`.symbolic_tails`); a failure keeps the predicates."""
    try:
        peel_symbolic_tails(sch)
    except Exception as exc:  # noqa: BLE001 - correct either way, only slower
        interrupts.check()
        log.debug("tails of %s not peeled: %s", name, _last_line(exc))


def _whole_tiles(func, name: str):
    """Bounds checks in edge tiles only (:mod:`.whole_tiles`); a failure keeps them everywhere."""
    try:
        return split_whole_tiles(func)
    except Exception as exc:  # noqa: BLE001 - correct either way, only slower
        interrupts.check()
        log.debug("whole tiles of %s not split: %s", name, _last_line(exc))
        return func


def _clamp(func, name: str):
    """Padded rows read in place (:func:`.cpu_matmul.clamp_padded_rows`)."""
    try:
        return clamp_padded_rows(func)
    except Exception as exc:  # noqa: BLE001 - the guarded reads stay: correct, a bit slower
        interrupts.check()
        log.debug("padded rows of %s not clamped: %s", name, _last_line(exc))
        return func


def _prefetch(func, name: str):
    """Next weight panel prefetched (:mod:`.panel_prefetch`); a failure keeps the plain loop."""
    try:
        return prefetch_next_panel(func)
    except Exception as exc:  # noqa: BLE001 - correct either way, only slower with cold weights
        interrupts.check()
        log.debug("panel prefetch of %s not inserted: %s", name, _last_line(exc))
        return func


def _guard(func, name: str):
    """Parallel loops of symbolic work behind a run-time test (:mod:`.parallel_guard`)."""
    try:
        return guard_parallel_loops(func)
    except Exception as exc:  # noqa: BLE001 - correct either way, only slower when small
        interrupts.check()
        log.debug("parallel loops of %s not guarded: %s", name, _last_line(exc))
        return func


def apply_cpu_schedules(mod: tvm.IRModule, target: tvm.target.Target,
                        rules: Sequence[Rule] = DEFAULT_RULES) -> tvm.IRModule:
    """Schedule every unscheduled ``PrimFunc`` of the Relax ``IRModule`` ``mod`` for ``target``."""
    from tvm import tirx

    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            scheduled = schedule_prim_func(func, target, rules, gvar.name_hint)
            if scheduled is not func:
                updates[gvar] = scheduled
    if updates:
        mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
        for gvar, func in updates.items():
            mod[gvar] = func
    return mod


def cpu_pipeline(target: tvm.target.Target, rules: Sequence[Rule] = DEFAULT_RULES,
                 before_schedule: Sequence[tvm.transform.Pass] = ()) -> tvm.transform.Pass:
    """The Relax pipeline for CPU targets: TVM's default one plus the schedules above.

    ``before_schedule`` passes run on the fused module just before the rules (tuning: kernels
    they mark ``tirx.is_scheduled`` are left alone by the rules).
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from slimc.generation.split import share_constants

    @tvm.transform.module_pass(opt_level=0, name="SlimcCpuSchedules")
    def schedule(mod, _ctx):
        return apply_cpu_schedules(mod, target, rules)

    @tvm.transform.module_pass(opt_level=0, name="SlimcCpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                fusion_passes(target) + list(before_schedule) + [schedule]
                + prepack_passes() + [share_constants()] + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def fusion_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Relax passes up to (and including) operator fusion, i.e. what runs before scheduling.

    A batch norm lowering did not fold into its conv (:func:`..lower.lower_to_relax` folds
    conv -> batch norm) is decomposed into elementwise ops (fused into the conv epilogue) and convs
    run NHWC with HWIO weights: the output channels are then the contiguous, vectorized axis, a
    multiple of the vector width in real networks, unlike NCHW image widths (56, 28, 14, 7).

    Every layout op applied to a weight (the ``permute_dims`` of each ``nn.Linear``) is
    evaluated at build time, so kernels read pre-transposed constants: in numpy just before
    legalization (:mod:`.constant_views`, milliseconds), and whatever else is constant by the
    ``FoldConstant`` after it (which compiles each kernel it evaluates with LLVM).
    """
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .attention_softmax import fuse_safe_softmax
    from .broadcast_weights import fold_broadcast_weights
    from .channel_padding import pad_hidden_channels
    from .constant_views import fold_constant_views
    from .conv_output_padding import pad_conv_outputs
    from .conv_prologue import prologue_convs
    from .fast_math import fast_math
    from .fused_attention import fuse_attention
    from .gemv import panel_gemv
    from .group_norm import decompose_group_norm
    from .nhwc_rewrites import (
        cancel_transposes,
        drop_noop_broadcasts,
        nhwc_rewrites,
        pointwise_tail_convs_as_matmul,
        sink_layout_transposes,
    )
    from .requantize_fusion import fuse_requantize
    from .sink_reshapes import sink_reshapes
    from .squeeze_axes import non_negative_squeeze
    from .tied_embedding import dedup_constants, tied_embedding
    from .winograd import winograd_convs

    return cpu.library_dispatch_passes(target) + [
        drop_noop_broadcasts, fold_broadcast_weights, sink_reshapes, panel_gemv,
        relax.transform.DecomposeOpsForInference(),
        # batch_norm leaves (out, mean, var)[0] behind; unwrapping it lets ReLU fuse into convs.
        relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination(),
        # ConvertLayout fails on a negative squeeze axis (HF's 1-D average pooling heads)
        non_negative_squeeze, nhwc_rewrites, _nhwc_pass(), sink_layout_transposes,
        cancel_transposes,
        # after the layout: its channel sums run over a channels-last map
        decompose_group_norm,
        # before the 1x1 convs of 8 x odd channels become padded matmuls: padded hidden maps
        # leave them whole-vector convs
        pad_hidden_channels, pointwise_tail_convs_as_matmul,
        # the convs left to channel counts no vector divides: padded outputs, then a slice
        pad_conv_outputs,
        # cancelled transposes leave `y = x` aliases, which would cut fusion chains
        relax.transform.CanonicalizeBindings(),
        # After the layout passes: fast_math turns sigmoid/SiLU/GELU into call_te kernels that
        # ConvertLayout cannot see through, so run earlier it left an NCHW<->NHWC transpose
        # pair around every squeeze-excite gate and SiLU of a converted conv.
        fuse_attention(target), fuse_safe_softmax(target), fast_math, fuse_requantize,
        prologue_convs, winograd_convs, tied_embedding, fold_constant_views(),
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), dedup_constants, relax.transform.FuseOps(),
        relax.transform.FuseTIR(), _mark_constant_operands()]


def _mark_constant_operands() -> tvm.transform.Pass:
    """Give each kernel a :data:`CONSTANT_OPERANDS` attribute: its inputs that are constants.

    Those are the weights, whose layout a rule may change at build time (:func:`prepack_passes`).
    An input counts only if every call passes a constant. TVM's ``AttachAttrLayoutFreeBuffers``
    does the same under the name ``layout_free_buffers``, but copies and renames every kernel
    (``fused_matmul_add_relu1``, names users see in tuning records), and that name also turns on
    MetaSchedule's own layout rewriting while tuning, which slimc's records do not expect.
    """
    import tvm
    from tvm import relax, tirx

    from .tied_embedding import data_address

    def mark(mod, _ctx):
        constant: dict = {}
        calls: list = []
        readers: dict[int, set] = {}  # constant data -> kernels reading it

        def visit(expr) -> None:
            if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
                gvar, args = expr.args[0], expr.args[1].fields
                here = {i for i, a in enumerate(args) if isinstance(a, tvm.ir.expr.Constant)}
                constant[gvar] = constant[gvar] & here if gvar in constant else here
                calls.append((gvar, args))
                for i in here:
                    readers.setdefault(data_address(args[i].value), set()).add(gvar)

        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, visit)
        # A constant several kernels read (a tied embedding and output head) keeps the one
        # layout they share: repacking it for one kernel would store it twice.
        for gvar, args in calls:
            constant[gvar] = {i for i in constant[gvar]
                              if len(readers[data_address(args[i].value)]) == 1}
        for gvar, indices in constant.items():
            func = mod[gvar]
            if indices and isinstance(func, tirx.PrimFunc):
                mod[gvar] = func.with_attr(CONSTANT_OPERANDS, sorted(indices))
        return mod

    return tvm.transform.module_pass(mark, opt_level=0, name="SlimcMarkConstantOperands")


def prepack_passes() -> list[tvm.transform.Pass]:
    """Run the weight layout rewrites the schedules asked for once, at build time.

    :func:`fusion_passes` tells each kernel which of its inputs are constants; a rule may then
    store such an operand in a kernel-friendly layout (``cpu_matmul`` packs weights into panels)
    through a block marked as a layout-rewrite preprocess. These passes move those blocks out
    into their own functions and evaluate them on the constant weights, so the artifact holds
    the packed weights and does no layout work at run time.
    """
    import tvm
    from tvm import relax

    return [tvm.transform.module_pass(_split_and_pack, opt_level=0, name="SlimcPrepackWeights"),
            relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]


def _split_and_pack(mod, ctx):
    """Split the layout rewrites out of the kernels, then pack the weights in numpy, one at a
    time (:mod:`.prepack`); what numpy cannot do is left to the ``FoldConstant`` after it."""
    from tvm import tirx

    from .prepack import pack_constants

    before = {gvar.name_hint for gvar, _ in mod.functions_items()}
    split = _split_prepacked(mod, ctx)
    if split is mod:
        return mod
    added = {gvar for gvar, func in split.functions_items()
             if gvar.name_hint not in before and isinstance(func, tirx.PrimFunc)}
    # The input module is consumed (its caller replaces it with what this returns): its Relax
    # functions bind the same weights, which must go once packed (see pack_constants).
    from tvm import relax

    for gvar in [g for g, f in mod.functions_items() if isinstance(f, relax.Function)]:
        del mod[gvar]
    del mod
    return pack_constants(split, added)


def _split_prepacked(mod, _ctx):
    """``SplitLayoutRewritePreproc``, shown only the kernels that have a layout rewrite.

    The pass inspects every ``PrimFunc`` of the module and rejects some it has nothing to do
    for (Mixtral's ``topk``: "There should be a compute block if there is only one subtree
    under the root"), so the others are set aside while it runs and put back afterwards.
    """
    from tvm import relax, tirx

    aside = {gvar: func for gvar, func in mod.functions_items()
             if isinstance(func, tirx.PrimFunc) and not _has_preproc(func)}
    if len(aside) == sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions_items()):
        return mod
    shown = mod.clone()
    for gvar in aside:
        del shown[gvar]
    split = relax.transform.SplitLayoutRewritePreproc()(shown)
    for gvar, func in aside.items():
        split[gvar] = func
    return split


def _has_preproc(func) -> bool:
    """Whether a root-level loop nest of ``func`` holds a layout-rewrite block.

    Rules put those blocks at the root (``cache_read`` of a parameter); walking the root's
    loop nests is enough, and much cheaper than a ``Schedule`` per kernel.
    """
    from tvm import tirx

    root = getattr(func.body, "block", None)
    if root is None:
        return False
    stmts = list(root.body.seq) if hasattr(root.body, "seq") else [root.body]
    for stmt in stmts:
        while isinstance(stmt, tirx.For):
            stmt = stmt.body
        block = getattr(stmt, "block", None)
        if block is not None and PREPROC in block.annotations:
            return True
    return False


#: Convolutions ``ConvertLayout`` turns channels-last: the output channels then are the
#: contiguous, vectorized axis of the tiled-matmul kernel. Left NCW, a conv1d vectorizes its
#: output positions instead: 4 lanes for Whisper's 1500 frames, read with a stride of 2.
CHANNELS_LAST = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv1d": ["NWC", "WIO"]}


def _uses_conv2d(mod) -> bool:
    from tvm import relax

    found = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in CHANNELS_LAST:
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def _convert_conv_layout(mod, _ctx):
    """Relax ``ConvertLayout`` to NHWC/HWIO (conv1d: NWC/WIO), only for modules with a conv.

    The pass is skipped elsewhere (it has nothing to do there, and TVM 0.27's ConvertLayout
    runs out of memory on some graphs without convs, e.g. Mixtral's MoE routing); if it fails on
    a conv model the convs simply stay NCHW, which the conv rule also schedules.
    """
    from tvm import relax

    if not _uses_conv2d(mod):
        return mod
    try:
        return relax.transform.ConvertLayout(CHANNELS_LAST)(mod)
    except Exception as exc:  # noqa: BLE001 - a layout we cannot convert: keep NCHW
        interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
        log.debug("ConvertLayout skipped: %s", _last_line(exc))
        return mod


def _nhwc_pass():
    import tvm

    return tvm.transform.module_pass(_convert_conv_layout, opt_level=0, name="SlimcNhwcConvs")


def _last_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
