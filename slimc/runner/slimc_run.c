/* slimc_run: run a slimc artifact (model.so) with only the TVM runtime: no Python, no slimc.
 *
 *   slimc_run model.so OUT_DIR [input0.npy input1.npy ...]
 *
 * Loads model.so into the Relax VM through TVM's C ABI (the packed functions Python's
 * tvm.runtime.vm.VirtualMachine calls: vm_load_executable, vm_initialization), reads the inputs
 * from .npy files (little-endian, C order, in the order of manifest.json's "inputs"), calls
 * "main" and writes the outputs, flattened depth-first, as OUT_DIR/out0.npy, out1.npy, ...
 * TVM_NUM_THREADS sets the thread-pool size. Plain C on purpose: libtvm_ffi throws C++
 * exceptions internally, and a runner with its own C++ runtime (zig's libc++) would intercept
 * their unwinding. Link: -ltvm_runtime -ltvm_ffi.
 */
#define _POSIX_C_SOURCE 200112L
#include <dlpack/dlpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

static void fail(const char* what, const char* detail) {
  fprintf(stderr, "slimc_run: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(2);
}

/* Print the error TVM raised and exit 1. */
static void check(int rc, const char* what) {
  if (rc == 0) return;
  TVMFFIObjectHandle err = NULL;
  TVMFFIErrorMoveFromRaised(&err);
  if (err) {
    TVMFFIErrorCell* cell = (TVMFFIErrorCell*)((char*)err + sizeof(TVMFFIObject));
    fprintf(stderr, "slimc_run: %s: %.*s: %.*s\n", what, (int)cell->kind.size, cell->kind.data,
            (int)cell->message.size, cell->message.data);
  } else {
    fprintf(stderr, "slimc_run: %s failed\n", what);
  }
  exit(1);
}

static TVMFFIObjectHandle global(const char* name) {
  TVMFFIByteArray bytes = {name, strlen(name)};
  TVMFFIObjectHandle fn = NULL;
  check(TVMFFIFunctionGetGlobal(&bytes, &fn), name);
  if (!fn) fail("TVM runtime function missing", name);
  return fn;
}

static TVMFFIAny call(TVMFFIObjectHandle fn, TVMFFIAny* args, int n, const char* what) {
  TVMFFIAny out;
  memset(&out, 0, sizeof(out));
  check(TVMFFIFunctionCall(fn, args, n, &out), what);
  return out;
}

static TVMFFIAny obj_arg(TVMFFIObjectHandle h, int32_t type_index) {
  TVMFFIAny a;
  memset(&a, 0, sizeof(a));
  a.type_index = type_index;
  a.v_obj = (TVMFFIObject*)h;
  return a;
}

static TVMFFIAny int_arg(int64_t v) {
  TVMFFIAny a;
  memset(&a, 0, sizeof(a));
  a.type_index = kTVMFFIInt;
  a.v_int64 = v;
  return a;
}

static TVMFFIAny str_arg(const char* s) {
  TVMFFIAny a;
  memset(&a, 0, sizeof(a));
  a.type_index = kTVMFFIRawStr;
  a.v_c_str = s;
  return a;
}

/* module.GetFunction(name) via the global "ffi.ModuleGetFunction". */
static TVMFFIObjectHandle module_function(TVMFFIObjectHandle mod, const char* name) {
  TVMFFIAny args[3] = {obj_arg(mod, kTVMFFIModule), str_arg(name), int_arg(1)};
  args[2].type_index = kTVMFFIBool;
  TVMFFIAny fn = call(global("ffi.ModuleGetFunction"), args, 3, name);
  if (fn.type_index != kTVMFFIFunction) fail("the library has no function", name);
  return fn.v_obj;
}

/* ---- .npy ---- */
static const char* field(const char* header, const char* key) {
  const char* at = strstr(header, key);
  if (!at) return NULL;
  at = strchr(at + strlen(key), ':');
  while (at && (*at == ':' || *at == ' ')) ++at;
  return at;
}

static void free_managed(DLManagedTensor* self) {
  free(self->dl_tensor.data);
  free(self->dl_tensor.shape);
  free(self);
}

static TVMFFIObjectHandle read_npy(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) fail("cannot open", path);
  unsigned char magic[8];
  if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "\x93NUMPY", 6) != 0) fail("not a .npy file", path);
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len16 = 0;
    if (fread(&len16, 2, 1, f) != 1) fail("truncated .npy", path);
    header_len = len16;
  } else if (fread(&header_len, 4, 1, f) != 1) {
    fail("truncated .npy", path);
  }
  char* header = calloc(header_len + 1, 1);
  if (fread(header, 1, header_len, f) != header_len) fail("truncated .npy", path);
  const char* descr = field(header, "'descr'");
  const char* order = field(header, "'fortran_order'");
  const char* shape_text = field(header, "'shape'");
  if (!descr || !order || !shape_text) fail("cannot parse the .npy header", path);
  if (strncmp(order, "True", 4) == 0) fail("Fortran-order .npy is not supported", path);
  if (descr[1] != '<' && descr[1] != '|') fail("only little-endian .npy is supported", path);
  DLDataType dtype;
  char kind = descr[2];
  dtype.code = kind == 'f' ? kDLFloat : kind == 'i' ? kDLInt : kind == 'u' ? kDLUInt
             : kind == 'b' ? kDLBool : 255;
  if (dtype.code == 255) fail("unsupported .npy dtype", path);
  dtype.bits = (uint8_t)(8 * atoi(descr + 3));
  dtype.lanes = 1;
  int64_t* shape = calloc(16, sizeof(int64_t));
  int ndim = 0;
  const char* p = shape_text + 1;
  size_t count = 1;
  while (*p && *p != ')') {
    while (*p == ' ' || *p == ',') ++p;
    if (*p == ')') break;
    if (ndim == 16) fail("too many dimensions", path);
    shape[ndim] = strtoll(p, (char**)&p, 10);
    count *= (size_t)shape[ndim++];
  }
  free(header);
  size_t bytes = count * (dtype.bits / 8);
  void* data = NULL;
  if (posix_memalign(&data, 64, bytes ? bytes : 64) != 0) fail("out of memory", path);
  if (fread(data, 1, bytes, f) != bytes) fail("truncated .npy data", path);
  fclose(f);
  DLManagedTensor* managed = calloc(1, sizeof(DLManagedTensor));
  managed->dl_tensor.data = data;
  managed->dl_tensor.device.device_type = kDLCPU;
  managed->dl_tensor.ndim = ndim;
  managed->dl_tensor.dtype = dtype;
  managed->dl_tensor.shape = shape;
  managed->deleter = free_managed;
  TVMFFIObjectHandle tensor = NULL;
  check(TVMFFITensorFromDLPack(managed, 64, 1, &tensor), path);
  return tensor;
}

static void write_npy(const char* path, TVMFFIObjectHandle tensor) {
  DLManagedTensor* managed = NULL;
  check(TVMFFITensorToDLPack(tensor, &managed), "reading an output");
  const DLTensor* t = &managed->dl_tensor;
  char kind = t->dtype.code == kDLFloat ? 'f' : t->dtype.code == kDLInt ? 'i'
            : t->dtype.code == kDLBool ? 'b' : 'u';
  char shape[512] = "(";
  size_t count = 1;
  for (int i = 0; i < t->ndim; ++i) {
    char dim[32];
    snprintf(dim, sizeof dim, "%lld%s", (long long)t->shape[i],
             t->ndim == 1 ? "," : (i + 1 < t->ndim ? ", " : ""));
    strncat(shape, dim, sizeof shape - strlen(shape) - 1);
    count *= (size_t)t->shape[i];
  }
  strncat(shape, ")", sizeof shape - strlen(shape) - 1);
  char header[1024];
  int n = snprintf(header, sizeof header,
                   "{'descr': '%c%c%d', 'fortran_order': False, 'shape': %s, }",
                   t->dtype.bits == 8 ? '|' : '<', kind, t->dtype.bits / 8, shape);
  int pad = (64 - (10 + n + 1) % 64) % 64;
  FILE* f = fopen(path, "wb");
  if (!f) fail("cannot write", path);
  uint16_t len = (uint16_t)(n + pad + 1);
  fwrite("\x93NUMPY\x01\x00", 1, 8, f);
  fwrite(&len, 2, 1, f);
  fwrite(header, 1, (size_t)n, f);
  for (int i = 0; i < pad; ++i) fputc(' ', f);
  fputc('\n', f);
  fwrite((const char*)t->data + t->byte_offset, 1, count * (t->dtype.bits / 8), f);
  if (fclose(f) != 0) fail("cannot write", path);
  if (managed->deleter) managed->deleter(managed);
}

/* Depth-first: a Tensor, or an Array of results. */
static int flatten(TVMFFIAny value, const char* out_dir, int next) {
  if (value.type_index == kTVMFFITensor) {
    char path[4096];
    snprintf(path, sizeof path, "%s/out%d.npy", out_dir, next);
    write_npy(path, value.v_obj);
    return next + 1;
  }
  if (value.type_index != kTVMFFIArray) {
    char detail[64];
    snprintf(detail, sizeof detail, "type index %d", value.type_index);
    fail("cannot write a VM output of this type", detail);
  }
  TVMFFIAny size_args[1] = {value};
  int64_t size = call(global("ffi.ArraySize"), size_args, 1, "ffi.ArraySize").v_int64;
  for (int64_t i = 0; i < size; ++i) {
    TVMFFIAny args[2] = {value, int_arg(i)};
    next = flatten(call(global("ffi.ArrayGetItem"), args, 2, "ffi.ArrayGetItem"), out_dir, next);
  }
  return next;
}

#ifndef SLIMC_RUN_NO_MAIN /* examples/cmake/app includes this file for its helpers */
int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: slimc_run model.so OUT_DIR [input0.npy input1.npy ...]\n");
    return 2;
  }
  TVMFFIAny path = str_arg(argv[1]);
  TVMFFIAny lib = call(global("ffi.ModuleLoadFromFile"), &path, 1, argv[1]);
  TVMFFIAny vm = call(module_function(lib.v_obj, "vm_load_executable"), NULL, 0,
                      "vm_load_executable");
  TVMFFIAny init[3] = {int_arg(kDLCPU), int_arg(0), int_arg(2 /* pooled allocator */)};
  call(module_function(vm.v_obj, "vm_initialization"), init, 3, "vm_initialization");
  int n_inputs = argc - 3;
  TVMFFIAny* inputs = calloc((size_t)(n_inputs ? n_inputs : 1), sizeof(TVMFFIAny));
  for (int i = 0; i < n_inputs; ++i) inputs[i] = obj_arg(read_npy(argv[3 + i]), kTVMFFITensor);
  TVMFFIAny result = call(module_function(vm.v_obj, "main"), inputs, n_inputs, "main");
  int written = flatten(result, argv[2], 0);
  fprintf(stderr, "slimc_run: wrote %d output(s) to %s\n", written, argv[2]);
  return 0;
}
#endif
