"""Move a ``reshape`` from before an activation to after it, so the activation fuses into
the matmul that produced its input.

``nn.Linear`` on a ``(batch, tokens, features)`` tensor is exported as a 2-D matmul between two
reshapes: ``reshape -> matmul + bias -> reshape``, then the activation. Operator fusion puts an
elementwise op into a matmul's epilogue only when it follows the matmul directly; the
``reshape`` (injective, not elementwise) in between cut the transformer MLPs into a matmul
kernel and a separate GELU kernel, one more full pass over the widest activation of the layer
(ViT-Small: 197 x 1536 per block). An activation works elementwise, so
``act(reshape(y)) == reshape(act(y))``; the reshape left after the activation is a free view at
run time (``RewriteDataflowReshape``).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

#: Unary elementwise activations (Relax op names) that commute with a reshape.
ACTIVATIONS = ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu",
               "relax.sigmoid", "relax.tanh")


def _rewrite(func: relax.Function) -> relax.Function:
    source, shape = wildcard(), wildcard()
    reshape = is_op("relax.reshape")(source, shape)
    for name in ACTIVATIONS:
        pattern = is_op(name)(reshape)

        def sink(call, matches, pattern=pattern):
            inner = matches[source]
            act = relax.Call(call.op, [inner], call.attrs)
            return relax.op.reshape(act, matches[reshape].args[1])

        func = rewrite_call(pattern, sink, func)
    return func


@tvm.transform.module_pass(opt_level=0, name="SlimcSinkReshapes")
def sink_reshapes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite ``act(reshape(y))`` as ``reshape(act(y))`` in every Relax function of ``mod``."""
    updates = {gv: _rewrite(f) for gv, f in mod.functions_items()
               if isinstance(f, relax.Function)}
    if not updates:
        return mod
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gv, f in updates.items():
        mod[gv] = f
    return mod
