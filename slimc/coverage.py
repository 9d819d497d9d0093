"""Weight coverage: how much of a model's weight bytes a transform reached, and why not the rest.

A transform that silently skips most of a model (convolutions kept fp32 by a quantizer that
only knew linears) looks like a success: the compile exits 0 and the artifact runs. So every
compressing transform records, next to what it did, the share of the model's floating-point
weight bytes it reached and every tensor it left untouched, grouped by the reason. It goes into
the pass's summary (``manifest.json``: ``pipeline[i].summary.coverage``), ``report.md`` and the
console line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Node

from slimc.ir import IR
from slimc.layers import find_layers, op_name

#: How many tensor names each reason lists (the count and bytes cover them all).
EXAMPLES = 5


@dataclass(frozen=True)
class WeightTensor:
    name: str  # placeholder name
    target: str  # state-dict key
    nbytes: int
    dims: int
    #: Other placeholders holding the same tensor (a tied LM head and embedding).
    aliases: tuple[str, ...] = ()


def inventory(ir: IR) -> dict[str, WeightTensor]:
    """Every floating-point weight tensor of ``ir`` (tied ones once), by placeholder name."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, WeightTensor] = {}
    for spec in ir.program.graph_signature.input_specs:
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        value = ir._state_value(spec)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if key in seen:
            first = out[seen[key]]
            out[seen[key]] = WeightTensor(first.name, first.target, first.nbytes, first.dims,
                                          (*first.aliases, spec.arg.name))
            continue
        seen[key] = spec.arg.name
        out[spec.arg.name] = WeightTensor(spec.arg.name, str(spec.target),
                                          value.numel() * value.element_size(), value.dim())
    return out


def default_reasons(ir: IR) -> dict[str, str]:
    """Why a weight is no transform's business, for every weight that is not a layer's:
    a 1-D bias / norm / scale vector, or a tensor read only by ops that are not weight ops."""
    layer_weights = {layer.weight.name: layer for layer in find_layers(ir)}
    reasons: dict[str, str] = {}
    for node in ir.nodes("placeholder"):
        if node.name in layer_weights:
            layer = layer_weights[node.name]
            if layer.foreign:
                ops = sorted({op_name(n) for n in layer.foreign})
                reasons[node.name] = f"also read by {', '.join(ops)} (not a weight op)"
            elif not layer.consistent:
                reasons[node.name] = "read both as W and as a transpose of W"
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() <= 1:
            reasons[node.name] = "1-D (bias, norm or scale vector)"
        elif node.users:
            ops = sorted({op_name(n) for n in node.users if isinstance(n, Node)})
            reasons[node.name] = f"read only by {', '.join(ops)} (not a weight op)"
        else:
            reasons[node.name] = "unused"
    return reasons


def coverage(before: dict[str, WeightTensor], reached: set[str],
             reasons: dict[str, str]) -> dict:
    """JSON summary: bytes reached and the untouched tensors grouped by reason.

    ``before``: :func:`inventory` taken before the transform; ``reached``: placeholder names it
    rewrote; ``reasons``: why each other tensor was left (anything missing: "not reached").
    """
    total = sum(t.nbytes for t in before.values())
    hit = {name for name, t in before.items() if reached & {name, *t.aliases}}
    done = sum(before[name].nbytes for name in hit)
    groups: dict[str, dict] = {}
    for name, tensor in before.items():
        if name in hit:
            continue
        used = [n for n in (name, *tensor.aliases) if reasons.get(n) != "unused"]
        reason = reasons.get(used[0] if used else name, "not reached")
        group = groups.setdefault(reason, {"reason": reason, "tensors": 0, "bytes": 0,
                                           "examples": []})
        group["tensors"] += 1
        group["bytes"] += tensor.nbytes
        if len(group["examples"]) < EXAMPLES:
            group["examples"].append(tensor.target)
    untouched = sorted(groups.values(), key=lambda g: -g["bytes"])
    return {"weight_bytes": total, "reached_bytes": done,
            "reached_fraction": round(done / total, 6) if total else 1.0,
            "untouched_bytes": total - done, "untouched": untouched}


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def describe(summary: dict, verb: str = "reached") -> str:
    """One console paragraph: ``reached 97.0% of weight bytes (...); untouched: ...``."""
    text = (f"{verb} {100 * summary['reached_fraction']:.1f}% of weight bytes "
            f"({_size(summary['reached_bytes'])} of {_size(summary['weight_bytes'])})")
    if summary["untouched"]:
        parts = [f"{_size(g['bytes'])} in {g['tensors']} tensor(s): {g['reason']}"
                 for g in summary["untouched"]]
        text += "; untouched: " + "; ".join(parts)
    return text
