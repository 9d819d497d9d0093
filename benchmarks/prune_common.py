"""Shared helpers of the structured-pruning benchmarks (issue 4): data, slimc and Torch-Pruning.

Data sets (all local, no network at run time):

* KJV text from the ``bible-kjv`` Debian package (``bible -f <spec>``); calibration and
  evaluation use disjoint books.
* WordSim-353 from the gensim wheel's test data (``pip download gensim --no-deps``; the file is
  read out of the wheel, gensim is not installed).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


# -- data -----------------------------------------------------------------------------------


def kjv(spec: str) -> list[str]:
    """Verses of ``spec`` (e.g. ``Genesis1:1-50:26``) as plain sentences."""
    out = subprocess.run(["bible", "-f", spec], capture_output=True, text=True, check=True)
    verses, cur = [], []
    for line in out.stdout.splitlines():
        m = re.match(r"^\S+\d+:\d+ (.*)$", line)
        if m:
            if cur:
                verses.append(" ".join(cur))
            cur = [m.group(1).strip()]
        elif line.strip() and cur:
            cur.append(line.strip())
    if cur:
        verses.append(" ".join(cur))
    return verses


def wordsim353(wheel_dir: str = "/tmp/gensim") -> list[tuple[str, str, float]]:
    """The 353 (word, word, human score) pairs, from an installed gensim package or else the
    gensim wheel in ``wheel_dir`` (the same file: ``gensim/test/test_data/wordsim353.tsv``)."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    installed = (Path(spec.origin).parent / "test/test_data/wordsim353.tsv"
                 if spec and spec.origin else None)
    wheels = sorted(Path(wheel_dir).glob("gensim-*.whl"))
    if installed is not None and installed.exists():
        text = installed.read_text()
    elif wheels:
        with zipfile.ZipFile(wheels[-1]) as z:
            text = z.read("gensim/test/test_data/wordsim353.tsv").decode()
    else:
        raise SystemExit(f"no gensim package and no gensim wheel in {wheel_dir}: pip download "
                         f"gensim --no-deps -d {wheel_dir}")
    pairs = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b, s = line.split("\t")
        pairs.append((a, b, float(s)))
    return pairs


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


# -- slimc ------------------------------------------------------------------------------------


def slimc_prune(module: torch.nn.Module, example: dict[str, torch.Tensor],
                calib: list[dict[str, torch.Tensor]], options: dict) -> tuple:
    """Capture ``module`` at ``example``'s shapes, run ``prune{options}`` with ``calib`` as the
    calibration batches. Returns (pruned IR, params before, params after, seconds)."""
    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel
    from slimc.passmanager import PassContext, PassInvocation, PassManager
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    registry = get_registry()
    loaded = LoadedModel(name="bench", module=module, example_inputs=dict(example),
                         as_kwargs=True)
    ir, inputs = capture(loaded)
    ir.remove_unused_weights()
    ir.changed()
    before = ir.num_params()
    ctx = PassContext(example_inputs=inputs, target=resolve_target("llvm", registry),
                      verify=False)
    ctx.calibration_batches = [[b[n] for n in ir.input_names] for b in calib]
    cls = registry.passes["prune"]
    t0 = time.perf_counter()
    PassManager(registry.passes).run(ir, [PassInvocation("prune", cls.Options(**options))], ctx)
    return ir, before, ir.num_params(), time.perf_counter() - t0


def run_ir(ir, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ir.run([batch[n] for n in ir.input_names])[0]


# -- Torch-Pruning --------------------------------------------------------------------------


def count_params(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def tp_prune_to(model_fn, build_pruner, goal_params: int, after_prune=None, steps: int = 8,
                lo: float = 0.0, hi: float = 0.9):
    """Bisect Torch-Pruning's channel ratio so the pruned model has about ``goal_params``
    parameters; returns (model, ratio, params). ``build_pruner(model, ratio)`` returns a pruner,
    ``model_fn()`` a fresh model (deep-copied), ``after_prune(model, pruner)`` fixes attributes."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = model_fn()
        pruner = build_pruner(model, mid)
        pruner.step()
        if after_prune:
            after_prune(model, pruner)
        n = count_params(model)
        if best is None or abs(n - goal_params) < abs(best[2] - goal_params):
            best = (model, mid, n)
        if n > goal_params:
            lo = mid
        else:
            hi = mid
    return best


def deepcopy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


# -- output ---------------------------------------------------------------------------------


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) + " |"
              for r in cells]
    return "\n".join(lines)


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2))
    return path
