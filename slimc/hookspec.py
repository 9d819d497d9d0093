"""Every hook slimc calls, in one module (as pytest's ``hookspec.py``).

Built-in passes, targets, loaders and evaluators are registered through these same hooks; a
third-party package does exactly what the built-ins do and advertises its module in the
``slimc`` entry-point group::

    [project.entry-points.slimc]
    my_plugin = "my_package.slimc_plugin"

and implements any of the hooks below with ``@slimc.hookimpl``. Registration hooks return
lists; slimc concatenates them over all plugins and rejects duplicate names with an error
that names both providers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from slimc.backend import Backend
    from slimc.evaluators import Evaluator
    from slimc.loaders.base import Loader
    from slimc.passmanager import Pass
    from slimc.targets import TargetSpec

hookspec = pluggy.HookspecMarker("slimc")
hookimpl = pluggy.HookimplMarker("slimc")

# ---------------------------------------------------------------------------------------------
# Registration: what a plugin contributes
# ---------------------------------------------------------------------------------------------


@hookspec
def slimc_register_passes() -> list[type[Pass]]:
    """Return the pass classes this plugin provides.

    Each class subclasses :class:`slimc.passmanager.AnalysisPass` or
    :class:`slimc.passmanager.TransformPass`, has a unique kebab-case ``name`` and an ``Options``
    pydantic model that validates its pipeline options. Called once per process.
    """


@hookspec
def slimc_register_targets() -> list[TargetSpec]:
    """Return the compilation targets this plugin provides (:class:`slimc.targets.TargetSpec`).

    A target says how to build for a device (TVM target, how to link, how to run the result).
    Names and aliases are matched case-insensitively by ``--target``.
    """


@hookspec
def slimc_register_backends() -> list[Backend]:
    """Return code generators (:class:`slimc.backend.Backend`) this plugin provides.

    A backend owns everything target-specific for the targets naming it in
    :attr:`TargetSpec.backend <slimc.targets.TargetSpec.backend>`: whether this machine can
    build them, the target facts passes ask (``target-info``), lowering and building the IR into
    one library file, and loading and running that library (or saying that this machine has no
    such device, so the artifact is written unverified). Its ``kinds`` are the TVM target kinds
    whose ad-hoc ``--target`` values (tags, JSON dicts) it accepts. Names and aliases are unique
    across plugins.
    """


@hookspec
def slimc_register_loaders() -> list[Loader]:
    """Return model loaders (:class:`slimc.loaders.base.Loader`).

    ``slimc compile MODEL`` asks each loader, in registration order, whether it ``accepts`` the
    string MODEL; the first one that does captures it.
    """


@hookspec
def slimc_register_evaluators() -> list[Evaluator]:
    """Return fidelity metrics (:class:`slimc.evaluators.Evaluator`) and task metrics
    (:class:`slimc.task_eval.TaskEvaluator`).

    Every fidelity evaluator is computed when an artifact or transformed IR is compared with the
    model it came from; the results land in ``manifest.json`` under ``fidelity``. A task
    evaluator scores labelled data (``--eval NAME``, or the first whose ``accepts`` takes
    ``--eval-data``) on the original model and on the artifact; the result lands under
    ``quality`` and is what ``--max-drop`` checks.
    """


@hookspec
def slimc_register_converters() -> dict[Any, Any]:
    """Return extra TVM Relax converters for ATen ops, keyed like TVM's ``custom_convert_map``.

    Lets a plugin teach the lowering an op that ``from_exported_program`` does not know; each
    value is ``fn(node: torch.fx.Node, importer) -> relax.Var``.
    """
