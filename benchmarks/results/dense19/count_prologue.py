import sys, tvm, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import models
from tests.test_schedules import _lower
from slimc.backends.tvm.schedules import fusion_passes
from tvm import tirx
target = tvm.target.Target({"kind": "llvm"})
for name in sys.argv[1:]:
    module, inputs = getattr(models, name)()
    mod = _lower(module, tuple(inputs.values()))
    with target, tvm.transform.PassContext(opt_level=3):
        out = tvm.transform.Sequential(fusion_passes(target)[:19])(mod)
    txt = out["main"].script(show_meta=False)
    print(name, "conv2d_prologue calls:", txt.count("conv2d_prologue"), flush=True)
