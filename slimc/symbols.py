"""Keep a dynamic IR dynamic: detect (and undo) a pass pinning an input's symbolic dim.

A dynamic IR's user inputs are fake tensors whose dims are symbols of the program's shape
environment (``input_ids: [1, s53]``). Any torch-side ``int(dim)``, ``numel()`` comparison or
``if dim == 128`` on such a value adds a guard that can *replace* the symbol by its example size
for the whole environment: every ``meta["val"]`` then reads static while the graph still
computes ``sym_size``, and the TVM import mixes a symbolic var with the constant. The pass
manager snapshots the environment before each pass and checks after it (:func:`pinned`); an
analysis's pinning is undone (:func:`restore`), a transform's is an internal error naming the
pass, since the transform may have baked the example size into the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from slimc.ir import IR


@dataclass
class EnvState:
    """The parts of one shape environment a guard changes."""

    env: Any
    replacements: dict
    var_to_range: dict
    guards: int


@dataclass
class Snapshot:
    #: (input name, axis) of every symbolic user-input dim.
    dims: list[tuple[str, int]] = field(default_factory=list)
    envs: list[EnvState] = field(default_factory=list)


def snapshot(ir: IR) -> Snapshot | None:
    """The symbolic input dims of ``ir`` and their shape environments; None for a static IR."""
    snap = Snapshot()
    envs: dict[int, Any] = {}
    for name, val in _user_values(ir):
        for axis, dim in enumerate(val.shape):
            if isinstance(dim, torch.SymInt) and not dim.node.expr.is_number:
                snap.dims.append((name, axis))
                envs[id(dim.node.shape_env)] = dim.node.shape_env
    if not snap.dims:
        return None
    snap.envs = [EnvState(env, dict(env.replacements), dict(env.var_to_range), len(env.guards))
                 for env in envs.values()]
    return snap


def pinned(ir: IR, snap: Snapshot) -> list[str]:
    """The input dims of ``snap`` that are no longer symbolic in ``ir``, as ``name[axis]=size``."""
    values = dict(_user_values(ir))
    lost = []
    for name, axis in snap.dims:
        val = values.get(name)
        if val is None or axis >= val.dim():
            continue  # the pass removed or reshaped the input: not a pinning
        dim = val.shape[axis]
        if not isinstance(dim, torch.SymInt) or dim.node.expr.is_number:
            size = dim.node.expr if isinstance(dim, torch.SymInt) else dim
            lost.append(f"{name}[{axis}]={size}")
    return lost


def restore(snap: Snapshot) -> None:
    """Put each shape environment's replacements, ranges and guards back as they were."""
    for state in snap.envs:
        env = state.env
        env.replacements.clear()
        env.replacements.update(state.replacements)
        env.var_to_range.clear()
        env.var_to_range.update(state.var_to_range)
        del env.guards[state.guards:]
        # Cached ``replace``/``_maybe_evaluate_static`` results and SymNode.expr caches are keyed
        # on these counters: bump both so nothing reads the pinned value back. Evaluations are
        # also memoised per (env, expression) in plain lru caches: a cached guard would not be
        # added again, so a later pinning would go unseen.
        env._replacements_version_counter += 1
        env._version_counter += 1
        env._prev_cache_key = env._get_key()
        for method in vars(type(env)).values():
            clear = getattr(method, "cache_clear", None)
            if callable(clear):
                clear()


def _user_values(ir: IR) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, node in zip(ir.input_names, ir._user_placeholders(), strict=False):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.append((name, val))
    return out
