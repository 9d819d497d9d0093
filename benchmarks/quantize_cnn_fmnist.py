"""Real accuracy of quantized convolutions: a small CNN trained on Fashion-MNIST, compiled by
slimc as fp32, int8 weight-only, int8 W8A8 (static int8 activations, calibrated on 512
training images) and int4 weight-only, top-1 of each compiled artifact on the 10,000 test
images.

    python benchmarks/quantize_cnn_fmnist.py                  # trains 1 epoch, 2 threads
    python benchmarks/quantize_cnn_fmnist.py --epochs 2 --json out.json
    python benchmarks/quantize_cnn_fmnist.py --weights w.pt   # train once, reuse afterwards
    python benchmarks/quantize_cnn_fmnist.py --max-steps 150  # shorter training (loaded host)

Data: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``, idx
format). The network has the layer types the quantizer must reach: regular 3x3 convolutions,
a depthwise 3x3 and a pointwise 1x1, batch norms (folded by ``quantize`` first) and a linear
classifier. Accuracy is measured on what the artifacts compute (the TVM libraries), not on
the IR.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

DATA = Path(os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
BATCH = 100  # images per artifact call (the compiled input shape)
PIPELINES = {"fp32": "", "int8": "quantize{weights=int8}",
             "w8a8": "quantize{weights=int8,activations=int8}",
             "int4": "quantize{weights=int4,group_size=64}"}
#: Training images the W8A8 activation ranges are calibrated on (never test images).
CALIB_IMAGES = 512


def load_idx(name: str) -> np.ndarray:
    with gzip.open(DATA / name) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def dataset(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = load_idx(f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = load_idx(f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    images = (images - 0.2860) / 0.3530  # the training set's mean / std
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels)


class FashionCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, **kw) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16, kernel_size=3, padding=1), nn.MaxPool2d(2),
            *block(16, 32, kernel_size=3, padding=1), nn.MaxPool2d(2),
            *block(32, 32, kernel_size=3, padding=1, groups=32),  # depthwise
            *block(32, 64, kernel_size=1),  # pointwise
            *block(64, 64, kernel_size=3, padding=1), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(64, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image).flatten(1))


def factory():
    """``benchmarks/quantize_cnn_fmnist.py:factory`` for slimc: the trained weights."""
    model = FashionCNN()
    model.load_state_dict(torch.load(os.environ["SLIMC_FMNIST_WEIGHTS"]))
    return model.eval(), (torch.zeros(BATCH, 1, 28, 28),)


def train(epochs: int, seed: int = 0, max_steps: int = 0) -> FashionCNN:
    """Adam + one-cycle; ``max_steps`` > 0: stop after that many batches of 128 (a loaded
    machine), the schedule shortened to match."""
    torch.manual_seed(seed)
    images, labels = dataset("train")
    model = FashionCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (len(images) // 128)
    if max_steps:
        steps = min(steps, max_steps)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        start = time.perf_counter()
        for i in range(min(len(images) // 128, steps - epoch * (len(images) // 128))):
            idx = order[i * 128:(i + 1) * 128]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return model.eval()


def top1(run, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(images), BATCH):
        logits = run(images[i:i + BATCH])
        correct += int((np.asarray(logits).argmax(-1) == labels[i:i + BATCH].numpy()).sum())
    return 100.0 * correct / len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="train on at most this many batches of 128 (0: all epochs)")
    parser.add_argument("--weights", type=Path, help="trained weights: loaded if the file "
                        "exists, else written after training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import slimc

    if args.weights and args.weights.exists():
        model = FashionCNN()
        model.load_state_dict(torch.load(args.weights))
        model.eval()
    else:
        model = train(args.epochs, max_steps=args.max_steps)
        if args.weights:
            torch.save(model.state_dict(), args.weights)
    images, labels = dataset("test")
    with torch.no_grad():
        eager = top1(lambda x: model(x).numpy(), images, labels)
    work = Path(tempfile.mkdtemp(prefix="slimc-fmnist-"))
    weights = work / "weights.pt"
    torch.save(model.state_dict(), weights)
    os.environ["SLIMC_FMNIST_WEIGHTS"] = str(weights)
    calib = work / "calib.npy"
    train_images, _ = dataset("train")
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))
    np.save(calib, train_images[order[:CALIB_IMAGES]].numpy())
    rows = {"eager (PyTorch fp32)": {"top1": eager}}
    for name, pipeline in PIPELINES.items():
        static = "activations=int8" in pipeline
        result = slimc.compile_model(
            f"{Path(__file__).resolve()}:factory",
            slimc.CompileOptions(pipeline=pipeline or None, output=work / name,
                                 threads=args.threads, calib=calib if static else None))
        manifest = json.loads((result.output / "manifest.json").read_text())
        artifact = slimc.load(result.output)
        input_name = next(iter(artifact.example_inputs()))
        accuracy = top1(lambda x, a=artifact, n=input_name: next(iter(a(**{n: x.numpy()})
                                                                     .values())),
                        images, labels)
        cov = (manifest["pipeline"][0]["summary"]["coverage"]["reached_fraction"]
               if manifest["pipeline"] else None)
        rows[f"slimc {name}"] = {
            "top1": accuracy, "pipeline": pipeline,
            "weight_bytes": manifest["weight_bytes_after"],
            "weight_ratio": manifest["weight_bytes_after"] / manifest["weight_bytes_before"],
            "library_bytes": manifest["library_bytes"], "coverage": cov}
    base = rows["slimc fp32"]["top1"]
    print("\n| engine | top-1 (%) | vs fp32 (points) | weight bytes | library bytes |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        wb = f"{row['weight_bytes']:,} ({row['weight_ratio']:.3f}x)" if "weight_bytes" in row \
            else "-"
        lib = f"{row['library_bytes']:,}" if "library_bytes" in row else "-"
        print(f"| {name} | {row['top1']:.2f} | {row['top1'] - base:+.2f} | {wb} | {lib} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
