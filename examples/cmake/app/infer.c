/* infer: a C program that embeds a slimc artifact. It loads model.so with the bundled TVM runtime
 * (OUT/runtime/ of `slimc compile --bundle`), runs it on .npy inputs (in manifest.json's
 * "inputs" order) and prints every output's shape and values to stdout.
 *
 *   infer OUT/model.so input0.npy [input1.npy ...]
 *
 * It reuses the bundled runner's helpers (npy reading, TVM FFI calls) by including
 * OUT/runtime/slimc_run.c with its main() switched off. */
#define SLIMC_RUN_NO_MAIN
#include "slimc_run.c"

static void print_tensor(TVMFFIObjectHandle tensor, int index) {
  DLManagedTensor* managed = NULL;
  check(TVMFFITensorToDLPack(tensor, &managed), "reading an output");
  const DLTensor* t = &managed->dl_tensor;
  size_t count = 1;
  printf("output %d shape", index);
  for (int i = 0; i < t->ndim; ++i) {
    printf(" %lld", (long long)t->shape[i]);
    count *= (size_t)t->shape[i];
  }
  printf(" values");
  const char* data = (const char*)t->data + t->byte_offset;
  for (size_t i = 0; i < count; ++i) {
    if (t->dtype.code == kDLFloat && t->dtype.bits == 32) printf(" %.9g", ((const float*)data)[i]);
    else if (t->dtype.code == kDLFloat && t->dtype.bits == 64) printf(" %.17g", ((const double*)data)[i]);
    else if (t->dtype.code == kDLInt && t->dtype.bits == 64) printf(" %lld", (long long)((const int64_t*)data)[i]);
    else if (t->dtype.code == kDLInt && t->dtype.bits == 32) printf(" %d", ((const int32_t*)data)[i]);
    else fail("infer prints float32/64 and int32/64 outputs", NULL);
  }
  printf("\n");
  if (managed->deleter) managed->deleter(managed);
}

static int print_all(TVMFFIAny value, int next) {
  if (value.type_index == kTVMFFITensor) {
    print_tensor(value.v_obj, next);
    return next + 1;
  }
  if (value.type_index != kTVMFFIArray) fail("unexpected VM output type", NULL);
  TVMFFIAny size_args[1] = {value};
  int64_t size = call(global("ffi.ArraySize"), size_args, 1, "ffi.ArraySize").v_int64;
  for (int64_t i = 0; i < size; ++i) {
    TVMFFIAny args[2] = {value, int_arg(i)};
    next = print_all(call(global("ffi.ArrayGetItem"), args, 2, "ffi.ArrayGetItem"), next);
  }
  return next;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: infer model.so [input0.npy ...]\n");
    return 2;
  }
  flush_denormals(); /* x86-64: denormal floats flushed to zero (slimc_run.c) */
  TVMFFIAny path = str_arg(argv[1]);
  TVMFFIAny lib = call(global("ffi.ModuleLoadFromFile"), &path, 1, argv[1]);
  TVMFFIAny vm = call(module_function(lib.v_obj, "vm_load_executable"), NULL, 0,
                      "vm_load_executable");
  TVMFFIAny init[3] = {int_arg(kDLCPU), int_arg(0), int_arg(2 /* pooled allocator */)};
  call(module_function(vm.v_obj, "vm_initialization"), init, 3, "vm_initialization");
  int n = argc - 2;
  TVMFFIAny* inputs = calloc((size_t)(n ? n : 1), sizeof(TVMFFIAny));
  for (int i = 0; i < n; ++i) inputs[i] = obj_arg(read_npy(argv[2 + i]), kTVMFFITensor);
  /* pinned_call: the caller kept off TVM's pinned worker cores for the call (slimc_run.c) */
  print_all(pinned_call(module_function(vm.v_obj, "main"), inputs, n, "main"), 0);
  return 0;
}
