// The C interface between a compiled kernel library and the emulator runtime.
//
// A kernel library (one per distinct generated source) exports `emu_entry`,
// which runs the kernel body for one emulated Metal thread.  The runtime
// library (compiled once, see metal_emu_runtime.h) owns the OS threads, the
// threadgroup barriers, the SIMD collectives and threadgroup memory; the
// kernel side reaches it only through the functions declared here.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One argument buffer of the kernel, in MLX's [[buffer(i)]] order.
typedef struct emu_buffer {
  char* data;          // element 0 of the array as the kernel sees it
  const char* lo;      // lowest addressable byte (data unless strides < 0)
  const char* hi;      // one past the highest addressable byte
  const char* name;    // e.g. "input 'x'" (used in error messages)
  const char* type;    // Metal element type name, e.g. "float16_t"
  uint32_t elem_size;  // bytes per element
  int32_t is_output;   // outputs live in memory shared with the parent
} emu_buffer;

// The Metal attribute values of one thread ([[thread_position_in_grid]], ...).
typedef struct emu_attrs {
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threads_per_threadgroup[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t dispatch_threads_per_threadgroup[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t thread_index_in_quadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
} emu_attrs;

typedef void (*emu_entry_fn)(const emu_buffer* bufs, const emu_attrs* attrs);

// Runs once per SIMD collective, by the last lane to arrive, while every
// other lane of the simdgroup waits: `slots` holds each lane's payload
// (`payload_size` bytes per lane, `n_lanes` lanes), `results` receives each
// lane's result (`result_size` bytes per lane).
typedef void (*emu_complete_fn)(const char* slots, size_t payload_size,
                                unsigned n_lanes, char* results,
                                size_t result_size);

// Largest payload / result of one lane in one SIMD collective.
#define EMU_MAX_PAYLOAD 1024
// Metal's threadgroup memory limit on Apple GPUs.
#define EMU_TG_MEMORY_LIMIT 32768

void emu_threadgroup_barrier(int line);
void emu_simd_collective(const char* op, int line, const void* payload,
                         size_t payload_size, void* result, size_t result_size,
                         emu_complete_fn complete);
// Records a simdgroup operation that runs without blocking (each lane does
// it on its own copy).  Lanes of a simdgroup must record the same sequence;
// the runtime compares them at the next barrier, collective or return.
void emu_note_op(const char* op, int line, uint64_t args);
void* emu_tg_alloc(int site, size_t bytes, size_t align, const char* name);
// Finds the buffer or threadgroup allocation containing p; returns its id
// (or -1 when p lies in none of them, e.g. a thread-local array).
int emu_find_region(const void* p, const char** lo, const char** hi);
// The attribute values of the calling emulated thread.
const emu_attrs* emu_current_attrs(void);
__attribute__((noreturn)) void emu_fail_oob(int region, const void* p,
                                            size_t access_size, int line);
__attribute__((noreturn)) void emu_fail_misaligned(int region, const void* p,
                                                   size_t access_size, size_t align);
__attribute__((noreturn)) void emu_fail(const char* msg);

// Host side: run a whole grid.  Returns 0 on success; otherwise writes a
// message to err.  fork_mode=1 runs the grid in a child process so a crash,
// an infinite loop or a detected error cannot take the caller down.  in_order=1
// runs the threadgroups first-numbered first (default: last-numbered first).
int emu_launch(emu_entry_fn entry, emu_buffer* bufs, int n_bufs,
               const uint32_t grid[3], const uint32_t threadgroup[3],
               double timeout_s, int fork_mode, int in_order, const char* kernel_name,
               char* err, int err_len);

#ifdef __cplusplus
}
#endif
