"""C source of the kernel driver that runs a TVM library's compiled kernels without the TVM runtime.

PyPI has no armv7 TVM runtime, so an armv7 library cannot be loaded in a Relax VM under
emulation. Its kernels are plain C-ABI functions, though (``__tvm_ffi_<name>``, TVM FFI
"safe call" signature), which need only a handful of runtime hooks. This driver dlopens the
shipped ``model.so``, fills those hooks (workspace allocation, serial parallel-launch, error
report) and interprets a small command stream written by :mod:`graphgen.emulate.kernels`:

    'A' u32 region, u64 size                      allocate a zeroed, 64-byte aligned region
    'W' u32 region, u64 offset, u64 n, n bytes     write bytes into a region
    'C' u16 len, name, u16 nargs, args             call __tvm_ffi_<name>; each arg is
        u8 0: tensor  u32 region, u64 offset, u8 ndim, i64 shape[ndim], u8 code, u8 bits, u16 lanes
        u8 1: int     i64
        u8 2: float   f64
    'D' u32 region, u64 offset, u64 n              append n bytes of a region to the output file
    'E'                                            end

It is compiled once per emulation environment with the ``ziglang`` wheel's C compiler
(``zig cc -target arm-linux-gnueabihf.2.36``) and runs under qemu-arm against Debian's
armhf glibc. Kept as a string so that every kind of install (wheel, sdist, editable) has it.
"""

SOURCE = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { int32_t type_index; uint32_t zero_padding; union { int64_t v_int64; double v_float64; void* v_ptr; } u; } Any;
typedef struct { int32_t device_type; int32_t device_id; } Device;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DType;
typedef struct { void* data; Device device; int32_t ndim; DType dtype; int64_t* shape; int64_t* strides; uint64_t byte_offset; } DLT;
typedef int (*SafeCall)(void*, const Any*, int32_t, Any*);
typedef struct { void* sync_handle; int32_t num_task; } ParallelEnv;
typedef int (*ParallelLambda)(int, ParallelEnv*, void*);

static FILE* in;
static char last_error[4096];

static void die(const char* msg, const char* detail) {
  fprintf(stderr, "graphgen-kernel-driver: %s%s%s\n", msg, detail ? ": " : "", detail ? detail : "");
  exit(3);
}
static void rd(void* p, size_t n) { if (n && fread(p, 1, n, in) != n) die("truncated command stream", NULL); }
static uint8_t r8(void) { uint8_t v; rd(&v, 1); return v; }
static uint16_t r16(void) { uint16_t v; rd(&v, 2); return v; }
static uint32_t r32(void) { uint32_t v; rd(&v, 4); return v; }
static uint64_t r64(void) { uint64_t v; rd(&v, 8); return v; }

/* runtime hooks the generated code calls through __TVM* function pointers */
static void* alloc_workspace(int dev_type, int dev_id, uint64_t nbytes, int code, int bits) {
  void* p = NULL;
  (void)dev_type; (void)dev_id; (void)code; (void)bits;
  if (posix_memalign(&p, 64, nbytes ? (size_t)nbytes : 64) != 0) return NULL;
  return p;
}
static int free_workspace(int dev_type, int dev_id, void* p) { (void)dev_type; (void)dev_id; free(p); return 0; }
static int parallel_launch(ParallelLambda f, void* cdata, int num_task) {
  /* serial: one task does all the work, as TVM's runtime does with one thread */
  ParallelEnv env = {NULL, 1};
  (void)num_task;
  return f(0, &env, cdata);
}
static int parallel_barrier(int task_id, ParallelEnv* env) { (void)task_id; (void)env; return 0; }
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* msg) {
  snprintf(last_error, sizeof last_error, "%s: %s", kind ? kind : "Error", msg ? msg : "");
}
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  size_t k = (size_t)snprintf(last_error, sizeof last_error, "%s: ", kind ? kind : "Error");
  for (int32_t i = 0; i < n && k < sizeof last_error; ++i)
    k += (size_t)snprintf(last_error + k, sizeof last_error - k, "%s", parts[i] ? parts[i] : "");
}
static void set_hook(void* lib, const char* name, void* fn) {
  void** slot = (void**)dlsym(lib, name);
  if (slot) *slot = fn;
}

int main(int argc, char** argv) {
  if (argc != 4) { fprintf(stderr, "usage: %s model.so commands.bin out.bin\n", argv[0]); return 2; }
  /* what the TVM runtime would have brought into the process: libm (expf, tanhf, ...) and libgcc_s
     (the __aeabi_* helpers 32-bit ARM code may call) */
  dlopen("libm.so.6", RTLD_NOW | RTLD_GLOBAL);
  dlopen("libgcc_s.so.1", RTLD_NOW | RTLD_GLOBAL);
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (!lib) die("cannot load the library", dlerror());
  set_hook(lib, "__TVMBackendAllocWorkspace", (void*)alloc_workspace);
  set_hook(lib, "__TVMBackendFreeWorkspace", (void*)free_workspace);
  set_hook(lib, "__TVMBackendParallelLaunch", (void*)parallel_launch);
  set_hook(lib, "__TVMBackendParallelBarrier", (void*)parallel_barrier);
  set_hook(lib, "__TVMFFIErrorSetRaisedFromCStr", (void*)TVMFFIErrorSetRaisedFromCStr);
  in = fopen(argv[2], "rb");
  if (!in) die("cannot open the command stream", argv[2]);
  FILE* out = fopen(argv[3], "wb");
  if (!out) die("cannot open the output file", argv[3]);
  char magic[4];
  rd(magic, 4);
  if (memcmp(magic, "GGK1", 4) != 0) die("bad command stream", "magic");
  uint32_t nregions = r32();
  unsigned char** regions = calloc(nregions ? nregions : 1, sizeof(void*));
  uint64_t* sizes = calloc(nregions ? nregions : 1, sizeof(uint64_t));
  long ncalls = 0;
  for (;;) {
    int op = r8();
    if (op == 'E') break;
    if (op == 'A') {
      uint32_t r = r32(); uint64_t n = r64();
      if (r >= nregions) die("region out of range", NULL);
      void* p = NULL;
      if (posix_memalign(&p, 64, n ? (size_t)n : 64) != 0) die("out of memory", NULL);
      memset(p, 0, n ? (size_t)n : 64);
      regions[r] = p; sizes[r] = n;
    } else if (op == 'W' || op == 'D') {
      uint32_t r = r32(); uint64_t off = r64(), n = r64();
      if (r >= nregions || !regions[r] || off + n > sizes[r]) die("byte range out of region", NULL);
      if (op == 'W') rd(regions[r] + off, (size_t)n);
      else if (fwrite(regions[r] + off, 1, (size_t)n, out) != n) die("cannot write output", NULL);
    } else if (op == 'C') {
      char name[512] = "__tvm_ffi_";
      uint16_t len = r16();
      if (len + 11 > sizeof name) die("kernel name too long", NULL);
      rd(name + 10, len); name[10 + len] = 0;
      uint16_t nargs = r16();
      Any* args = calloc(nargs ? nargs : 1, sizeof(Any));
      DLT* ts = calloc(nargs ? nargs : 1, sizeof(DLT));
      int64_t** shapes = calloc(nargs ? nargs : 1, sizeof(int64_t*));
      for (uint16_t i = 0; i < nargs; ++i) {
        uint8_t kind = r8();
        if (kind == 0) {
          uint32_t r = r32(); uint64_t off = r64(); uint8_t ndim = r8();
          if (r >= nregions || !regions[r] || off > sizes[r]) die("tensor outside its region", name);
          shapes[i] = calloc(ndim ? ndim : 1, sizeof(int64_t));
          for (uint8_t d = 0; d < ndim; ++d) shapes[i][d] = (int64_t)r64();
          ts[i].data = regions[r] + off;
          ts[i].device.device_type = 1; /* kDLCPU */
          ts[i].ndim = ndim;
          ts[i].dtype.code = r8(); ts[i].dtype.bits = r8(); ts[i].dtype.lanes = r16();
          ts[i].shape = shapes[i];
          args[i].type_index = 7; /* kTVMFFIDLTensorPtr */
          args[i].u.v_ptr = &ts[i];
        } else if (kind == 1) {
          args[i].type_index = 1; /* kTVMFFIInt */
          args[i].u.v_int64 = (int64_t)r64();
        } else if (kind == 2) {
          uint64_t bits = r64();
          args[i].type_index = 3; /* kTVMFFIFloat */
          memcpy(&args[i].u.v_float64, &bits, 8);
        } else {
          die("unknown argument kind", name);
        }
      }
      SafeCall fn = (SafeCall)dlsym(lib, name);
      if (!fn) die("kernel not in the library", name);
      Any ret; memset(&ret, 0, sizeof ret);
      last_error[0] = 0;
      int rc = fn(NULL, args, nargs, &ret);
      if (rc != 0) {
        fprintf(stderr, "graphgen-kernel-driver: %s returned %d: %s\n", name + 10, rc, last_error);
        return 4;
      }
      for (uint16_t i = 0; i < nargs; ++i) free(shapes[i]);
      free(shapes); free(ts); free(args);
      ++ncalls;
    } else {
      die("unknown command", NULL);
    }
  }
  fclose(out);
  printf("graphgen-kernel-driver: %ld kernel calls ok\n", ncalls);
  return 0;
}
"""
