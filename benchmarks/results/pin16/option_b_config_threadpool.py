"""Option (b): ``config_threadpool(kSpecifyOneCorePerThread=-2, 2, ["0", "1"])``: does it pin
the calling thread? (It does not: the caller keeps all the listed cores, as in kBig.)

    python option_b_config_threadpool.py LIB.so   # a Relax VM library with a parallel loop
"""
import glob
import os
import sys

import numpy as np

os.environ["TVM_NUM_THREADS"] = "2"
import tvm  # noqa: E402
from slimc.backends.tvm.runtime import NativeRunner  # noqa: E402


def masks() -> dict[int, list[int]]:
    tids = [int(t.rsplit("/", 1)[1]) for t in glob.glob("/proc/self/task/*")]
    return {tid % 10000: sorted(os.sched_getaffinity(tid)) for tid in tids}


r = NativeRunner(sys.argv[1], 2, pin_caller=False)
x = np.zeros((64, 256), np.float32)
r([x])
print("default kBig:", masks())
tvm.get_global_func("runtime.config_threadpool")(-2, 2, ["0", "1"])
r([x])
print("kSpecifyOneCorePerThread [0,1]:", masks(), "caller", sorted(os.sched_getaffinity(0)))
