"""IR-level screen: capture each probe model once, run each transform via the pass manager."""
import sys, json, traceback, time
sys.path.insert(0, '/work/wt/hunt20/benchmarks')
import torch
torch.set_num_threads(1)
import transform_probe as tp
from slimc.capture import capture, load_model
from slimc.loaders.base import parse_overrides
from slimc.passmanager import PassContext, PassManager
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry
from slimc.calibration import load_calibration
from slimc.targets import resolve_target
from pathlib import Path
REG = get_registry()
PIPES = ["prune{ratio=0.3}", "quantize{weights=int8,activations=int8}", "lowrank{ratio=0.2}",
         "share{basis=true,ratio=0.2}", "share{blocks=true,ratio=0.2}", "quantize{weights=int4,group_size=32}",
         "prune{ratio=0.3,granularity=all}", "lowrank{ratio=0.2,allocation=measured}",
         "prune{ratio=0.3,reconstruct=lsq}", "quantize{weights=int4,method=gptq,group_size=32}",
         "quantize{weights=int8,method=awq}", "lowrank{ratio=0.2,embeddings=true}", "prune{ratio=0.3,granularity=block}"]
models = sys.argv[1].split(",")
for m in models:
    d = Path('/tmp/tp20/models') / m
    ov = [a for a in tp.MODELS[m][3] if a != '--input']
    t0 = time.time()
    try:
        ir, inputs = capture(load_model(str(d), parse_overrides(ov)))
    except Exception as e:
        print(json.dumps({"model": m, "stage": "capture", "err": repr(e)[:300]}), flush=True); continue
    calib_path, _ = tp.data_files(m, Path('/tmp/tp20'))
    names = [s.name for s in ir.input_specs()]
    tmpl = dict(zip(names, inputs))
    try:
        cal = load_calibration(calib_path, tmpl, model_dir=d, max_batches=4, vocab_size=None)
        batches = [[b[n] for n in names] for b in cal.batches]
    except Exception as e:
        print(json.dumps({"model": m, "stage": "calib", "err": repr(e)[:300]}), flush=True); batches = []
    ir.remove_unused_weights(); ir.changed()
    ref = ir.run(inputs)
    for p in (sys.argv[2].split(";") if len(sys.argv)>2 else PIPES):
        work = ir.clone()
        ctx = PassContext(example_inputs=inputs, calibration_batches=batches, target=None)
        t1 = time.time()
        try:
            recs = PassManager(REG.passes).run(work, validate(parse_pipeline_text(p), REG.passes), ctx)
            out = work.run(inputs)
            rel = max(float((a.float()-b.float()).norm()/max(b.float().norm(),1e-30)) for a,b in zip(out, ref) if a.shape==b.shape and a.is_floating_point())
            ann = work.annotations.get(p.split('{')[0], {})
            info = {k: ann.get(k) for k in ("removed_units","layers","factorized","skipped","basis_groups","tied_blocks") if k in ann}
            print(json.dumps({"model": m, "pipe": p, "ok": True, "params": [recs[-1].params_before, recs[-1].params_after], "rel": round(rel,4), "s": round(time.time()-t1), "info": str(info)[:300]}), flush=True)
        except Exception as e:
            print(json.dumps({"model": m, "pipe": p, "ok": False, "err": f"{type(e).__name__}: {e}"[:400], "tb": traceback.format_exc()[-900:]}), flush=True)
