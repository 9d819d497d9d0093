"""Option (b): config_threadpool(kSpecifyOneCorePerThread=-2, 2, ["0","1"]): where does the caller land?"""
import os, sys, glob, numpy as np
os.environ["TVM_NUM_THREADS"] = "2"
import tvm
from slimc.backends.tvm.runtime import NativeRunner
r = NativeRunner(sys.argv[1], 2, pin_caller=False)
x = np.zeros((64, 256), np.float32)
r([x])
def masks():
    return {int(t.rsplit("/",1)[1]) % 10000: sorted(os.sched_getaffinity(int(t.rsplit("/",1)[1]))) for t in glob.glob("/proc/self/task/*")}
print("default kBig:", masks())
tvm.get_global_func("runtime.config_threadpool")(-2, 2, ["0", "1"])
r([x])
print("kSpecifyOneCorePerThread [0,1]:", masks(), "caller", sorted(os.sched_getaffinity(0)))
