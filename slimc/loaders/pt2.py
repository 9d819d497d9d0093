"""Load a ``.pt2`` archive written by ``torch.export.save`` (or by ``slimc``'s own IR.save)."""

from __future__ import annotations

from pathlib import Path

from slimc.errors import UsageError
from slimc.loaders.base import InputOverride, LoadedModel


class ExportedProgramLoader:
    name = "pt2"
    description = "a .pt2 file saved by torch.export.save"

    def accepts(self, model: str) -> bool:
        return model.endswith(".pt2")

    def load(self, model: str, overrides: dict[str, InputOverride]) -> LoadedModel:
        from slimc.ir import IR

        if not Path(model).is_file():
            raise UsageError(f"No such file: {model}.")
        if overrides:
            raise UsageError(
                f"--input cannot change the shapes of {model}: an exported program is "
                "specialised to the shapes it was exported with.",
                hint="Re-export it with the shapes you want, or drop --input.",
            )
        ir = IR.load(model)
        return LoadedModel(name=Path(model).stem, program=ir.program, source=model,
                           kind=self.name, extra={"ir": ir})
