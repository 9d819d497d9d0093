"""slimc plugin: fold inference-mode BatchNorm into the convolution before it."""

from __future__ import annotations

import torch
from pydantic import Field

import slimc
from slimc.ir import IR
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

aten = torch.ops.aten
_CONVS = {aten.conv2d.default, aten.conv1d.default, aten.convolution.default}


class FoldBatchNorm(TransformPass):
    """Fold BatchNorm (eval mode) into the preceding convolution's weight and bias."""

    name = "fold-batchnorm"
    exact = True

    class Options(PassOptions):
        min_channels: int = Field(1, ge=1, description="Only fold layers with at least this "
                                  "many output channels.")

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        folded = 0
        for bn in list(ir.nodes("call_function")):
            if bn.target is aten.batch_norm.default and _fold(ir, bn, options.min_channels):
                folded += 1
        ir.remove_unused_weights()
        ir.annotations[self.name] = {"folded": folded}
        return PreservedAnalyses.all() if folded == 0 else PreservedAnalyses.none()


def _fold(ir: IR, bn, min_channels: int) -> bool:
    conv, gamma, beta, mean, var, training, _momentum, eps = bn.args[:8]
    if training or conv.op != "call_function" or conv.target not in _CONVS:
        return False
    if len(conv.users) != 1 or any(n is None for n in (mean, var)):
        return False
    weight_node = conv.args[1]
    bias_node = conv.args[2] if len(conv.args) > 2 else None
    try:
        weight = ir.get_weight(weight_node)
        bias = ir.get_weight(bias_node) if bias_node is not None else None
        stats = [ir.get_weight(n) if n is not None else None for n in (gamma, beta, mean, var)]
    except KeyError:  # something computed at run time; leave it alone
        return False
    if weight.shape[0] < min_channels or len(weight_node.users) != 1:
        return False
    g, b, mu, sigma2 = stats
    g = torch.ones_like(mu) if g is None else g
    b = torch.zeros_like(mu) if b is None else b
    scale = g / torch.sqrt(sigma2 + eps)
    new_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = ((bias if bias is not None else torch.zeros_like(mu)) - mu) * scale + b
    ir.set_weight(weight_node, new_weight)
    if bias_node is not None and len(bias_node.users) == 1:
        ir.set_weight(bias_node, new_bias)
    else:
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[2] = ir.add_weight(f"{weight_node.name}_folded_bias", new_bias)
        conv.args = tuple(args)
    bn.replace_all_uses_with(conv)
    ir.graph.erase_node(bn)
    return True


@slimc.hookimpl
def slimc_register_passes():
    return [FoldBatchNorm]
