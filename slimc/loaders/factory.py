"""Load ``package.module:factory``: a callable returning ``(nn.Module, example_inputs)``.

``example_inputs`` is a tensor, a tuple/list of tensors (positional) or a dict of tensors
(keyword arguments). The module's directory is importable when MODEL names a local file
(``path/to/models.py:build``), so a user's own script works without packaging it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import torch

from slimc.errors import UsageError
from slimc.loaders.base import InputOverride, LoadedModel, apply_overrides, dynamic_dims

_FACTORY = re.compile(r"^(?P<module>[\w./\\-]+?)(?:\.py)?:(?P<attr>[A-Za-z_]\w*)$")


class FactoryLoader:
    name = "factory"
    description = "package.module:factory (or path/to/file.py:factory) returning (module, inputs)"

    def accepts(self, model: str) -> bool:
        return bool(_FACTORY.match(model)) and not Path(model).exists()

    def load(self, model: str, overrides: dict[str, InputOverride]) -> LoadedModel:
        match = _FACTORY.match(model)
        assert match is not None
        module = _import(match["module"], model)
        factory = getattr(module, match["attr"], None)
        if not callable(factory):
            raise UsageError(f"{model}: module {module.__name__!r} has no callable "
                             f"{match['attr']!r}.")
        try:
            result = factory()
        except Exception as exc:  # noqa: BLE001 - the user's code failed, say where
            raise UsageError(f"{model}: the factory raised {type(exc).__name__}: {exc}") from None
        if not (isinstance(result, tuple) and len(result) == 2
                and isinstance(result[0], torch.nn.Module)):
            raise UsageError(f"{model}: the factory must return (torch.nn.Module, example_inputs);"
                             f" it returned {type(result).__name__}.")
        net, example = result
        net.eval()
        params = [p for p in inspect.signature(net.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        names = [p.name for p in params]
        inputs = _name_inputs(example, names, model)
        inputs = apply_overrides(inputs, overrides, accepted=list(inputs) or names,
                                 high=_int_high(inputs))
        return LoadedModel(name=match["attr"] if match["attr"] not in ("factory", "build")
                           else Path(match["module"]).name.split(".")[-1],
                           module=net, example_inputs=inputs, as_kwargs=isinstance(example, dict),
                           source=model, kind=self.name,
                           # --input x=1..4x3x32x32 asks for a dynamic batch: without this the
                           # range was dropped and a fixed-size artifact written without a word
                           dynamic=dynamic_dims(overrides))


def _import(module_name: str, model: str):
    as_path = Path(module_name if module_name.endswith(".py") else f"{module_name}.py")
    try:
        if as_path.is_file():
            spec = importlib.util.spec_from_file_location(as_path.stem, as_path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[as_path.stem] = module
            spec.loader.exec_module(module)
            return module
        if "" not in sys.path:
            sys.path.insert(0, "")
        return importlib.import_module(module_name.replace("/", "."))
    except ModuleNotFoundError as exc:
        raise UsageError(f"{model}: cannot import {module_name!r} ({exc}).",
                         hint="Install the package or run slimc from the folder that holds "
                         "the module.") from None
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{model}: importing {module_name!r} raised "
                         f"{type(exc).__name__}: {exc}") from None


def _name_inputs(example, names: list[str], model: str) -> dict[str, torch.Tensor]:
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, dict):
        values = example
    elif isinstance(example, (tuple, list)):
        if len(example) > len(names):
            raise UsageError(f"{model}: {len(example)} example inputs for a forward that takes "
                             f"{len(names)} ({', '.join(names)}).")
        values = dict(zip(names, example, strict=False))
    else:
        raise UsageError(f"{model}: example inputs must be tensors, a tuple or a dict; got "
                         f"{type(example).__name__}.")
    bad = [k for k, v in values.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UsageError(f"{model}: example input(s) {', '.join(bad)} are not tensors; slimc "
                         "compiles tensor-in, tensor-out models.")
    return dict(values)


def _int_high(inputs: dict[str, torch.Tensor]) -> int:
    ints = [int(v.max()) + 1 for v in inputs.values()
            if not v.dtype.is_floating_point and v.numel()]
    return max(ints, default=2)
