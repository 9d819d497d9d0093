"""Derive the ``prefill`` and ``decode`` Relax functions from the combined graph's ``main``.

The combined graph (:class:`~slimc.generation.wrapper.PrefillDecode`) computes both steps from
one set of weights, so compression passes rewrite each weight once. Here each entry point keeps
the parameters and outputs it needs and dead-code elimination drops the other step. The weights
stay the *same* Relax constants in both functions; :func:`share_constants` re-unifies the copies
that build-time constant folding (pre-transposed / pre-packed weights) makes per function.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_entry_points(mod, entries: dict[str, tuple[Sequence[int], Sequence[int]]]):
    """``entries``: name -> (indices of main's params, indices of main's outputs)."""
    import tvm
    from tvm import relax
    from tvm.relax.utils import copy_with_new_vars

    main = mod["main"]
    body = main.body
    block = body.blocks[-1]
    out_binding = block.bindings[-1]
    if len(body.blocks) != 1 or not isinstance(out_binding.value, relax.Tuple):
        raise ValueError("expected main to be one dataflow block ending in an output tuple")
    fields = list(out_binding.value.fields)
    functions = {}
    for name, (param_idx, out_idx) in entries.items():
        value = relax.Tuple([fields[i] for i in out_idx])
        sinfo = relax.TupleType([fields[i].ty for i in out_idx])
        out_var = relax.Var("gv", sinfo)
        bindings = [*block.bindings[:-1], relax.VarBinding(out_var, value)]
        seq = relax.SeqExpr([relax.DataflowBlock(bindings)], out_var)
        whole = relax.Function(list(main.params), seq, sinfo, main.is_pure,
                               main.attrs)
        single = tvm.IRModule({name: whole})
        single = relax.transform.DeadCodeElimination([name])(single)
        kept = single[name]
        params = [main.params[i] for i in param_idx]
        func = relax.Function(params, kept.body, kept.ret_ty, kept.is_pure, kept.attrs)
        func = copy_with_new_vars(func).with_attr("global_symbol", name)
        functions[name] = func
    # Keep the module's other functions (kernels that converters emitted, e.g. int4 gathers).
    out = tvm.IRModule({gvar: func for gvar, func in mod.functions_items()
                        if gvar.name_hint != "main"}, attrs=mod.attrs)
    for name, func in functions.items():
        out[name] = func
    return out


def share_constants():
    """A module pass: every Relax function of the module uses one copy of each distinct weight.

    Build-time constant folding (transposed weights, packed panels) runs per function, so the
    ``prefill`` and ``decode`` functions would each get their own folded copy of the same weight;
    this pass maps constants with equal dtype, shape and bytes to one object, which the VM
    stores once. A no-op for single-function modules.
    """
    import hashlib

    import tvm
    from tvm import relax

    def run(mod, _ctx):
        functions = [(g, f) for g, f in mod.functions_items() if isinstance(f, relax.Function)]
        if len(functions) < 2:
            return mod
        canonical: dict[tuple, object] = {}

        @relax.expr_functor.mutator
        class Share(relax.PyExprMutator):
            def visit_constant_(self, op):
                array = op.data.numpy()
                key = (str(array.dtype), array.shape,
                       hashlib.blake2b(array.tobytes(), digest_size=16).digest())
                return canonical.setdefault(key, op)

        out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
        for gvar, func in functions:
            out[gvar] = Share().visit_expr(func)
        return out

    return tvm.transform.module_pass(run, opt_level=0, name="SlimcShareConstants")
