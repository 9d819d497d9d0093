"""`slimc explore`'s original point (``(original, -O0)``, size 1.0) must reproduce the original
model: its recipe used to run eliminate-dead-code, which drops weights no output reads (MiniLM's
pooler under sentence-transformers: size 0.993, not 1.0)."""

from __future__ import annotations

import torch
import yaml

import slimc.api
from slimc.search.driver import recipe_data


class _WithDeadWeights(torch.nn.Module):
    """One layer the output uses and one no output reads."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(16, 8)
        self.unused = torch.nn.Linear(16, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_original_points_recipe_keeps_every_weight(tmp_path):
    recipe = recipe_data([], None, None, "slimc explore point point-00: (original, -O0)")
    assert recipe["pipeline"] == []
    path = tmp_path / "point-00.yaml"
    path.write_text(yaml.safe_dump(recipe))
    torch.manual_seed(0)
    model = _WithDeadWeights().eval()
    result = slimc.api.compile(model, (torch.randn(2, 16),), recipe=path,
                               output=tmp_path / "out")
    before, after = result.manifest["weight_bytes_before"], result.manifest["weight_bytes_after"]
    assert after == before == 4 * (16 * 8 + 8 + 16 * 64 + 64)
