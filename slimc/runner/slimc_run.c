/* slimc_run: run a slimc artifact (model.so) with only the TVM runtime: no Python, no slimc.
 *
 *   slimc_run model.so OUT_DIR [input0.npy input1.npy ...]
 *   slimc_run model.so --generate MAX_NEW_TOKENS [--ignore-eos] ID [ID ...]
 *
 * Loads model.so into the Relax VM through TVM's C ABI (the packed functions Python's
 * tvm.runtime.vm.VirtualMachine calls: vm_load_executable, vm_initialization), reads the inputs
 * from .npy files (little-endian, C order, in the order of manifest.json's "inputs"), calls
 * "main" and writes the outputs, flattened depth-first, as OUT_DIR/out0.npy, out1.npy, ...
 * With --generate (a `slimc compile --generate` artifact) it prints the greedy new token ids
 * instead (see generate() below). TVM_NUM_THREADS sets the thread-pool size; during each call the
 * calling thread is kept off the cores TVM pinned its pool workers to (pinned_call() below;
 * SLIMC_PIN_CALLER=0 turns it off). On x86-64 the process flushes denormal floats to zero
 * (flush_denormals() below; SLIMC_FLUSH_DENORMALS=0 turns it off). Plain C on purpose: libtvm_ffi throws C++
 * exceptions internally, and a runner with its own C++ runtime (zig's libc++) would intercept
 * their unwinding. Link: -ltvm_runtime -ltvm_ffi.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_setaffinity, CPU_* (Linux); implies the POSIX functions used */
#endif
#include <dlpack/dlpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>
#ifdef __linux__
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h> /* _mm_getcsr / _mm_setcsr */
#endif
#include <dirent.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

/* ---- caller pinning: the C twin of slimc/backends/tvm/affinity.py ----
 * TVM's pool runs task 0 of each parallel loop on the calling thread and pins worker i (i >= 1)
 * to core sorted_order_[i] (cores by cpuinfo_max_freq, fastest first, then by number), leaving
 * the caller free; when the OS moves the caller onto a worker's core both halves of every loop
 * share it for many calls (issue 16). pinned_call() narrows the caller's mask to its cores minus
 * the workers' for one call and restores it after. No-op: SLIMC_PIN_CALLER=0, one thread,
 * TVM_BIND_THREADS other than 1, TVM_EXCLUDE_WORKER0=0, no thread really pinned there (checked
 * after the first call, which starts the pool), or a caller mask narrower than the pool. */
#ifdef __linux__
static int pin_state = -1; /* -1: before the first call, 0: off, 1: on */
static int pin_threads = 1;
static cpu_set_t pin_workers;

/* TVM's MaxConcurrency(): TVM_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs (halved on x86). */
static int tvm_threads(void) {
  const char* v = getenv("TVM_NUM_THREADS");
  if (!v) v = getenv("OMP_NUM_THREADS");
  int n;
  if (v) {
    n = atoi(v);
  } else {
    n = (int)sysconf(_SC_NPROCESSORS_ONLN);
#if defined(__x86_64__)
    n /= 2;
#endif
  }
  return n < 1 ? 1 : n;
}

static int64_t max_freq(int cpu) {
  char path[128];
  snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/cpufreq/cpuinfo_max_freq", cpu);
  FILE* f = fopen(path, "r");
  long long v = 0;
  if (f) {
    if (fscanf(f, "%lld", &v) != 1) v = 0;
    fclose(f);
  }
  return v;
}

/* The cores TVM pins the workers to, and of those the ones a thread of ours really sits on. */
static void pin_setup(void) {
  const char* off = getenv("SLIMC_PIN_CALLER");
  CPU_ZERO(&pin_workers);
  pin_state = 0;
  pin_threads = tvm_threads();
  if (off && (!strcmp(off, "0") || !strcmp(off, "false") || !strcmp(off, "no") ||
              !strcmp(off, "off")))
    return;
  const char* bind = getenv("TVM_BIND_THREADS");
  const char* exclude = getenv("TVM_EXCLUDE_WORKER0");
  if ((bind && atoi(bind) != 1) || (exclude && atoi(exclude) == 0)) return;
  int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (pin_threads <= 1 || ncpu < pin_threads || ncpu > CPU_SETSIZE) return;
  int* order = calloc((size_t)ncpu, sizeof(int));
  int64_t* freq = calloc((size_t)ncpu, sizeof(int64_t));
  for (int i = 0; i < ncpu; ++i) {  /* stable insertion sort: fastest first, ties by number */
    int64_t f = max_freq(i);
    int j = i;
    while (j > 0 && freq[j - 1] < f) {
      freq[j] = freq[j - 1];
      order[j] = order[j - 1];
      --j;
    }
    freq[j] = f;
    order[j] = i;
  }
  cpu_set_t expected, seen;
  CPU_ZERO(&expected);
  CPU_ZERO(&seen);
  for (int i = 1; i < pin_threads; ++i) CPU_SET(order[i], &expected);
  free(order);
  free(freq);
  pid_t self = (pid_t)syscall(SYS_gettid);
  DIR* tasks = opendir("/proc/self/task");
  struct dirent* e;
  while (tasks && (e = readdir(tasks)) != NULL) {
    pid_t tid = (pid_t)atoi(e->d_name);
    cpu_set_t mask;
    if (tid <= 0 || tid == self || sched_getaffinity(tid, sizeof mask, &mask) != 0) continue;
    if (CPU_COUNT(&mask) == 1) CPU_OR(&seen, &seen, &mask);
  }
  if (tasks) closedir(tasks);
  CPU_AND(&pin_workers, &expected, &seen);
  pin_state = CPU_COUNT(&pin_workers) > 0;
}
#endif

#ifdef __linux__
/* SLIMC_PIN_CALLER_TRACE: the caller's mask as the kernel reports it inside a pinned call. */
static void pin_trace(const char* what) {
  cpu_set_t now;
  if (sched_getaffinity(0, sizeof now, &now) != 0) return;
  fprintf(stderr, "slimc_run: pinned %s: caller on", what);
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &now)) fprintf(stderr, " %d", c);
  fprintf(stderr, ", workers on");
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &pin_workers)) fprintf(stderr, " %d", c);
  fprintf(stderr, "\n");
}
#endif

/* ---- denormals: the C twin of slimc/backends/tvm/denormals.py ----
 * An Intel core takes a ~100x microcode assist on every instruction reading or producing a
 * denormal float; activations decaying through many layers hit it (EfficientNet-B0, random
 * weights: 3067 ms a call vs 123 ms flushed). Call before the first model call: TVM's pool
 * workers start inside it and inherit the calling thread's MXCSR (FTZ + DAZ). */
static void flush_denormals(void) {
#if defined(__x86_64__) || defined(__i386__)
  const char* env = getenv("SLIMC_FLUSH_DENORMALS");
  if (env && (strcmp(env, "0") == 0 || strcmp(env, "false") == 0 || strcmp(env, "no") == 0 ||
              strcmp(env, "off") == 0))
    return;
  _mm_setcsr(_mm_getcsr() | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
#endif
}

/* call() with the calling thread kept off the pool workers' cores (see above). */
static TVMFFIAny pinned_call(TVMFFIObjectHandle fn, TVMFFIAny* args, int n, const char* what) {
#ifdef __linux__
  cpu_set_t mask, target, both;
  if (pin_state == 0 || sched_getaffinity(0, sizeof mask, &mask) != 0) return call(fn, args, n, what);
  if (pin_state < 0) {  /* the pool starts in this call (and widens its caller): undone after */
    TVMFFIAny out = call(fn, args, n, what);
    sched_setaffinity(0, sizeof mask, &mask);
    pin_setup();
    return out;
  }
  CPU_AND(&both, &mask, &pin_workers);
  CPU_XOR(&target, &mask, &both); /* mask minus the workers' cores */
  if (CPU_COUNT(&mask) < pin_threads || !CPU_EQUAL(&both, &pin_workers) ||
      CPU_COUNT(&target) == 0 || CPU_EQUAL(&target, &mask))
    return call(fn, args, n, what);
  sched_setaffinity(0, sizeof target, &target);
  if (getenv("SLIMC_PIN_CALLER_TRACE")) pin_trace(what);
  TVMFFIAny out = call(fn, args, n, what);
  sched_setaffinity(0, sizeof mask, &mask);
  return out;
#else
  return call(fn, args, n, what);
#endif
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

/* Hand a 64-byte aligned CPU buffer (and its shape array) to TVM; free_managed releases both. */
static TVMFFIObjectHandle wrap_cpu_buffer(void* data, int ndim, int64_t* shape, DLDataType dtype,
                                          const char* what) {
  DLManagedTensor* managed = calloc(1, sizeof(DLManagedTensor));
  managed->dl_tensor.data = data;
  managed->dl_tensor.device.device_type = kDLCPU;
  managed->dl_tensor.ndim = ndim;
  managed->dl_tensor.dtype = dtype;
  managed->dl_tensor.shape = shape;
  managed->deleter = free_managed;
  TVMFFIObjectHandle tensor = NULL;
  check(TVMFFITensorFromDLPack(managed, 64, 1, &tensor), what);
  return tensor;
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
  return wrap_cpu_buffer(data, ndim, shape, dtype, path);
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


/* ---- --generate: greedy prefill + decode over a KV cache this program owns ----
 * The same loop as slimc/generation/loop.py: the prompt goes through "prefill" in chunks of
 * prefill_length tokens (right-padded with 0, `last` = index of the chunk's last real token),
 * then each new token through "decode"; both return (logits, K/V rows per layer) and the
 * runner writes the first `valid` rows into cache[0, h, pos:pos+valid] for every head. Stops at
 * max_new tokens or a stop id (manifest "generation.stop_ids"; --ignore-eos disables it). */
typedef struct {
  int64_t layers, kv_heads, head_dim, max_len, chunk, vocab;
  int64_t stop[64];
  int n_stop;
} GenSpec;

/* The integer after "key": in the manifest's "generation" object (json.dumps layout). */
static int64_t gen_int(const char* gen, const char* key, const char* path) {
  char quoted[64];
  snprintf(quoted, sizeof quoted, "\"%s\":", key);
  const char* at = strstr(gen, quoted);
  if (!at) fail("manifest.json has no generation key", key);
  (void)path;
  return strtoll(at + strlen(quoted), NULL, 10);
}

static GenSpec read_gen_spec(const char* model_path) {
  char path[4096];
  const char* slash = strrchr(model_path, '/');
  if (slash) snprintf(path, sizeof path, "%.*s/manifest.json", (int)(slash - model_path), model_path);
  else snprintf(path, sizeof path, "manifest.json");
  FILE* f = fopen(path, "rb");
  if (!f) fail("--generate reads manifest.json next to model.so; cannot open", path);
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  char* text = calloc((size_t)size + 1, 1);
  if (fread(text, 1, (size_t)size, f) != (size_t)size) fail("cannot read", path);
  fclose(f);
  const char* gen = strstr(text, "\"generation\": {");
  if (!gen) fail("not a generation artifact (compile with --generate)", path);
  GenSpec s;
  memset(&s, 0, sizeof s);
  s.layers = gen_int(gen, "layers", path);
  s.kv_heads = gen_int(gen, "kv_heads", path);
  s.head_dim = gen_int(gen, "head_dim", path);
  s.max_len = gen_int(gen, "max_length", path);
  s.chunk = gen_int(gen, "prefill_length", path);
  s.vocab = gen_int(gen, "vocab", path);
  const char* stop = strstr(gen, "\"stop_ids\": [");
  if (stop) {
    const char* p = stop + strlen("\"stop_ids\": [");
    while (*p && *p != ']' && s.n_stop < 64) {
      while (*p == ' ' || *p == ',' || *p == '\n') ++p;
      if (*p == ']') break;
      s.stop[s.n_stop++] = strtoll(p, (char**)&p, 10);
    }
  }
  free(text);
  return s;
}

/* A new zeroed, 64-byte aligned CPU tensor; *data receives its buffer. */
static TVMFFIObjectHandle new_tensor(DLDataType dtype, int ndim, const int64_t* dims, void** data) {
  int64_t* shape = calloc((size_t)ndim, sizeof(int64_t));
  size_t bytes = dtype.bits / 8;
  for (int i = 0; i < ndim; ++i) {
    shape[i] = dims[i];
    bytes *= (size_t)dims[i];
  }
  void* buf = NULL;
  if (posix_memalign(&buf, 64, bytes ? bytes : 64) != 0) fail("out of memory", NULL);
  memset(buf, 0, bytes);
  TVMFFIObjectHandle tensor = wrap_cpu_buffer(buf, ndim, shape, dtype, "allocating a tensor");
  if (data) *data = buf;
  return tensor;
}

static TVMFFIObjectHandle scalar_i64(int64_t v) {
  static const DLDataType i64 = {kDLInt, 64, 1};
  int64_t one = 1;
  void* data = NULL;
  TVMFFIObjectHandle t = new_tensor(i64, 1, &one, &data);
  *(int64_t*)data = v;
  return t;
}

static TVMFFIAny array_item(TVMFFIAny array, int64_t i) {
  TVMFFIAny args[2] = {array, int_arg(i)};
  return call(global("ffi.ArrayGetItem"), args, 2, "ffi.ArrayGetItem");
}

/* Run prefill/decode; copy the new K/V rows into the caches; argmax of the logits. */
static int64_t step(const GenSpec* s, TVMFFIObjectHandle fn, TVMFFIObjectHandle ids, int64_t pos,
                    int64_t last, int valid, TVMFFIObjectHandle* caches, float** cache_data) {
  int n_caches = (int)(2 * s->layers);
  TVMFFIAny* args = calloc((size_t)(3 + n_caches), sizeof(TVMFFIAny));
  int n = 0;
  TVMFFIObjectHandle pos_t = scalar_i64(pos), last_t = last >= 0 ? scalar_i64(last) : NULL;
  args[n++] = obj_arg(ids, kTVMFFITensor);
  args[n++] = obj_arg(pos_t, kTVMFFITensor);
  if (last_t) args[n++] = obj_arg(last_t, kTVMFFITensor);
  for (int i = 0; i < n_caches; ++i) args[n++] = obj_arg(caches[i], kTVMFFITensor);
  TVMFFIAny out = pinned_call(fn, args, n, last_t ? "prefill" : "decode");
  free(args);
  if (out.type_index != kTVMFFIArray) fail("prefill/decode did not return a tuple", NULL);
  int64_t best = 0;
  for (int i = 0; i <= n_caches; ++i) {
    TVMFFIAny item = array_item(out, i);
    DLManagedTensor* managed = NULL;
    check(TVMFFITensorToDLPack(item.v_obj, &managed), "reading an output");
    const DLTensor* t = &managed->dl_tensor;
    const float* data = (const float*)((const char*)t->data + t->byte_offset);
    if (i == 0) {  /* logits: greedy = first index of the maximum (numpy argmax) */
      int64_t count = 1;
      for (int d = 0; d < t->ndim; ++d) count *= t->shape[d];
      for (int64_t k = 1; k < count; ++k)
        if (data[k] > data[best]) best = k;
    } else {  /* rows [1, kv_heads, steps, head_dim] -> cache[0, h, pos:pos+valid] */
      int64_t steps = t->shape[2];
      for (int64_t h = 0; h < s->kv_heads; ++h)
        memcpy(cache_data[i - 1] + (h * s->max_len + pos) * s->head_dim,
               data + h * steps * s->head_dim, (size_t)(valid * s->head_dim) * sizeof(float));
    }
    if (managed->deleter) managed->deleter(managed);
    TVMFFIObjectDecRef(item.v_obj);
  }
  TVMFFIObjectDecRef(out.v_obj);
  TVMFFIObjectDecRef(pos_t);
  if (last_t) TVMFFIObjectDecRef(last_t);
  return best;
}

static int generate(TVMFFIObjectHandle vm, const char* model_path, int argc, char** argv) {
  /* argv: MAX_NEW [--ignore-eos] ID [ID ...] */
  GenSpec s = read_gen_spec(model_path);
  int64_t max_new = strtoll(argv[0], NULL, 10);
  int first = 1, use_stop = 1;
  if (first < argc && strcmp(argv[first], "--ignore-eos") == 0) {
    use_stop = 0;
    ++first;
  }
  int64_t n_prompt = argc - first;
  if (max_new < 1 || n_prompt < 1) fail("--generate needs MAX_NEW_TOKENS >= 1 and token ids", NULL);
  if (n_prompt + max_new > s.max_len) fail("prompt + new tokens exceed the compiled max_length", NULL);
  int64_t* prompt = calloc((size_t)n_prompt, sizeof(int64_t));
  for (int64_t i = 0; i < n_prompt; ++i) {
    prompt[i] = strtoll(argv[first + i], NULL, 10);
    if (prompt[i] < 0 || prompt[i] >= s.vocab) fail("token id outside the vocabulary", argv[first + i]);
  }
  static const DLDataType f32 = {kDLFloat, 32, 1}, i64 = {kDLInt, 64, 1};
  int n_caches = (int)(2 * s.layers);
  TVMFFIObjectHandle* caches = calloc((size_t)n_caches, sizeof(TVMFFIObjectHandle));
  float** cache_data = calloc((size_t)n_caches, sizeof(float*));
  int64_t cache_shape[4] = {1, s.kv_heads, s.max_len, s.head_dim};
  for (int i = 0; i < n_caches; ++i)
    caches[i] = new_tensor(f32, 4, cache_shape, (void**)&cache_data[i]);
  TVMFFIObjectHandle prefill = module_function(vm, "prefill"), decode = module_function(vm, "decode");
  int64_t token = 0;
  for (int64_t start = 0; start < n_prompt; start += s.chunk) {
    int valid = (int)(n_prompt - start < s.chunk ? n_prompt - start : s.chunk);
    int64_t dims[2] = {1, s.chunk};
    void* data = NULL;
    TVMFFIObjectHandle ids = new_tensor(i64, 2, dims, &data);
    memcpy(data, prompt + start, (size_t)valid * sizeof(int64_t));
    token = step(&s, prefill, ids, start, valid - 1, valid, caches, cache_data);
    TVMFFIObjectDecRef(ids);
  }
  int64_t pos = n_prompt;
  for (int64_t made = 0; made < max_new; ++made) {
    printf(made ? " %lld" : "%lld", (long long)token);
    fflush(stdout);
    int stop = 0;
    for (int k = 0; use_stop && k < s.n_stop; ++k) stop |= token == s.stop[k];
    if (stop || made + 1 == max_new) break;
    int64_t dims[2] = {1, 1};
    void* data = NULL;
    TVMFFIObjectHandle ids = new_tensor(i64, 2, dims, &data);
    *(int64_t*)data = token;
    token = step(&s, decode, ids, pos, -1, 1, caches, cache_data);
    TVMFFIObjectDecRef(ids);
    ++pos;
  }
  printf("\n");
  return 0;
}

#ifndef SLIMC_RUN_NO_MAIN /* examples/cmake/app includes this file for its helpers */
int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: slimc_run model.so OUT_DIR [input0.npy input1.npy ...]\n"
                    "       slimc_run model.so --generate MAX_NEW_TOKENS [--ignore-eos] ID ...\n");
    return 2;
  }
  flush_denormals();
  TVMFFIAny path = str_arg(argv[1]);
  TVMFFIAny lib = call(global("ffi.ModuleLoadFromFile"), &path, 1, argv[1]);
  TVMFFIAny vm = call(module_function(lib.v_obj, "vm_load_executable"), NULL, 0,
                      "vm_load_executable");
  TVMFFIAny init[3] = {int_arg(kDLCPU), int_arg(0), int_arg(2 /* pooled allocator */)};
  call(module_function(vm.v_obj, "vm_initialization"), init, 3, "vm_initialization");
  if (strcmp(argv[2], "--generate") == 0) {
    if (argc < 5) fail("usage: slimc_run model.so --generate MAX_NEW_TOKENS [--ignore-eos] ID ...", NULL);
    return generate(vm.v_obj, argv[1], argc - 3, argv + 3);
  }
  int n_inputs = argc - 3;
  TVMFFIAny* inputs = calloc((size_t)(n_inputs ? n_inputs : 1), sizeof(TVMFFIAny));
  for (int i = 0; i < n_inputs; ++i) inputs[i] = obj_arg(read_npy(argv[3 + i]), kTVMFFITensor);
  TVMFFIAny result = pinned_call(module_function(vm.v_obj, "main"), inputs, n_inputs, "main");
  int written = flatten(result, argv[2], 0);
  fprintf(stderr, "slimc_run: wrote %d output(s) to %s\n", written, argv[2]);
  return 0;
}
#endif
