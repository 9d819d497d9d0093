"""slimc vs PyTorch eager vs ONNX Runtime, in one process, on the same inputs and threads.

    python benchmarks/run.py                       # MiniLM, CNN, decode step; 2 threads
    python benchmarks/run.py --models minilm --runs 50 --threads 2
    python benchmarks/run.py --models minilm --engines slimc,slimc-w8a8,ort,ort-dyn8,torch-dyn8
    python benchmarks/run.py --models cnn,mobilenet_v2 --engines slimc,slimc-w8a8,ort,ort-qdq8
    python benchmarks/run.py --models table --engines slimc,ort   # the ten-workload table
    python benchmarks/run.py --models vit_small --workdir w --reuse  # time w's artifacts

``--models table`` is the workloads of :data:`TABLE` (five that were tuned for by nobody:
BERT-base, MiniLM batch 8, DistilBERT seq 384, ViT-Small/16, MobileNetV2; and five more vision,
audio and text models, plus MobileNetV3-Large and ResNet-18); ``long`` the long-sequence /
batch workloads of :data:`LONG`; ``extra``, ``more`` and ``third`` the three hunts for
workloads nobody tuned for (:data:`EXTRA`, :data:`MORE`, :data:`THIRD`). With slimc and ORT
both run, the summary ends with the geometric mean of slimc/ORT.

Each engine is warmed up, then the engines are timed in interleaved rounds (a few calls each,
round-robin, rotating who goes first, with an idle pause (400 ms) before each block so the previous
engine's spinning threads have parked) so that machine load drifting during the run hits all of
them alike. Reported: median latency, interquartile range, min/max, and slimc's ratio to the
baselines (< 1.0 means faster). The untuned slimc artifact's compile time is reported too.
Needs the ``bench`` extra: ``pip install -e .[bench]`` (onnxruntime, onnx, onnxscript).

Quantized engines (MiniLM and decode by default): ``slimc-w8a8`` is the artifact of
``quantize{weights=int8,activations=int8}`` (static activation scales calibrated on KJV text
tokenized like the input, when the ``bible`` program is installed), ``slimc-int8w`` /
``slimc-int4w`` weight-only int8 / int4-g128, ``torch-dyn8`` PyTorch's
dynamic int8 linears (``torch.ao.quantization.quantize_dynamic``), ``ort-dyn8`` ONNX Runtime's
dynamic int8 (``onnxruntime.quantization.quantize_dynamic`` of the same ONNX graph), ``ort-qdq8``
ONNX Runtime's static int8 (``quantize_static``, QDQ format, per-channel int8 weights, int8
activations, MinMax calibration on the same calibration data as ``slimc-w8a8``: for the CNNs
``models.image_calibration``). ``slimc-w8a8-generic`` is ``slimc-w8a8`` on the generic int8
kernel whatever the target has (the dot-product kernels' gain, e.g. AVX2's on ``--target
x86-64-v3``). The "rel.L2 vs eager" column is their fidelity.

Thread pools that spin: ``ort-nospin`` is ``ort`` with ``session.intra_op.allow_spinning=0``
(its workers sleep between calls instead of spinning), to separate ONNX Runtime's kernel speed
from how its spinning pool fares beside other processes. TVM's pool spins too: each worker
calls ``sched_yield`` up to ``TVM_THREAD_POOL_SPIN_COUNT`` times (default 300000) after a
parallel loop before it sleeps; ``--tvm-spin-count N`` sets it (0: sleep at once). An engine
timed alone (``--engines ort``) loads no TVM library and starts no TVM pool.

Denormal floats: slimc's runtime flushes them to zero on x86-64 (``SLIMC_FLUSH_DENORMALS=0``
turns it off: compare in two processes, TVM's pool workers keep the mode they were given);
ONNX Runtime does not unless asked. ``ort-ftz`` is ``ort`` with
``session.set_denormal_as_zero=1``, the like-for-like baseline where a model's activations
decay into denormals (EfficientNet-B0 with random weights: ~20x slower calls without). It runs
without the other ORT engines: ORT's denormal mode is process state (a flushing session created
after a default one did not flush: 150-155 ms vs 12.8 ms for B0; one created first made a later
default session flush too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("minilm", "cnn", "decode")  # also: mobilenet_v2
#: ``--models table``: the workload table of docs/benchmarks.md (factories in models.py).
TABLE = ("vit_small", "mobilenet_v2", "bert_base", "minilm_b8", "distilbert_384",
         "efficientnet_b0", "convnext_tiny", "resnet50", "whisper_tiny_encoder",
         "t5_small_encoder", "mobilenet_v3_large", "resnet18")
#: ``--models long``: long sequences and batches.
LONG = ("minilm_1024", "minilm_b8", "vit_small_b4")
#: ``--models extra``: workloads outside the tuned table (a stand-in for unseen models).
EXTRA = ("swin_tiny", "mobilevit_small", "wav2vec2_base", "vit_small_b4", "minilm_1024",
         "regnet_y_400mf", "segformer_b0", "gpt2_prefill", "squeezebert", "levit_128s",
         "poolformer_s12", "dinov2_small")
#: ``--models more``: the second hunt for losing workloads (issue 16, wt/hunt16).
MORE = ("deit_tiny_distilled", "beit_base", "clip_text", "clip_vision_b32", "convnextv2_atto",
        "mobilenet_v1", "albert_base", "electra_small_512", "bart_base_encoder",
        "mobilenet_v2_b8", "shufflenet_v2", "densenet121")
#: ``--models third``: the third hunt (session 27): LLM prefill, relative-position and
#: rotary encoders, separable/additive/focal attention, hierarchical ViTs, grouped convs.
THIRD = ("llama_prefill", "deberta_v3_small", "modernbert_512", "mpnet_base", "mobilevitv2",
         "pvt_v2_b0", "cvt_13", "swiftformer_xs", "focalnet_tiny", "hiera_tiny", "siglip_vision",
         "ast_audio", "resnext50")
PRESETS = {"table": TABLE, "long": LONG, "extra": EXTRA, "more": MORE, "third": THIRD}
#: slimc engines: the artifact of each pipeline (None: the default, fp32).
SLIMC = {"slimc": None, "slimc-w8a8": "quantize{weights=int8,activations=int8}",
         "slimc-int8w": "quantize{weights=int8}",
         "slimc-int4w": "quantize{weights=int4,group_size=128}",
         "slimc-w8a8-generic": "quantize{weights=int8,activations=int8}",
         # per-layer calibrated scales only (before session 29's per-row scales)
         "slimc-w8a8-static": "quantize{weights=int8,activations=int8,act_scales=static}"}
#: Engines compiled with this int8 kernel kind forced (``int8_kernels.FORCE_KIND``): the
#: generic kernel measured against the target's own (AVX2, VNNI, sdot) in the same run.
FORCED_KIND = {"slimc-w8a8-generic": "generic"}
#: The fp32 artifact after ``--tune N`` (``--tune-trials``), tuned into a fresh database.
TUNED = "slimc-tuned"
#: The fp32 artifact again with the runtime's caller pinning off (``NativeRunner(pin_caller=
#: False)``, what ``SLIMC_PIN_CALLER=0`` does): an A/B of the pinning in one process.
NOPIN = "slimc-nopin"
ENGINES = (*SLIMC, TUNED, NOPIN, "eager", "ort", "ort-nospin", "ort-ftz", "torch-dyn8", "ort-dyn8",
           "ort-qdq8")
#: Engines run when --engines is not given: the quantized ones only where they are a target.
DEFAULT_ENGINES = {
    "minilm": ("slimc", "eager", "ort", "slimc-w8a8", "torch-dyn8", "ort-dyn8"),
    "decode": ("slimc", "eager", "ort", "slimc-int8w", "slimc-int4w", "torch-dyn8"),
}


@dataclass
class Result:
    model: str
    times: dict[str, list[float]] = field(default_factory=dict)
    compile_s: float | None = None
    build_s: float | None = None
    agreement: dict[str, float] = field(default_factory=dict)
    #: engine -> CPU ms the whole process used while idle after one call of it, in the
    #: pause before the next block and in the 270 ms after that (spinning worker threads).
    idle_cpu_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--engines", default=None, help=f"comma list of {ENGINES} (default: "
                   "slimc,eager,ort, plus the int8 engines for minilm)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--runs", type=int, default=12, help="interleaved rounds per engine")
    p.add_argument("--block", type=int, default=3, help="consecutive calls per engine per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per engine")
    p.add_argument("--pause-ms", type=float, default=400.0,
                   help="idle time between engine blocks, so the previous engine's spinning "
                   "worker threads (OpenMP, ORT, TVM) park before the next one is timed: TVM's "
                   "yield for ~150-250 ms after a call, ORT's use 20-40 ms of CPU in the 300 ms "
                   "after one; at 30 ms a slimc call after ORT's was 1.1-2.0x slower "
                   "(benchmarks/spin_interference.py)")
    p.add_argument("--tvm-spin-count", type=int, default=None,
                   help="TVM_THREAD_POOL_SPIN_COUNT for slimc's engines: sched_yield calls a "
                   "TVM worker makes before it sleeps (TVM's default 300000; 0 = sleep at once)")
    p.add_argument("--target", default="llvm", help="slimc --target (host targets only)")
    p.add_argument("--tune-trials", type=int, default=200,
                   help=f"MetaSchedule trials for the {TUNED} engine (opt-in via --engines)")
    p.add_argument("--workdir", type=Path, default=None, help="keep artifacts here")
    p.add_argument("--reuse", action="store_true",
                   help="use the artifacts already in --workdir (an earlier run, or a compile "
                        "made outside the timing lock) instead of compiling them again")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--ab", default="", metavar="LABEL=DIR,...",
                   help="also time the fp32 artifacts an earlier compile left in DIR "
                        "(DIR/<model>-slimc.slimc) as engine slimc@LABEL, interleaved with the "
                        "others: an A/B of two compiler versions or targets in one process")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Thread pools read these once, when first used: set them before importing anything.
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.tvm_spin_count is not None:
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(args.tvm_spin_count)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slimc-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    names = [n for m in args.models.split(",") if m for n in PRESETS.get(m, (m,))]
    others = {"ort", "ort-nospin", "ort-dyn8", "ort-qdq8"} & set((args.engines or "").split(","))
    if "ort-ftz" in (args.engines or "").split(",") and others:
        raise SystemExit(
            f"run.py: ort-ftz cannot share a process with {', '.join(sorted(others))}: ONNX "
            "Runtime's denormal mode is process state (a session with "
            "session.set_denormal_as_zero created after another one does not flush; one "
            "created first flushes the later ones too). Time it in its own run.")
    for name in names:
        engines = ([e for e in args.engines.split(",") if e] if args.engines
                   else list(DEFAULT_ENGINES.get(name, ("slimc", "eager", "ort"))))
        print(f"== {name}: preparing {', '.join(engines)}", file=sys.stderr, flush=True)
        results.append(bench_model(name, engines, args, workdir))
        print_table(results[-1:], args)
    print(f"\n# {len(results)} model(s), {args.threads} thread(s), host {_cpu_name()}")
    print_table(results, args)
    print_geomean(results)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


def bench_model(name: str, engines: list[str], args, workdir: Path) -> Result:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import models

    module, inputs = getattr(models, name)()
    result = Result(name)
    callers: dict[str, Callable[[], object]] = {}
    outputs: dict[str, np.ndarray] = {}
    arrays = {k: v.numpy() for k, v in inputs.items()}

    for engine, pipeline in [*SLIMC.items(), (TUNED, None)]:
        if engine in engines:
            runner, names = _slimc(name, args, workdir, result, pipeline, engine)
            feed = [arrays[n] for n in names]
            callers[engine] = lambda runner=runner, feed=feed: runner(feed)
            outputs[engine] = runner(feed)[0]
    if NOPIN in engines:
        runner, names = _artifact(workdir / f"{name}-slimc.slimc", args.threads, pin_caller=False)
        feed = [arrays[n] for n in names]
        callers[NOPIN] = lambda runner=runner, feed=feed: runner(feed)
        outputs[NOPIN] = runner(feed)[0]
    for label, folder in (item.split("=", 1) for item in args.ab.split(",") if item):
        runner, names = _artifact(Path(folder) / f"{name}-slimc.slimc", args.threads)
        feed = [arrays[n] for n in names]
        callers[f"slimc@{label}"] = lambda runner=runner, feed=feed: runner(feed)
        outputs[f"slimc@{label}"] = runner(feed)[0]
    if "eager" in engines:
        def eager():
            with torch.inference_mode():
                return module(**inputs)
        callers["eager"] = eager
        outputs["eager"] = eager().numpy()
    if "torch-dyn8" in engines:
        dynamic = torch.ao.quantization.quantize_dynamic(
            module, {torch.nn.Linear}, dtype=torch.qint8)

        def torch_dyn8():
            with torch.inference_mode():
                return dynamic(**inputs)
        callers["torch-dyn8"] = torch_dyn8
        outputs["torch-dyn8"] = torch_dyn8().numpy()
    if {"ort", "ort-nospin", "ort-ftz", "ort-dyn8", "ort-qdq8"} & set(engines):
        onnx_path = workdir / f"{name}.onnx"
        if "ort-ftz" in engines:  # alone in its process (main() checks): see ENGINES' notes
            ftz = _ort_session(module, inputs, args.threads, onnx_path, flush_denormals=True)
            callers["ort-ftz"] = lambda: ftz.run(None, arrays)
            outputs["ort-ftz"] = ftz.run(None, arrays)[0]
        else:
            session = _ort_session(module, inputs, args.threads, onnx_path)
        if "ort-nospin" in engines:
            nospin = _ort_session(module, inputs, args.threads, onnx_path, spinning=False)
            callers["ort-nospin"] = lambda: nospin.run(None, arrays)
            outputs["ort-nospin"] = nospin.run(None, arrays)[0]
        if "ort-qdq8" in engines:
            qdq = _ort_session(module, inputs, args.threads, onnx_path,
                               static_int8=_calibration_arrays(name, workdir))
            callers["ort-qdq8"] = lambda: qdq.run(None, arrays)
            outputs["ort-qdq8"] = qdq.run(None, arrays)[0]
        if "ort" in engines:
            callers["ort"] = lambda: session.run(None, arrays)
            outputs["ort"] = session.run(None, arrays)[0]
        if "ort-dyn8" in engines:
            dyn = _ort_session(module, inputs, args.threads, onnx_path, dynamic_int8=True)
            callers["ort-dyn8"] = lambda: dyn.run(None, arrays)
            outputs["ort-dyn8"] = dyn.run(None, arrays)[0]
    reference = outputs.get("eager")
    if reference is not None:
        for engine, out in outputs.items():
            if engine != "eager":
                result.agreement[engine] = float(
                    np.linalg.norm(out - reference) / (np.linalg.norm(reference) or 1.0))

    for fn in callers.values():
        for _ in range(args.warmup):
            fn()
    order = list(callers)
    for engine in order:  # who spins after a call, and for how long
        time.sleep(0.5)
        callers[engine]()
        t0 = time.process_time()
        time.sleep(args.pause_ms / 1e3)
        t1 = time.process_time()
        time.sleep(0.27)
        result.idle_cpu_ms[engine] = ((t1 - t0) * 1e3, (time.process_time() - t1) * 1e3)
    result.times = {e: [] for e in order}
    for r in range(args.runs):
        for engine in order[r % len(order):] + order[:r % len(order)]:
            fn = callers[engine]
            time.sleep(args.pause_ms / 1e3)
            for _ in range(args.block):
                t0 = time.perf_counter()
                fn()
                result.times[engine].append((time.perf_counter() - t0) * 1e3)
    return result


def _slimc(name: str, args, workdir: Path, result: Result, pipeline: str | None = None,
           engine: str = "slimc"):
    from slimc.backends.tvm.runtime import NativeRunner

    from slimc.compiler import CompileOptions, compile_model

    static = pipeline is not None and "activations=int8" in pipeline
    calib = _calibration_file(name, workdir) if static else None
    if static and calib is None:
        result.notes.append(f"{engine} calibrated on the benchmark input itself (no KJV text)")
    output = workdir / f"{name}-{engine}.slimc"
    tuning = {"tune": args.tune_trials, "tune_db": workdir / f"{name}-tuning"} \
        if engine == TUNED else {}
    if args.reuse and (output / "manifest.json").exists():
        result.notes.append(f"{engine}: reused {output.name} (compile not timed)")
        return _artifact(output, args.threads)
    from slimc.backends.tvm import int8_kernels

    t0 = time.perf_counter()
    int8_kernels.FORCE_KIND = FORCED_KIND.get(engine)
    try:
        compiled = compile_model(f"{HERE / 'models.py'}:{name}",
                                 CompileOptions(target=args.target, output=output,
                                                threads=args.threads, pipeline=pipeline,
                                                calib=calib, **tuning,
                                                # the cache key does not know FORCE_KIND
                                                cache=engine not in FORCED_KIND))
    finally:
        int8_kernels.FORCE_KIND = None
    if engine == TUNED:
        result.notes.append(f"{TUNED}: {compiled.manifest['tuning']['trials']} trials in "
                            f"{compiled.manifest['tuning']['tune_s']} s, "
                            f"{compiled.manifest['tuning']['records_applied']} records applied")
    if engine == "slimc":
        result.compile_s = time.perf_counter() - t0
        result.build_s = compiled.timings.get("stages", {}).get("build_s")
    runner = NativeRunner(compiled.output / compiled.manifest["library"], args.threads)
    return runner, [spec["name"] for spec in compiled.manifest["inputs"]]


def _artifact(output: Path, threads: int, pin_caller: bool | None = None):
    """A runner for the compiled artifact ``output`` and its input names, in order."""
    from slimc.backends.tvm.runtime import NativeRunner

    from slimc.artifact import read_manifest

    manifest = read_manifest(output)
    runner = NativeRunner(output / manifest["library"], threads, pin_caller=pin_caller)
    return runner, [spec["name"] for spec in manifest["inputs"]]


def _calibration_arrays(name: str, workdir: Path) -> dict | None:
    """The static int8 engines' calibration data as named arrays (N samples each)."""
    import numpy as np

    path = _calibration_file(name, workdir)
    if path is None:
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _calibration_file(name: str, workdir: Path) -> Path | None:
    """MiniLM: 8 windows of KJV Genesis tokenized like the benchmark input; CNNs: 8 random
    images (``models.image_calibration``); as ``.npz``."""
    import shutil
    import subprocess

    import numpy as np

    if name in ("cnn", "resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                "convnext_tiny", "resnet50"):
        sys.path.insert(0, str(HERE))
        import models

        path = workdir / f"{name}-calib.npz"
        np.savez(path, **{k: v.numpy() for k, v in models.image_calibration().items()})
        return path
    if name != "minilm" or not shutil.which("bible"):
        return None
    import transformers

    sys.path.insert(0, str(HERE))
    import models

    text = subprocess.run(["bible", "-f", "gen1:1-10:32"], capture_output=True, text=True,
                          check=True).stdout
    tokenizer = transformers.AutoTokenizer.from_pretrained(models.minilm_dir())
    lines = [ln.split(" ", 2)[-1] for ln in text.splitlines() if ln.strip()]
    batch = tokenizer([" ".join(lines[i:i + 6]) for i in range(0, 48, 6)], padding="max_length",
                      truncation=True, max_length=128, return_tensors="np")
    path = workdir / "minilm-calib.npz"
    np.savez(path, input_ids=batch["input_ids"].astype(np.int64),
             attention_mask=batch["attention_mask"].astype(np.int64))
    return path


def _ort_session(module, inputs, threads: int, path: Path, dynamic_int8: bool = False,
                 static_int8: dict | None = None, spinning: bool = True,
                 flush_denormals: bool = False):
    import onnxruntime as ort
    import torch

    if not path.exists():
        with torch.inference_mode(False), torch.no_grad():
            try:
                torch.onnx.export(module, (), str(path), kwargs=inputs, dynamo=True,
                                  input_names=list(inputs), optimize=True)
            except Exception:  # noqa: BLE001 - older exporter path as a second chance
                torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False,
                                  input_names=list(inputs), opset_version=17)
    if dynamic_int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = path.with_suffix(".dyn8.onnx")
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        path = quantized
    if static_int8 is not None:
        path = _ort_static_int8(path, static_int8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:  # workers sleep between calls instead of spinning (ort-nospin)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if flush_denormals:  # ort-ftz: its threads flush denormals as slimc's runtime does
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_static_int8(path: Path, calibration: dict) -> Path:
    """``quantize_static`` in QDQ format (what ONNX Runtime recommends for CPUs): the graph
    pre-processed first (shape inference, batch norms fused), per-channel int8 weights, int8
    activations with MinMax ranges from ``calibration`` (one sample per call)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            count = min(len(v) for v in calibration.values())
            self.items = iter([{k: v[i:i + 1] for k, v in calibration.items()}
                               for i in range(count)])

        def get_next(self):
            return next(self.items, None)

    prepared = path.with_suffix(".pre.onnx")
    quantized = path.with_suffix(".qdq8.onnx")
    quant_pre_process(str(path), str(prepared))
    quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return quantized


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": med, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


#: Baselines each engine's median is divided by (a column each, when that engine ran).
BASES = ("eager", "ort", "ort-nospin", "ort-ftz", "ort-qdq8", "slimc")


def print_table(results: list[Result], args) -> None:
    header = (f"{'model':14} {'engine':16} {'median ms':>10} {'IQR ms':>16} {'min-max ms':>18}"
              + "".join(f" {'/' + b:>9}" for b in BASES) + f" {'rel.L2 vs eager':>16}")
    print(header)
    print("-" * len(header))
    for res in results:
        stats = {e: _stats(t) for e, t in res.times.items() if t}
        bases = {b: stats[b]["median"] for b in BASES if b in stats}
        for engine, s in stats.items():
            ratios = [f"{s['median'] / bases[b]:.2f}x" if b in bases and b != engine else ""
                      for b in BASES]
            agree = res.agreement.get(engine)
            print(f"{res.model:14} {engine:16} {s['median']:10.2f} "
                  f"{s['q1']:7.2f}-{s['q3']:<8.2f} {s['min']:8.2f}-{s['max']:<9.2f}"
                  + "".join(f" {r:>9}" for r in ratios)
                  + f" {'' if agree is None else f'{agree:.2e}':>16}")
        if res.compile_s is not None:
            print(f"{res.model:14} slimc compile {res.compile_s:.1f} s (TVM build {res.build_s} s)")
        for engine, (pause, after) in res.idle_cpu_ms.items():
            print(f"{res.model:14} idle after {engine}: {pause:.1f} ms CPU in the "
                  f"{args.pause_ms:.0f} ms pause, {after:.1f} ms in the 270 ms after")
        for note in res.notes:
            print(f"{res.model:14} note: {note}")
    print("(/X: engine median over engine X's median, from the same interleaved run; < 1 = "
          "faster. ort = ONNX Runtime fp32, ort-qdq8 = its static int8, slimc = slimc fp32)")
    try:
        print(f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    except OSError:
        pass


def print_geomean(results: list[Result]) -> None:
    """Geometric mean and worst of slimc's median over ORT's (each ORT engine that ran, and
    ``ort-best``: the faster of ``ort`` and ``ort-nospin`` per model, the fair baseline on a
    shared host; see docs/benchmarks.md), over the models that ran both."""
    import numpy as np

    def ort_best(r: Result) -> float | None:
        medians = [float(np.median(r.times[e])) for e in ("ort", "ort-nospin") if r.times.get(e)]
        return min(medians) if len(medians) == 2 else None

    for base in ("ort", "ort-nospin", "ort-best"):
        ratios = {r.model: float(np.median(r.times["slimc"])) / (
            ort_best(r) if base == "ort-best" else float(np.median(r.times[base])))
            for r in results if r.times.get("slimc")
            and (ort_best(r) if base == "ort-best" else r.times.get(base))}
        if len(ratios) < 2:
            continue
        geomean = float(np.exp(np.mean(np.log(list(ratios.values())))))
        worst = max(ratios, key=ratios.get)
        print(f"slimc/{base} over {len(ratios)} models: geometric mean {geomean:.2f}x, "
              f"worst {worst} {ratios[worst]:.2f}x; load average {os.getloadavg()[0]:.1f}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
