"""slimc: a compiler for model compression.

Python API (the CLI is a thin layer over it)::

    import slimc
    result = slimc.compile("path/to/hf-model", target="arm")   # or compile(module, inputs)
    model = slimc.load(result.output)       # host artifacts
    outputs = model(**model.example_inputs())
"""

from __future__ import annotations

__version__ = "0.1.0"

from slimc.hookspec import hookimpl  # noqa: E402  (re-exported for plugin authors)

__all__ = ["__version__", "hookimpl", "load", "compile", "compile_model", "CompileOptions",
           "CompileResult", "IR"]


def __getattr__(name: str):
    # Lazy: `import slimc` in a plugin must not import torch/TVM.
    if name == "load":
        from slimc.artifact import load

        return load
    if name in ("compile", "compile_model", "CompileOptions", "CompileResult"):
        from slimc import api

        return getattr(api, name)
    if name == "IR":
        from slimc.ir import IR

        return IR
    raise AttributeError(name)
