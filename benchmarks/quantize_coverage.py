"""Weight bytes reached by ``quantize`` per model family (the small configs of the tests).

    python benchmarks/quantize_coverage.py                 # every family, int8 and int4
    python benchmarks/quantize_coverage.py --families resnet,mixtral

Per family and format: weight bytes after / before, the share of the float weight bytes the
pass quantized, the output's relative L2 error against the float model (on the IR: the same
computation the verified artifact performs), and what stayed float and why.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FAMILIES = ("resnet", "mobilenet_v2", "efficientnet", "regnet", "densenet", "squeezenet",
            "audio", "falcon", "mixtral")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args(argv)
    import torch
    from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

    from slimc import coverage
    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import PassContext, relative_l2
    from tests.cnn_models import HF_VISION, save_hf_model

    torch.set_num_threads(2)
    factories = {"densenet": "tests.cnn_models:densenet",
                 "squeezenet": "tests.cnn_models:squeezenet",
                 "audio": "tests.cnn_models:audio_front_end"}
    print("| family | format | weight bytes after/before | quantized share | rel. L2 | "
          "left float |")
    print("|---|---|---:|---:|---:|---|")
    for family in args.families.split(","):
        model = factories.get(family) or save_hf_model(family, Path(tempfile.mkdtemp()) / family)
        overrides = parse_overrides(["pixel_values=1x3x32x32:float32"]
                                    if family in HF_VISION else [])
        for weights in ("int8", "int4"):
            ir, inputs = capture(load_model(model, overrides))
            reference = ir.run(inputs)
            summary = quantize_ir(ir, PassContext(example_inputs=inputs),
                                  QuantizeOptions(weights=weights))
            cov = summary["coverage"]
            left = "; ".join(f"{g['tensors']} x {g['reason']}" for g in cov["untouched"])
            print(f"| {family} | {weights} | "
                  f"{summary['bytes_after'] / summary['bytes_before']:.3f} | "
                  f"{100 * cov['reached_fraction']:.1f}% | "
                  f"{relative_l2(reference, ir.run(inputs)):.4f} | {left} |", flush=True)
            if weights == "int8":
                print(f"<!-- {family}: quantize: {coverage.describe(cov, 'quantized')} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
