"""The ``quantize`` pass: weight-only quantization the compiled artifact really executes.

``quantize{weights=int8|int4|int3|int2|fp16|bf16|mixed, activations=none|int8, group_size=128,
method=rtn|gptq|awq, budget=4.5, embeddings=true}`` rewrites every quantizable layer (see
``layers.py``) to one of slimc's quantized ops, whose operands are the packed tensors the
artifact stores. The IR stays executable in PyTorch, so the pass manager measures what
quantization cost.

``activations=int8`` turns every linear and convolution whose weights are int8 into a W8A8 op
with a static, calibrated input scale (``activations.py``): the artifact runs it on the
target's int8 dot-product instructions (VNNI, sdot). Embedding gathers and expert tensors keep
weight-only int8. ``method=gptq`` rounds convolutions too (per group, over the im2col rows);
AWQ's input scaling applies to linear layers.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections import Counter
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimc import coverage
from slimc.errors import UsageError
from slimc.ir import IR
from slimc.lowbit import LOWBIT_KINDS
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

from . import calib, mixed
from .activations import ALPHAS, StaticInt8, dynamic_int8, search_all, static_int8
from .awq import awq_scale
from .batchnorm import fold_batchnorm
from .formats import Format, parse_format
from .gptq import gptq
from .layers import Layer, plan, rewrite, takes_int8_activations
from .rtn import pack

#: GPTQ's damping (x the mean Hessian diagonal) for a table tied to an output head: its
#: Hessian is the head's, but the same rows are also gathered as embeddings, where only the
#: plain weight error counts; more damping keeps that small. SmolLM2-135M, table at
#: int4-g128-fz, linears fp32 (docs/benchmarks.md, issue 17): perplexity 1.160x fp32 rounded
#: to nearest, GPTQ 1.105x at damping 0.01, 1.076x at 0.1, 1.083x at 0.3, 1.091x at 1.0.
TABLE_DAMP = 0.1
#: ``weights=`` values that take their grouping from the other options.
WEIGHT_KINDS = ("int8", "int4", "int3", "int2", "fp16", "bf16", "mixed", "exact")


class QuantizeOptions(PassOptions):
    weights: str = Field(
        "int8", description="Weight format (`int8`, `int4`, `int3`, `int2`, `fp16`, `bf16`, "
        "with `group_size`, `symmetric`, `zero_point`), a full format name that sets its own "
        "group (`int4-g32-fz`, `int4-g32-qs`, `int3-g64-qs`; `-qs`: 8-bit step and minimum "
        "codes per group against fp16 row units; `-qs5`: 5-bit codes, bit-packed, widths "
        "4..7: `int3-g32-qs5`), `mixed` to choose one per layer under "
        "`budget`, or `exact`: per layer the fewest bytes among the formats its weight "
        "already lies on exactly (a model dequantized from a GGUF Q4_1 file: int4-g32-fz; a "
        "bf16 checkpoint: bf16), fp32 where none: lossless, what `-O1` runs. "
        "`int3`/`int2`: bit-packed codes, an fp16 scale and minimum per group of "
        "`group_size` (a multiple of 8; linear layers and embedding tables, convolutions and "
        "experts get int4 with a float zero point instead).")
    activations: Literal["none", "int8"] = Field(
        "none", description="`int8`: int8 inputs (SmoothQuant migration; calibrated or "
        "per-token scales, `act_scales`) for every int8-weight linear, convolution and tied "
        "output head, run on int8 dot-product kernels; needs "
        "`weights=int8` or `mixed` and `method=rtn`. `none`: weight-only.")
    act_scales: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="`activations=int8`: `static` = one calibrated scale per layer "
        "input; `dynamic` = each row's (token's) own scale, found at run time by the kernel "
        "that writes the codes (linears only, convolutions stay static); `auto` = per "
        "linear, whichever has the smaller output error on the calibration rows. CPU "
        "targets; GPU targets use static scales.")
    act_max_error: float = Field(
        1.0, gt=0.0, description="`activations=int8`: a layer whose calibrated W8A8 output "
        "error (relative MSE on its calibration rows) exceeds this keeps float inputs "
        "(weight-only int8); the default keeps every layer W8A8.")
    group_size: int = Field(128, ge=8, le=8192, description="Inputs per int4/int3/int2 "
                            "scale/zero group.")
    symmetric: bool = Field(False, description="int4 without zero points (codes -8..7).")
    zero_point: Literal["int", "float"] = Field(
        "int", description="int4 asymmetric grids: `int` = a uint8 zero point (the grid holds "
        "0.0 exactly); `float` = an fp32 zero point, the grid spans each group's [min, max] "
        "(GGUF Q4_1's layout: with group_size=32 it represents Q4_1 weights exactly).")
    method: Literal["rtn", "gptq", "awq"] = Field(
        "rtn", description="Rounding: round-to-nearest, GPTQ or AWQ (both use calibration data).")
    act_order: bool = Field(False, description="`method=gptq`: choose the codes of the "
                            "inputs with the largest Hessian diagonal first (GPTQ's act-order; "
                            "grouped formats fix every group's grid up front from the original "
                            "weights, so groups stay contiguous and the layout is unchanged).")
    budget: float = Field(4.5, gt=4.0, le=32.0, description="`mixed`: average bits per "
                          "quantizable weight, scales and zero points included.")
    candidates: str = Field("int4-g128,int4-g64,int4-g32,int8,fp16,fp32", description=
                            "`mixed`: formats to choose from, comma-separated.")
    damage_batches: int = Field(4, ge=1, le=64, description="`mixed`: calibration batches "
                                "the per-layer damage is measured on.")
    criterion: str = Field("perturbation", description="`mixed`: sensitivity criterion the "
                           "per-layer damage comes from; `perturbation` measures it (one "
                           "forward per layer and format), others (`taylor`, `hessian`, ...) "
                           "are proxies scaled from the analysis's curves.")
    layers: str = Field("", description="Per-layer formats that override `weights`: "
                        "comma-separated `PATTERN=FORMAT` (glob over layer names, first match "
                        "wins; FORMAT as in `candidates`, `fp32` leaves the layer float). What "
                        "`--budget` searches write into their recipes. In pipeline text, "
                        "several rules go in brackets: "
                        "`layers=[*gate_proj=int3-g64,*up_proj=int3-g64]`.")
    embeddings: bool = Field(True, description="Quantize embedding tables (gather + "
                             "dequantize) and tied output heads too.")
    embedding_weights: Literal["same", "int8"] = Field(
        "same", description="Format of embedding tables and output heads tied to them: `same` "
        "as `weights`, or `int8` (per-row). llama.cpp's Q4 GGUF files keep `token_embd` at "
        "Q8_0 for the same reason: in small LLMs the tied output head is the matrix int4 hurts "
        "most.")
    fold_batchnorm: bool = Field(True, description="Fold inference batch norms into the "
                                 "convolutions before them first, so the weights quantized "
                                 "are the ones the model applies.")

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in WEIGHT_KINDS:
            return value
        try:
            parse_format(value)
        except ValueError as exc:
            raise ValueError(f"{exc}; or one of {', '.join(WEIGHT_KINDS)}") from None
        return value

    @field_validator("group_size")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("group_size must be even (two int4 codes per byte)")
        return value

    @model_validator(mode="after")
    def _lowbit_group(self) -> QuantizeOptions:
        if self.weights in LOWBIT_KINDS and self.group_size % 8:
            raise ValueError(f"weights={self.weights} packs 8 codes into whole bytes per "
                             f"group: group_size must be a multiple of 8 (32, 64, 128), got "
                             f"{self.group_size}")
        return self

    @model_validator(mode="after")
    def _zero_point(self) -> QuantizeOptions:
        if self.symmetric and self.zero_point == "float":
            raise ValueError("symmetric=true has no zero point; drop zero_point=float or "
                             "symmetric=true")
        return self

    @model_validator(mode="after")
    def _exact(self) -> QuantizeOptions:
        if self.weights == "exact" and (self.embedding_weights != "same"
                                        or self.method != "rtn"):
            raise ValueError("weights=exact stores each weight only in a format it already "
                             "lies on, so nothing is rounded: drop embedding_weights=int8 "
                             "and method=gptq/awq (they change weights)")
        return self

    @model_validator(mode="after")
    def _activations(self) -> QuantizeOptions:
        if self.activations == "int8":
            if self.weights not in ("int8", "mixed"):
                raise ValueError("activations=int8 needs weights=int8 or weights=mixed (it "
                                 "applies to the layers whose weights are int8)")
            if self.method != "rtn":
                raise ValueError("activations=int8 calibrates its own scales (SmoothQuant + "
                                 "clipping search); use method=rtn with it")
        elif self.act_scales != "auto":
            raise ValueError(f"act_scales={self.act_scales} chooses how int8 activations are "
                             "scaled and does nothing without them: add activations=int8, or "
                             "drop act_scales")
        return self

    @field_validator("layers")
    @classmethod
    def _layer_formats(cls, value: str) -> str:
        layer_rules(value)
        return value

    @field_validator("candidates")
    @classmethod
    def _formats(cls, value: str) -> str:
        for item in value.split(","):
            parse_format(item.strip())
        return value


class Quantize(TransformPass):
    """Quantize weights (int8/int4/fp16/bf16 or mixed per layer) to packed, fused-dequant ops."""

    name = "quantize"
    Options = QuantizeOptions

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        assert isinstance(options, QuantizeOptions)
        summary = quantize_ir(ir, ctx, options)
        ir.annotations[self.name] = summary
        ctx.log(f"quantize: {summary['layers']} layers, weight bytes "
                f"{summary['bytes_before']:,} -> {summary['bytes_after']:,}; "
                + coverage.describe(summary["coverage"], "quantized"))
        return PreservedAnalyses.none() if summary["layers"] else PreservedAnalyses.all()


def layer_rules(text: str) -> list[tuple[str, Format]]:
    """``PATTERN=FORMAT,...`` (the ``layers`` option) as (glob, format) pairs.

    In pipeline text the list is written in brackets, ``layers=[*gate_proj=int3-g64,
    *up_proj=int3-g64]``: the comma separates the pass's options there, so without brackets
    only the first rule reached ``layers`` (recipes pass the plain string)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    rules = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        pattern, sep, fmt = item.rpartition("=")
        if not sep or not pattern.strip():
            raise ValueError(f"layers entry {item!r} is not PATTERN=FORMAT")
        rules.append((pattern.strip(), parse_format(fmt.strip())))
    return rules


def choose_formats(ir: IR, layers: list[Layer], ctx: PassContext,
                   options: QuantizeOptions) -> tuple[dict[str, Format], dict]:
    """Per-layer formats: uniform or the mixed-precision solver's assignment, then the
    explicit ``layers`` overrides."""
    formats, info = _base_formats(ir, layers, ctx, options)
    if options.embedding_weights == "int8":
        for layer in layers:
            if layer.is_embedding and formats[layer.name].kind in ("int4", *LOWBIT_KINDS):
                formats[layer.name] = Format("int8")
    rules = layer_rules(options.layers)
    matched: set[str] = set()
    for layer in layers:
        for pattern, fmt in rules:
            if fnmatch.fnmatchcase(layer.name, pattern):
                formats[layer.name] = fmt
                matched.add(pattern)
                break
    unmatched = [p for p, _ in rules if p not in matched
                 and not any(fnmatch.fnmatchcase(la.name, p) for la in layers)]
    if unmatched:
        raise unmatched_rule_error(unmatched[0], [la.name for la in layers], options)
    return formats, info


def unmatched_rule_error(pattern: str, names: list[str], options: QuantizeOptions) -> UsageError:
    """A ``layers`` rule that names no layer would silently leave the layer in the default
    format (the pattern is a glob over *full* layer names: ``embeddings.word_embeddings`` does
    not match ``transformer.embeddings.word_embeddings``); say so and what would match."""
    suffix = [n for n in names if fnmatch.fnmatchcase(n, f"*.{pattern}")]
    close = suffix or difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    hint = (f"Use the full layer name, e.g. {close[0]}=..., or a glob such as *.{pattern}=... "
            if suffix else (f"Did you mean {', '.join(close)}? " if close else ""))
    if not options.embeddings:
        hint += "embeddings=false leaves embedding tables out of the layers considered. "
    return UsageError(f"quantize layers={options.layers!r}: the pattern {pattern!r} matches "
                      f"none of the {len(names)} quantizable layers (patterns are globs over "
                      "full layer names, first match wins), so its format would not apply.",
                      hint=hint + "`slimc analyze MODEL` lists the layer names.")


def _base_formats(ir: IR, layers: list[Layer], ctx: PassContext,
                  options: QuantizeOptions) -> tuple[dict[str, Format], dict]:
    if options.weights not in WEIGHT_KINDS:  # a full format name (int4-g32-qs)
        fmt = parse_format(options.weights)
        return {layer.name: fmt for layer in layers}, {}
    if options.weights == "exact":
        from slimc.passes.analysis.target_info import target_info

        from .exact import exact_formats

        formats = exact_formats(ir, layers, set(target_info(ctx.target).formats))
        exact = Counter(str(f) for f in formats.values() if f.kind != "fp32")
        return formats, {"exact": dict(exact)}
    if options.weights != "mixed":
        int4 = options.weights == "int4"
        grouped = int4 or options.weights in LOWBIT_KINDS
        fmt = Format(options.weights, options.group_size if grouped else 0,
                     int4 and options.symmetric, int4 and options.zero_point == "float")
        return {layer.name: fmt for layer in layers}, {}
    candidates = [parse_format(c.strip()) for c in options.candidates.split(",")]
    if not any(c.kind == "fp32" for c in candidates):
        candidates.append(Format("fp32"))
    table = mixed.damage_table(ir, ctx, layers, candidates, options.damage_batches,
                               options.criterion)
    result = mixed.assign(ir, layers, candidates, options.budget, table.damage)
    return result.formats, {**result.to_json(), "damage": table.info}


def _int_kind(fmt: Format) -> bool:
    return fmt.kind in ("int8", "int4", *LOWBIT_KINDS)


def _warn_without_dot_product(ctx: PassContext) -> None:
    """W8A8 pays on int8 dot-product hardware; elsewhere it runs a slower generic kernel."""
    if ctx.target is None or ctx.analyses is None:
        return
    info = ctx.analyses.get("target-info")
    if info.dot_product is None:
        ctx.log(f"quantize: warning: target {ctx.target.name} has no int8 dot-product "
                "instructions (x86 AVX2 or AVX-512 VNNI, Armv8.2 dotprod); activations=int8 "
                "runs on a generic int8 kernel there, usually slower than weights=int8 alone.")


def _gpu_target(ctx: PassContext) -> str | None:
    """The target kind when the build target is not a CPU (llvm), else None."""
    if ctx.target is None or not hasattr(ctx.target, "tvm_target"):
        return None
    try:
        kind = ctx.target.tvm_target().kind.name
    except Exception:  # noqa: BLE001 - no TVM target: nothing to say
        return None
    return None if kind in ("llvm", "c") else kind


def _w8a8_layer(layer: Layer, fmt: Format, st: calib.LayerStats | None) -> bool:
    """Whether ``layer`` gets int8 activations (an int8 linear, convolution or tied
    output head with calibration rows)."""
    return (takes_int8_activations(layer) and fmt.kind == "int8"
            and st is not None and bool(st.rows))


def _conv_shape(layer: Layer) -> tuple[int, int]:
    """``(groups, kernel area)`` of a convolution layer: the search's column blocks."""
    area = 1
    for k in layer.shape[2:]:
        area *= int(k)
    return layer.groups(), area


def _static_int8_all(ir: IR, layers: list[Layer], stats: dict[str, calib.LayerStats],
                     scales: str = "static") -> dict[str, StaticInt8]:
    """The W8A8 search of every layer in ``layers``, before any is rewritten (they read only
    their own weight and calibration rows, so they run in parallel). ``scales``: the
    ``act_scales`` option (convolutions are always static)."""
    def job(layer: Layer):
        matrix, st = layer.matrix(ir), stats[layer.name]
        groups, area = _conv_shape(layer) if layer.kind == "conv" else (1, 1)
        # a tied table keeps its own codes (no SmoothQuant migration): its gathers read them
        alphas = (0.0,) if layer.is_embedding else ALPHAS
        per_row = scales != "static" and layer.kind != "conv"

        def search() -> StaticInt8:
            rows = st.sample_rows()
            static = None if per_row and scales == "dynamic" else static_int8(
                matrix, st.abs_max, rows, st.min, st.max, groups=groups,
                channel_size=area, alphas=alphas)
            if not per_row:
                return static
            dynamic = dynamic_int8(matrix, st.abs_max, rows, alphas=alphas)
            # auto: the lower calibrated error wins. Per-row scales cost what the static
            # quantize does (one kernel: SmolLM2 prefill 149.5 vs 148 ms); preferring them
            # only at half the static error chose 23 of SmolLM2's 211 layers, perplexity
            # 1.028x fp32 vs 1.015x with all (docs/benchmarks.md, session 29).
            if static is None or dynamic.error < static.error:
                return dynamic
            return static
        return search
    found = search_all([job(la) for la in layers])
    return dict(zip([la.name for la in layers], found, strict=True))


def quantize_ir(ir: IR, ctx: PassContext, options: QuantizeOptions) -> dict:
    """Quantize ``ir`` in place; returns a JSON summary (formats, bytes before/after)."""
    bytes_before = ir.weight_bytes()
    folded = fold_batchnorm(ir) if options.fold_batchnorm else 0
    inventory = coverage.inventory(ir)
    reasons = coverage.default_reasons(ir)
    layers, skipped = plan(ir, embeddings=options.embeddings)
    reasons.update(skipped)
    gpu = _gpu_target(ctx)
    if gpu:  # quantized convolution / expert kernels exist for CPU targets only
        for la in [la for la in layers if la.kind in ("conv", "expert")]:
            reasons[la.weight.name] = f"{la.kind}: no quantized kernel for {gpu} targets yet"
            layers.remove(la)
    formats, mixed_info = choose_formats(ir, layers, ctx, options)
    # An int4 table of odd width cannot be told from one a column wider: use int8 for it.
    for la in layers:
        if (la.is_embedding or la.kind == "expert") and formats[la.name].kind == "int4" \
                and la.matrix(ir).shape[1] % 2:
            formats[la.name] = Format("int8")
    lowbit = sorted({str(f) for f in formats.values() if f.lowbit})
    if gpu and lowbit:
        from slimc.errors import UsageError

        raise UsageError(f"{', '.join(lowbit)} weights have CPU kernels only (x86, aarch64); "
                         f"this build targets {gpu}.", hint="Use int4 or int8 weights for GPU "
                         "targets, or build for a CPU target.")
    coded = sorted({str(f) for f in formats.values() if f.coded_scales})
    if gpu and coded:
        raise UsageError(f"{', '.join(coded)} weights (quantized group scales) are built for "
                         f"CPU targets only (x86, aarch64); this build targets {gpu}.",
                         hint="Use int4-gN-fz (fp16 group scales) for GPU targets.")
    for la in layers:  # int3/int2 and -qs grids exist for linears and gathers only
        fmt = formats[la.name]
        if (fmt.lowbit or fmt.coded_scales) and la.kind in ("conv", "expert"):
            formats[la.name] = Format("int4", fmt.group_size, float_zero=True)
    kept = []
    for la in layers:
        fmt = formats[la.name]
        if fmt.kind == "fp32":
            reasons[la.weight.name] = (
                "kept fp32 by the `layers` option" if options.layers else
                "on no format's grid exactly (weights=exact)" if options.weights == "exact"
                else "kept fp32 by the mixed-precision solver")
        elif not _int_kind(fmt) and (la.is_embedding or la.kind in ("conv", "expert")):
            # fp16/bf16 have no gather or convolution op.
            reasons[la.weight.name] = f"{la.kind}: no {fmt.kind} kernel (int8/int4 only)"
        else:
            kept.append(la)
    layers = kept
    w8a8 = options.activations == "int8"
    if w8a8:
        _warn_without_dot_product(ctx)
    data_aware = options.method != "rtn" or w8a8
    stats = {}
    # Convolutions need their (im2col) statistics only for W8A8, GPTQ and AWQ.
    conv_stats = w8a8 or options.method != "rtn"
    linears = [la for la in layers if la.kind in ("linear", "embedding")
               or (la.kind == "conv" and conv_stats)]
    if data_aware and linears:
        stats = calib.collect(ir, linears, calib.calibration_batches(ctx),
                              hessian=options.method == "gptq",
                              sample_rows=1024 if w8a8 else 512 if options.method == "awq"
                              else 0, tied_heads=w8a8)
    statics = _static_int8_all(ir, [la for la in layers if w8a8 and _w8a8_layer(
        la, formats[la.name], stats.get(la.name))], stats,
        "static" if gpu else options.act_scales)
    per_layer = {}
    reached = set()
    rounded = _RoundedAhead(ir, [la for la in layers if la.name not in statics
                                 and la.kind not in ("conv", "expert")
                                 and not (stats.get(la.name) is not None
                                          and _int_kind(formats[la.name])
                                          and stats[la.name].rows)], formats)
    for layer in layers:
        fmt = formats[layer.name]
        # a copy of the weight: the layers packed ahead never need one here
        matrix = None if rounded.plans(layer) else layer.matrix(ir)
        act_scale = None
        method = "rtn"
        st = stats.get(layer.name)
        reached.add(layer.weight.name)
        if layer.name in statics:
            static = statics[layer.name]
            extra = {"kind": "conv", "groups": layer.groups()} if layer.kind == "conv" else {}
            if static.error > options.act_max_error:
                rewrite(ir, layer, "int8", pack(matrix, fmt))
                per_layer[layer.name] = {"format": "int8", "method": "rtn",
                                         "shape": list(matrix.shape),
                                         "w8a8_calib_error": static.error, **extra}
                continue
            tensors = static.tensors()
            if layer.is_embedding:  # the gathers read the same codes with per-row scales
                tensors["scale"] = static.weight_scale
            rewrite(ir, layer, "w8a8", tensors, zero_point=static.zero_point,
                    per_row=static.per_row)
            per_layer[layer.name] = {"format": "int8", "activations": "int8",
                                     "act_scales": "dynamic" if static.per_row else "static",
                                     "method": "rtn",
                                     "shape": list(matrix.shape), "smooth_alpha": static.alpha,
                                     "range_quantile": static.clip,
                                     "zero_point": static.zero_point,
                                     "calib_error": static.error, **extra}
            continue
        if layer.kind in ("conv", "expert"):
            per_layer[layer.name] = _quantize_weight_only(ir, layer, fmt, options, st)
            continue
        if st is not None and _int_kind(fmt) and st.rows:
            if options.method == "gptq":
                codes, grid = gptq(matrix, st.hessian, fmt,
                                   damp=TABLE_DAMP if layer.is_embedding else 0.01,
                                   act_order=options.act_order)
                if fmt.kind == "int4" or fmt.lowbit:
                    tensors = pack(matrix, fmt, params=grid, codes=codes)
                else:
                    tensors = {"weight": codes, "scale": grid}
                method = "gptq"
            else:
                s, _ = awq_scale(matrix, st.mean_abs, st.sample_rows(), fmt)
                matrix = matrix * s
                act_scale = 1.0 / s
                tensors = pack(matrix, fmt)
                method = "awq"
        else:
            tensors, shape = rounded.take(layer)
        if matrix is not None:
            shape = list(matrix.shape)
        rewrite(ir, layer, fmt.kind, tensors, fmt.group_size, act_scale,
                scale_bits=fmt.scale_bits)
        per_layer[layer.name] = {"format": str(fmt), "method": method, "shape": shape}
    ir.remove_unused_weights()
    ir.changed()
    return {"layers": len(per_layer), "bytes_before": bytes_before,
            "bytes_after": ir.weight_bytes(), "batchnorms_folded": folded,
            "coverage": coverage.coverage(inventory, reached, reasons),
            "per_layer": per_layer, **mixed_info}


class _RoundedAhead:
    """Round-to-nearest packing of the ``plain`` layers, a few layers ahead of the rewrite
    loop, one layer per core with single-threaded torch ops.

    Why: packing is a handful of elementwise ops per weight; on torch's multi-threaded pool a
    loaded 2-core host spent its time synchronising the OpenMP team (SmolLM2-135M's 211
    weights to int4: 64-78 s with 2 intra-op threads, 7.5 s with one). Batches of two layers
    per core keep the extra memory (packed tensors not yet in the IR) to a few layers. The
    values are those of ``pack(layer.matrix(ir), fmt)`` in the loop: rewriting a layer adds
    new weights and never changes another layer's.
    """

    #: Bytes of source weights packed between two heap trims.
    TRIM_AFTER_BYTES = 128 << 20

    def __init__(self, ir: IR, plain: list[Layer], formats: dict[str, Format]) -> None:
        self._ir, self._plain, self._formats = ir, plain, formats
        self._index = {la.name: i for i, la in enumerate(plain)}
        self._ready: dict[str, tuple[dict, list[int]]] = {}
        self._since_trim = 0

    def plans(self, layer: Layer) -> bool:
        """Whether :meth:`take` packs ``layer`` (then the loop needs no copy of its weight)."""
        return layer.name in self._index

    def _pack(self, layer: Layer) -> tuple[dict, list[int]]:
        matrix = layer.matrix(self._ir)
        return pack(matrix, self._formats[layer.name]), list(matrix.shape)

    def take(self, layer: Layer) -> tuple[dict, list[int]]:
        """The packed tensors of ``layer`` and its matrix's shape (packing the next batch when
        needed)."""
        import torch

        from slimc.jobs import map_single_threaded
        from slimc.memory import trim_heap

        if layer.name not in self._ready:
            start = self._index.get(layer.name)
            if start is None:  # not planned as plain: pack it here
                return self._pack(layer)
            batch = self._plain[start:start + 2 * max(1, torch.get_num_threads())]
            batch = [la for la in batch if la.name not in self._ready]
            packed = map_single_threaded(self._pack, batch)
            self._ready.update(zip((la.name for la in batch), packed, strict=True))
            # Each weight's copy and temporaries are freed, but the packed tensors kept
            # between them pin the heap's pages (and each worker's arena): SmolLM2's int4
            # packing grew the process by 0.6 GB of free heap, the 320M decoder's by ~1.1 GB
            # (its peak; issue 18). A trim every TRIM_AFTER_BYTES returns them.
            self._since_trim += sum(4 * math.prod(la.shape) for la in batch)
            if self._since_trim > self.TRIM_AFTER_BYTES:
                self._since_trim = 0
                trim_heap()
        return self._ready.pop(layer.name)


def _quantize_weight_only(ir: IR, layer: Layer, fmt: Format, options: QuantizeOptions,
                          st: calib.LayerStats | None = None) -> dict:
    """Convolutions and expert tensors: per output channel (per expert), weight-only.

    Convolutions are rounded by GPTQ with ``method=gptq`` (one GPTQ per convolution group, on
    the Hessian of its im2col rows: the convolution is a matmul over ``I/g * kernel`` inputs)
    and scaled by AWQ with ``method=awq`` (``groups == 1``; one scale per input channel,
    applied to the input by a ``mul`` before the convolution), else rounded to nearest.
    Expert tensors are rounded to nearest; a layer that did not get the method asked for says
    so in its ``note``.
    """
    matrix = layer.matrix(ir)
    method = "rtn"
    act_scale = None
    if (layer.kind == "conv" and options.method == "gptq" and st is not None
            and st.hessian is not None and _int_kind(fmt)):
        tensors = _gptq_grouped(matrix, st.hessian, fmt, options.act_order)
        method = "gptq"
    elif (layer.kind == "conv" and options.method == "awq" and layer.groups() == 1
          and st is not None and st.rows and _int_kind(fmt)):
        # One scale per input channel (shared by its kernel taps): the mean |x| of the
        # channel's columns, which AWQ's search raises to its alpha.
        area = matrix.shape[1] // int(layer.shape[1])
        channel_mean = st.mean_abs.reshape(-1, area).mean(1)
        s, _ = awq_scale(matrix, channel_mean.repeat_interleave(area), st.sample_rows(), fmt)
        tensors = pack(matrix * s, fmt)
        act_scale = (1.0 / s[::area]).reshape(1, -1, *[1] * (len(layer.shape) - 2))
        method = "awq"
    else:
        tensors = pack(matrix, fmt)
    if layer.kind == "expert":
        experts, rows = layer.shape[0], matrix.shape[0] // layer.shape[0]
        tensors = {k: v.reshape(experts, rows, *v.shape[1:]) for k, v in tensors.items()}
    rewrite(ir, layer, fmt.kind, tensors, fmt.group_size, act_scale,
            scale_bits=fmt.scale_bits)
    entry = {"format": str(fmt), "method": method, "kind": layer.kind,
             "shape": list(layer.shape)}
    if layer.kind == "conv":
        entry["groups"] = layer.groups()
    if options.method != method or (options.activations != "none" and layer.kind == "expert"):
        entry["note"] = (f"{layer.kind} weights are rounded to nearest, weight-only: "
                         + ("AWQ's per-channel input scaling applies to convolutions with "
                            "groups=1" if options.method == "awq" and layer.kind == "conv" else
                            f"method={options.method} and activations={options.activations} "
                            "apply to linear layers and convolutions"))
    return entry


def _gptq_grouped(matrix, hessian, fmt: Format, act_order: bool = False) -> dict:
    """GPTQ of a convolution's weight matrix ``[O, K_g]``, one GPTQ per group (its rows and
    the Hessian ``[G, K_g, K_g]`` of its im2col columns); packed like round-to-nearest."""
    import torch

    from .formats import Int4Params

    groups = hessian.shape[0]
    rows = matrix.shape[0] // groups
    codes, grids = [], []
    for g in range(groups):
        c, grid = gptq(matrix[g * rows:(g + 1) * rows], hessian[g], fmt, act_order=act_order)
        codes.append(c)
        grids.append(grid)
    codes_all = torch.cat(codes)
    if fmt.kind == "int8":
        return {"weight": codes_all, "scale": torch.cat(grids)}
    params = Int4Params(torch.cat([p.scale for p in grids]), torch.cat([p.zero for p in grids]),
                        fmt.group_size)
    return pack(matrix, fmt, params=params, codes=codes_all)
