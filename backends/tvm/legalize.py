"""Rewrite ATen graphs into the subset TVM's ``from_exported_program`` lowers correctly.

Each rule is a small function ``rule(ir, node) -> bool`` that rewrites one node in place, keeps
the graph semantically identical under PyTorch, and documents which TVM failure it avoids. The
pass is ``exact``: the pass manager checks the IR's outputs did not change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Node

from slimc.ir import IR
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

aten = torch.ops.aten


def view_to_reshape(ir: IR, node: Node) -> bool:
    """``aten.view`` -> ``aten.reshape``.

    TVM re-runs ATen decompositions, whose fake-tensor ``view`` insists on the strides the
    original tensor had; after a transpose it fails ("Cannot view a tensor with shape ... and
    strides ..."), which broke GPT-2. ``reshape`` has the same values and no stride rule.
    """
    if node.target is not aten.view.default:
        return False
    node.target = aten.reshape.default
    return True


def cumsum_of_bool_as_int64(ir: IR, node: Node) -> bool:
    """Cast a boolean/small-int ``cumsum`` input to int64 first, as PyTorch does implicitly.

    Without a ``dtype`` argument, torch accumulates bool/int tensors in int64; TVM's converter
    keeps the input dtype and LLVM codegen then fails (``CreateAdd ... kDLFloat``). Transformers'
    position ids from a padding mask (Llama, Qwen2, Mistral, Gemma, Phi, GPT-NeoX) hit this.
    """
    if node.target is not aten.cumsum.default:
        return False
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, Node) else None
    if val is None or val.dtype in (torch.int64, torch.float32, torch.float64, torch.float16,
                                    torch.bfloat16):
        return False
    if node.kwargs.get("dtype") is not None:
        return False
    with ir.graph.inserting_before(node):
        cast = ir.graph.call_function(aten._to_copy.default, (src,), {"dtype": torch.int64})
    cast.meta["val"] = val.to(torch.int64)
    node.replace_input_with(src, cast)
    return True


RULES: list[Callable[[IR, Node], bool]] = [view_to_reshape, cumsum_of_bool_as_int64]


def legalize(ir: IR) -> dict[str, int]:
    """Apply every rule to every node; returns how often each rule fired."""
    fired = {rule.__name__: 0 for rule in RULES}
    for node in list(ir.nodes("call_function")):
        for rule in RULES:
            if rule(ir, node):
                fired[rule.__name__] += 1
    ir.changed()
    return fired


class LegalizeForTVM(TransformPass):
    """Rewrite ATen ops that TVM's importer mishandles into equivalent ones it lowers."""

    name = "legalize-for-tvm"
    exact = True

    class Options(PassOptions):
        pass

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        fired = legalize(ir)
        ir.annotations.setdefault("legalize-for-tvm", {}).update(fired)
        return PreservedAnalyses.all()  # same ops, same shapes, same values
