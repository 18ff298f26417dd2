// metal_emu_runtime.h: the emulator's runtime (threads, barriers, SIMD
// collectives, threadgroup memory, error reports).  Compiled once into its
// own shared library (build.py); kernel libraries call into it through the
// C interface of metal_emu_abi.h.
//
// Model:
// - One OS thread per Metal thread of a threadgroup (a pool of as many
//   threads as the dispatch threadgroup size, reused for every threadgroup);
//   threadgroups run one after another, the last-numbered first.
// - One mutex per launch guards all synchronisation state, which makes
//   deadlock detection exact: a thread that blocks while every other live
//   thread of its threadgroup is blocked too is a deadlock, reported at once
//   with the line each thread waits at.  Threads that return while others
//   wait for them at a barrier or SIMD collective, and lanes of a simdgroup
//   that reach different collectives, are reported the same way.
// - fork mode: the grid runs in a child process.  Outputs live in shared
//   memory and are copied back on success; a crash or an infinite loop only
//   kills the child, and the parent reports it (timeouts included).
#pragma once

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <ucontext.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#include "metal_emu_abi.h"

namespace emu_rt {

enum LaneState { RUNNING = 0, WAIT_BARRIER = 1, WAIT_SIMD = 2, EXITED = 3 };

struct Lane {
  int state;
  const char* op;
  int line;
  uint64_t ops_hash;  // the non-blocking simdgroup operations done so far
  const char* last_op;
  int last_line;
  emu_attrs attrs;
};

struct Simdgroup {
  pthread_cond_t cv;
  unsigned n_lanes, arrived, exited;
  uint32_t gen;
  const char* op;
  int line;
  uint64_t ops_hash;  // of the first lane to arrive / to return
  int exit_seen;
  size_t psize, rsize;
  char* slots;    // 32 * EMU_MAX_PAYLOAD
  char* results;  // 32 * EMU_MAX_PAYLOAD
};

struct Alloc {
  int site;
  size_t off, size;
  const char* name;
};

enum { MAX_ALLOCS = 256, STACK_SIZE = 1 << 20 };

struct State {
  emu_entry_fn entry;
  const emu_buffer* bufs;
  int n_bufs;
  const char* kname;
  uint32_t grid[3], tg[3], ntg[3];
  unsigned nominal;

  // The threadgroup being run.
  pthread_mutex_t m;
  pthread_cond_t bar_cv;
  unsigned n_threads, live, blocked, exited, bar_arrived;
  uint32_t bar_gen;
  int bar_line;
  uint32_t tgpos[3], tgdim[3];
  Simdgroup sg[32];
  unsigned n_sg;
  char* arena;
  size_t arena_used;
  Alloc allocs[MAX_ALLOCS];
  int n_allocs;
  Lane* lanes;

  // The thread pool.
  pthread_mutex_t pm;
  pthread_cond_t pcv, dcv;
  unsigned long long pgen;
  unsigned cur_n, done;
  int quit;

  // Errors.
  char* err;
  int err_len;
  int fork_mode;
  int in_order;  // threadgroups first-numbered first (a kernel that relies on it: KernelSpec.in_order)
  int failed;
};

static State S;
static thread_local int t_tid = -1;
static emu_attrs zero_attrs;

// " [at lib.so+0x1f3]": the code address of a failure inside the kernel
// library; the Python side maps it to a line of the Metal source with
// addr2line (kernels are built with line tables, -g1).  The library's path
// and base are looked up before the fork (dladdr takes the loader's lock,
// which a forked child of a multi-threaded process must not touch).
static char so_path[4096];
static const char* so_base;

static void code_address(const void* pc, char* out, size_t n) {
  out[0] = 0;
  if (pc && so_base && (const char*)pc >= so_base)
    snprintf(out, n, " [at %s+0x%lx]", so_path,
             (unsigned long)((const char*)pc - so_base));
}

static void context(char* out, size_t n) {
  if (t_tid < 0 || S.lanes == nullptr) {
    snprintf(out, n, "kernel '%s'", S.kname ? S.kname : "?");
    return;
  }
  const emu_attrs& a = S.lanes[t_tid].attrs;
  snprintf(out, n,
           "kernel '%s', thread_position_in_grid (%u, %u, %u) "
           "[threadgroup_position_in_grid (%u, %u, %u), "
           "thread_index_in_threadgroup %u, simdgroup %u lane %u]",
           S.kname, a.thread_position_in_grid[0], a.thread_position_in_grid[1],
           a.thread_position_in_grid[2], a.threadgroup_position_in_grid[0],
           a.threadgroup_position_in_grid[1], a.threadgroup_position_in_grid[2],
           a.thread_index_in_threadgroup, a.simdgroup_index_in_threadgroup,
           a.thread_index_in_simdgroup);
}

[[noreturn]] static void fail_msg(const char* msg) {
  if (__atomic_exchange_n(&S.failed, 1, __ATOMIC_SEQ_CST)) {
    // Another thread is already reporting; it ends the process.
    for (;;) pause();
  }
  char ctx[512];
  context(ctx, sizeof ctx);
  if (S.err && S.err_len > 0) snprintf(S.err, S.err_len, "%s: %s", ctx, msg);
  if (S.fork_mode) _exit(3);
  fprintf(stderr, "[metal emulation] %s: %s\n", ctx, msg);
  abort();
}

[[noreturn]] static void failf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] static void failf(const char* fmt, ...) {
  char msg[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fail_msg(msg);
}

static const char* state_name(const Lane& l) {
  switch (l.state) {
    case RUNNING: return "running";
    case EXITED: return "returned";
    default: return "waiting";
  }
}

// Describes where every thread of the threadgroup is (S.m held).
static void describe_threads(char* out, size_t n) {
  size_t used = 0;
  out[0] = 0;
  unsigned i = 0;
  while (i < S.n_threads && used + 200 < n) {
    const Lane& a = S.lanes[i];
    unsigned j = i + 1;
    while (j < S.n_threads && S.lanes[j].state == a.state && S.lanes[j].op == a.op &&
           S.lanes[j].line == a.line)
      ++j;
    char who[96];
    if (i / 32 == (j - 1) / 32)
      snprintf(who, sizeof who, "threads %u-%u (simdgroup %u, lanes %u-%u)", i, j - 1, i / 32,
               i % 32, (j - 1) % 32);
    else
      snprintf(who, sizeof who, "threads %u-%u (simdgroups %u-%u)", i, j - 1, i / 32,
               (j - 1) / 32);
    int k;
    if (a.state == WAIT_BARRIER || a.state == WAIT_SIMD)
      k = snprintf(out + used, n - used, "\n  %s: %s at %s (line %d)", who, state_name(a),
                   a.op, a.line);
    else
      k = snprintf(out + used, n - used, "\n  %s: %s", who, state_name(a));
    if (k < 0) break;
    used += (size_t)k;
    i = j;
  }
}

[[noreturn]] static void fail_deadlock(const char* why) {
  char where[2800];
  describe_threads(where, sizeof where);
  failf("%s (threadgroup of %u threads):%s", why, S.n_threads, where);
}

static void check_deadlock() {
  if (S.live > 0 && S.blocked == S.live)
    fail_deadlock(
        "deadlock: every live thread of the threadgroup waits and none can proceed "
        "(a barrier or SIMD collective not reached by all threads)");
}

// Lanes of one simdgroup must have done the same non-blocking simdgroup
// operations (see emu_note_op); S.m held.
static void check_ops(const Lane& me, uint64_t reference, const char* where) {
  if (me.ops_hash != reference)
    failf("simdgroup divergence: the lanes of this simdgroup did not execute the same "
          "simdgroup_matrix operations (or passed different arguments to them) before %s "
          "(this lane's last one: %s, line %d)",
          where, me.last_op ? me.last_op : "none", me.last_line);
}

static void thread_exit(int tid) {
  pthread_mutex_lock(&S.m);
  Lane& me = S.lanes[tid];
  me.state = EXITED;
  me.op = nullptr;
  me.line = 0;
  S.live--;
  S.exited++;
  Simdgroup& g = S.sg[tid / 32];
  g.exited++;
  if (!g.exit_seen) {
    g.exit_seen = 1;
    g.ops_hash = me.ops_hash;
  } else {
    check_ops(me, g.ops_hash, "returning");
  }
  if (g.arrived > 0)
    fail_deadlock(
        "a lane returned while other lanes of its simdgroup wait at a SIMD collective: "
        "every lane must reach each simd_* call (guard the work instead of returning early)");
  if (S.bar_arrived > 0)
    fail_deadlock(
        "a thread returned while other threads wait at threadgroup_barrier: every thread "
        "of the threadgroup must reach each barrier");
  check_deadlock();
  pthread_mutex_unlock(&S.m);
}

// Waiting for a generation counter to move.  Waiters sleep on the counter
// itself (a futex on Linux), not on the mutex: after a barrier releases N
// threads they do not queue up again for the lock, which is what made the
// first, condition-variable version slow (every collective costs a context
// switch per lane; on two cores that is the emulator's main cost).
static void wait_gen(uint32_t* gen, uint32_t old, pthread_cond_t* cv) {
#ifdef __linux__
  (void)cv;
  while (__atomic_load_n(gen, __ATOMIC_ACQUIRE) == old)
    syscall(SYS_futex, gen, FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0);
#else
  pthread_mutex_lock(&S.m);
  while (__atomic_load_n(gen, __ATOMIC_ACQUIRE) == old) pthread_cond_wait(cv, &S.m);
  pthread_mutex_unlock(&S.m);
#endif
}

// Releases the waiters: called with S.m held, unlocks it.
static void release(uint32_t* gen, pthread_cond_t* cv) {
  __atomic_store_n(gen, *gen + 1, __ATOMIC_RELEASE);
#ifdef __linux__
  (void)cv;
  pthread_mutex_unlock(&S.m);
  syscall(SYS_futex, gen, FUTEX_WAKE_PRIVATE, 0x7fffffff, nullptr, nullptr, 0);
#else
  pthread_cond_broadcast(cv);
  pthread_mutex_unlock(&S.m);
#endif
}

static void set_running(unsigned first, unsigned n) {
  for (unsigned i = first; i < first + n; ++i)
    if (S.lanes[i].state != EXITED) S.lanes[i].state = RUNNING;
}

static void fill_attrs(emu_attrs& a, unsigned tid) {
  memset(&a, 0, sizeof a);
  unsigned dx = S.tgdim[0], dy = S.tgdim[1], dz = S.tgdim[2];
  unsigned n = dx * dy * dz, nominal = S.nominal;
  unsigned lx = tid % dx, ly = (tid / dx) % dy, lz = tid / (dx * dy);
  uint32_t l[3] = {lx, ly, lz};
  for (int d = 0; d < 3; ++d) {
    a.thread_position_in_threadgroup[d] = l[d];
    a.threadgroup_position_in_grid[d] = S.tgpos[d];
    a.thread_position_in_grid[d] = S.tgpos[d] * S.tg[d] + l[d];
    a.threads_per_threadgroup[d] = S.tgdim[d];
    a.threadgroups_per_grid[d] = S.ntg[d];
    a.threads_per_grid[d] = S.grid[d];
    a.dispatch_threads_per_threadgroup[d] = S.tg[d];
  }
  (void)lz;
  a.thread_index_in_threadgroup = tid;
  a.thread_index_in_simdgroup = tid % 32;
  a.simdgroup_index_in_threadgroup = tid / 32;
  a.simdgroups_per_threadgroup = (n + 31) / 32;
  a.dispatch_simdgroups_per_threadgroup = (nominal + 31) / 32;
  a.quadgroup_index_in_threadgroup = tid / 4;
  a.quadgroups_per_threadgroup = (n + 3) / 4;
  a.thread_index_in_quadgroup = tid % 4;
  a.dispatch_quadgroups_per_threadgroup = (nominal + 3) / 4;
}

static void* worker(void* arg) {
  int tid = (int)(intptr_t)arg;
  t_tid = tid;
  unsigned long long seen = 0;
  for (;;) {
    pthread_mutex_lock(&S.pm);
    while (S.pgen == seen && !S.quit) pthread_cond_wait(&S.pcv, &S.pm);
    if (S.quit) {
      pthread_mutex_unlock(&S.pm);
      break;
    }
    seen = S.pgen;
    unsigned n = S.cur_n;
    pthread_mutex_unlock(&S.pm);
    if ((unsigned)tid < n) {
      S.entry(S.bufs, &S.lanes[tid].attrs);
      thread_exit(tid);
      pthread_mutex_lock(&S.pm);
      if (++S.done == n) pthread_cond_signal(&S.dcv);
      pthread_mutex_unlock(&S.pm);
    }
  }
  return nullptr;
}

static void run_threadgroup(const uint32_t pos[3]) {
  unsigned n = 1;
  for (int d = 0; d < 3; ++d) {
    S.tgpos[d] = pos[d];
    uint32_t left = S.grid[d] - pos[d] * S.tg[d];
    S.tgdim[d] = left < S.tg[d] ? left : S.tg[d];  // partial edge threadgroups
    n *= S.tgdim[d];
  }
  S.n_threads = S.live = n;
  S.blocked = S.exited = S.bar_arrived = 0;
  S.bar_line = 0;
  S.n_sg = (n + 31) / 32;
  for (unsigned s = 0; s < S.n_sg; ++s) {
    Simdgroup& g = S.sg[s];
    g.n_lanes = (n - 32 * s) < 32 ? (n - 32 * s) : 32;
    g.arrived = g.exited = 0;
    g.op = nullptr;
    g.line = 0;
    g.exit_seen = 0;
  }
  S.arena_used = 0;
  S.n_allocs = 0;
  for (unsigned t = 0; t < n; ++t) {
    Lane& l = S.lanes[t];
    l.state = RUNNING;
    l.op = nullptr;
    l.line = 0;
    l.ops_hash = 0;
    l.last_op = nullptr;
    l.last_line = 0;
    fill_attrs(l.attrs, t);
  }
  pthread_mutex_lock(&S.pm);
  S.cur_n = n;
  S.done = 0;
  S.pgen++;
  pthread_cond_broadcast(&S.pcv);
  while (S.done < n) pthread_cond_wait(&S.dcv, &S.pm);
  pthread_mutex_unlock(&S.pm);
}

static int run_grid(emu_entry_fn entry, const emu_buffer* bufs, int n_bufs,
                    const uint32_t grid[3], const uint32_t tg[3], const char* kname,
                    char* err, int err_len) {
  S.entry = entry;
  S.bufs = bufs;
  S.n_bufs = n_bufs;
  S.kname = kname;
  S.nominal = 1;
  for (int d = 0; d < 3; ++d) {
    S.grid[d] = grid[d];
    S.tg[d] = tg[d] < grid[d] ? tg[d] : grid[d];  // MLX: min(threadgroup, grid)
    if (S.grid[d] == 0) return 0;                  // nothing to run
    S.ntg[d] = (S.grid[d] + S.tg[d] - 1) / S.tg[d];
    S.nominal *= S.tg[d];
  }
  if (S.nominal > 1024) {
    snprintf(err, err_len, "threadgroup of %u threads: Metal allows at most 1024", S.nominal);
    return 4;
  }
  pthread_mutex_init(&S.m, nullptr);
  pthread_cond_init(&S.bar_cv, nullptr);
  pthread_mutex_init(&S.pm, nullptr);
  pthread_cond_init(&S.pcv, nullptr);
  pthread_cond_init(&S.dcv, nullptr);
  S.lanes = (Lane*)calloc(S.nominal, sizeof(Lane));
  S.arena = (char*)aligned_alloc(64, EMU_TG_MEMORY_LIMIT);
  unsigned nsg = (S.nominal + 31) / 32;
  char* exch = (char*)aligned_alloc(64, (size_t)nsg * 2 * 32 * EMU_MAX_PAYLOAD);
  for (unsigned s = 0; s < nsg; ++s) {
    pthread_cond_init(&S.sg[s].cv, nullptr);
    S.sg[s].gen = 0;
    S.sg[s].slots = exch + (size_t)s * 2 * 32 * EMU_MAX_PAYLOAD;
    S.sg[s].results = S.sg[s].slots + 32 * EMU_MAX_PAYLOAD;
  }
  S.pgen = 0;
  S.quit = 0;
  pthread_t* th = (pthread_t*)calloc(S.nominal, sizeof(pthread_t));
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, STACK_SIZE);
  unsigned started = 0;
  int rc = 0;
  for (; started < S.nominal; ++started) {
    if (pthread_create(&th[started], &attr, worker, (void*)(intptr_t)started) != 0) {
      snprintf(err, err_len, "could not start %u threads (started %u): %s", S.nominal,
               started, strerror(errno));
      rc = 4;
      break;
    }
  }
  pthread_attr_destroy(&attr);
  if (rc == 0) {
    // Last threadgroup first: a GPU runs them in no set order, and a kernel that
    // counts on the lowest-numbered ones having run (or on the highest running
    // last) must fail here rather than pass by the emulator's order.  The
    // exception, asked for per launch (in_order): kernels whose later threadgroups
    // wait for earlier ones, sound on GPUs that start threadgroups in index order;
    // run in that order, one at a time, each such wait is already satisfied.
    uint32_t pos[3];
    const uint32_t n_tg = S.ntg[0] * S.ntg[1] * S.ntg[2];
    for (uint32_t i = 0; i < n_tg; ++i) {
      const uint32_t j = S.in_order ? i : n_tg - 1 - i;
      pos[0] = j % S.ntg[0];
      pos[1] = j / S.ntg[0] % S.ntg[1];
      pos[2] = j / (S.ntg[0] * S.ntg[1]);
      run_threadgroup(pos);
    }
  }
  pthread_mutex_lock(&S.pm);
  S.quit = 1;
  pthread_cond_broadcast(&S.pcv);
  pthread_mutex_unlock(&S.pm);
  for (unsigned i = 0; i < started; ++i) pthread_join(th[i], nullptr);
  free(th);
  free(exch);
  free(S.arena);
  free(S.lanes);
  S.lanes = nullptr;
  return rc;
}

static void on_signal(int sig, siginfo_t*, void* uc) {
  const void* pc = nullptr;
#if defined(__linux__) && defined(__x86_64__)
  pc = (const void*)((ucontext_t*)uc)->uc_mcontext.gregs[REG_RIP];
#elif defined(__linux__) && defined(__aarch64__)
  pc = (const void*)((ucontext_t*)uc)->uc_mcontext.pc;
#else
  (void)uc;
#endif
  const char* what = sig == SIGSEGV ? "SIGSEGV (an access through an unchecked pointer, "
                                      "or a stack overflow)"
                     : sig == SIGFPE ? "SIGFPE (integer division by zero)"
                     : sig == SIGBUS ? "SIGBUS"
                     : sig == SIGILL ? "SIGILL"
                                     : "SIGABRT";
  if (__atomic_exchange_n(&S.failed, 1, __ATOMIC_SEQ_CST)) {
    // Another thread is reporting (several threads often fault at once):
    // let it finish writing before the process ends.
    struct timespec ts = {2, 0};
    nanosleep(&ts, nullptr);
    _exit(5);
  }
  {
    char ctx[512];
    context(ctx, sizeof ctx);
    char where[600];
    code_address(pc, where, sizeof where);
    if (S.err) snprintf(S.err, S.err_len, "%s: crashed with %s%s", ctx, what, where);
  }
  _exit(5);
}

static double now_s() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

}  // namespace emu_rt

using namespace emu_rt;

extern "C" {

const emu_attrs* emu_current_attrs(void) {
  return (t_tid >= 0 && S.lanes) ? &S.lanes[t_tid].attrs : &zero_attrs;
}

void emu_fail(const char* msg) {
  char where[600], full[1200];
  code_address((const char*)__builtin_return_address(0) - 1, where, sizeof where);
  snprintf(full, sizeof full, "%s%s", msg, where);
  fail_msg(full);
}

int emu_find_region(const void* p, const char** lo, const char** hi) {
  const char* c = (const char*)p;
  for (int i = 0; i < S.n_bufs; ++i) {
    if (c >= S.bufs[i].lo && c < S.bufs[i].hi) {
      *lo = S.bufs[i].lo;
      *hi = S.bufs[i].hi;
      return i;
    }
  }
  for (int k = 0; k < S.n_allocs; ++k) {
    const char* a = S.arena + S.allocs[k].off;
    if (c >= a && c < a + S.allocs[k].size) {
      *lo = a;
      *hi = a + S.allocs[k].size;
      return 10000 + k;
    }
  }
  return -1;
}

void emu_fail_oob(int region, const void* p, size_t access_size, int line) {
  (void)line;
  char where[600];
  code_address((const char*)__builtin_return_address(0) - 1, where, sizeof where);
  const char* c = (const char*)p;
  if (region >= 0 && region < S.n_bufs) {
    const emu_buffer& b = S.bufs[region];
    long off = (long)(c - b.data);
    long es = b.elem_size ? (long)b.elem_size : 1;
    long count = (long)(b.hi - b.lo) / es;
    long elem = off >= 0 ? off / es : -((-off + es - 1) / es);
    failf("out-of-bounds access to %s (%s, %ld elements): element %ld "
          "(byte offset %ld, %zu-byte access)%s",
          b.name, b.type, count, elem, off, access_size, where);
  }
  if (region >= 10000 && region - 10000 < S.n_allocs) {
    const Alloc& a = S.allocs[region - 10000];
    long off = (long)(c - (S.arena + a.off));
    failf("out-of-bounds access to threadgroup array '%s' (%zu bytes): byte offset %ld "
          "(%zu-byte access)%s",
          a.name, a.size, off, access_size, where);
  }
  failf("access through a null or uninitialized pointer%s", where);
}

void emu_fail_misaligned(int region, const void* p, size_t access_size, size_t align) {
  char where[600];
  code_address((const char*)__builtin_return_address(0) - 1, where, sizeof where);
  const char* c = (const char*)p;
  if (region >= 0 && region < S.n_bufs) {
    const emu_buffer& b = S.bufs[region];
    failf("misaligned %zu-byte access to %s at byte offset %ld: the type needs %zu-byte "
          "alignment (a GPU faults or reads wrong data)%s",
          access_size, b.name, (long)(c - b.data), align, where);
  }
  if (region >= 10000 && region - 10000 < S.n_allocs) {
    const Alloc& a = S.allocs[region - 10000];
    failf("misaligned %zu-byte access to threadgroup array '%s' at byte offset %ld: the type "
          "needs %zu-byte alignment (a GPU faults or reads wrong data)%s",
          access_size, a.name, (long)(c - (S.arena + a.off)), align, where);
  }
  failf("misaligned %zu-byte access (the type needs %zu-byte alignment)%s", access_size, align, where);
}

void emu_note_op(const char* op, int line, uint64_t args) {
  Lane& me = S.lanes[t_tid];
  uint64_t h = me.ops_hash;
  for (const char* c = op; *c; ++c) h = (h ^ (uint64_t)(unsigned char)*c) * 0x100000001B3ull;
  h = (h ^ (uint64_t)(unsigned)line) * 0x100000001B3ull;
  h = (h ^ args) * 0x100000001B3ull;
  me.ops_hash = h;
  me.last_op = op;
  me.last_line = line;
}

void* emu_tg_alloc(int site, size_t bytes, size_t align, const char* name) {
  pthread_mutex_lock(&S.m);
  for (int k = 0; k < S.n_allocs; ++k) {
    if (S.allocs[k].site == site) {
      void* p = S.arena + S.allocs[k].off;
      pthread_mutex_unlock(&S.m);
      return p;
    }
  }
  size_t off = (S.arena_used + align - 1) / align * align;
  if (off + bytes > EMU_TG_MEMORY_LIMIT || S.n_allocs >= MAX_ALLOCS)
    failf("threadgroup memory: '%s' needs %zu bytes at offset %zu, over Metal's limit of %d bytes",
          name, bytes, off, EMU_TG_MEMORY_LIMIT);
  // Fresh threadgroup memory is undefined on a GPU: fill it with 0xFF bytes
  // (NaN for floats) so that reading before writing shows.
  memset(S.arena + off, 0xFF, bytes);
  S.allocs[S.n_allocs++] = Alloc{site, off, bytes, name};
  S.arena_used = off + bytes;
  pthread_mutex_unlock(&S.m);
  return S.arena + off;
}

void emu_threadgroup_barrier(int line) {
  pthread_mutex_lock(&S.m);
  Lane& me = S.lanes[t_tid];
  if (S.exited > 0)
    fail_deadlock(
        "threadgroup_barrier reached after threads of the threadgroup returned: every "
        "thread must reach each barrier");
  if (S.bar_arrived == 0) {
    S.bar_line = line;
  } else if (S.bar_line != line) {
    me.state = WAIT_BARRIER;
    me.op = "threadgroup_barrier";
    me.line = line;
    fail_deadlock("threads wait at different threadgroup_barrier calls");
  }
  if (++S.bar_arrived == S.n_threads) {
    for (unsigned i = 0; i < S.n_threads; ++i)
      if (S.lanes[i].ops_hash != S.lanes[i / 32 * 32].ops_hash) {
        int keep = t_tid;
        t_tid = (int)i;
        check_ops(S.lanes[i], S.lanes[i / 32 * 32].ops_hash, "threadgroup_barrier");
        t_tid = keep;
      }
    S.bar_arrived = 0;
    S.blocked -= S.n_threads - 1;
    set_running(0, S.n_threads);
    release(&S.bar_gen, &S.bar_cv);
  } else {
    me.state = WAIT_BARRIER;
    me.op = "threadgroup_barrier";
    me.line = line;
    S.blocked++;
    check_deadlock();
    uint32_t gen = S.bar_gen;
    pthread_mutex_unlock(&S.m);
    wait_gen(&S.bar_gen, gen, &S.bar_cv);
  }
}

void emu_simd_collective(const char* op, int line, const void* payload, size_t psize,
                         void* result, size_t rsize, emu_complete_fn complete) {
  if (psize > EMU_MAX_PAYLOAD || rsize > EMU_MAX_PAYLOAD)
    failf("%s: payload of %zu/%zu bytes is over the emulator's limit", op, psize, rsize);
  pthread_mutex_lock(&S.m);
  Lane& me = S.lanes[t_tid];
  unsigned lane = (unsigned)t_tid % 32;
  Simdgroup& g = S.sg[t_tid / 32];
  if (g.exited > 0) {
    me.state = WAIT_SIMD;
    me.op = op;
    me.line = line;
    fail_deadlock(
        "SIMD collective reached after lanes of the simdgroup returned: every lane must "
        "reach each simd_* call (guard the work instead of returning early)");
  }
  if (g.arrived == 0) {
    g.op = op;
    g.line = line;
    g.psize = psize;
    g.rsize = rsize;
    g.ops_hash = me.ops_hash;
  } else {
    check_ops(me, g.ops_hash, op);
  }
  if (strcmp(g.op, op) != 0 || g.line != line || g.psize != psize || g.rsize != rsize) {
    me.state = WAIT_SIMD;
    me.op = op;
    me.line = line;
    fail_deadlock("simdgroup divergence: lanes of one simdgroup reached different SIMD collectives");
  }
  if (psize) memcpy(g.slots + lane * psize, payload, psize);
  if (++g.arrived == g.n_lanes) {
    if (complete) complete(g.slots, psize, g.n_lanes, g.results, rsize);
    g.arrived = 0;
    S.blocked -= g.n_lanes - 1;
    set_running((unsigned)t_tid / 32 * 32, g.n_lanes);
    release(&g.gen, &g.cv);
  } else {
    me.state = WAIT_SIMD;
    me.op = op;
    me.line = line;
    S.blocked++;
    check_deadlock();
    uint32_t gen = g.gen;
    pthread_mutex_unlock(&S.m);
    wait_gen(&g.gen, gen, &g.cv);
  }
  // The results stay put until every lane, this one included, has arrived
  // at the next collective of the simdgroup.
  if (rsize) memcpy(result, g.results + lane * rsize, rsize);
}

int emu_launch(emu_entry_fn entry, emu_buffer* bufs, int n_bufs, const uint32_t grid[3],
               const uint32_t threadgroup[3], double timeout_s, int fork_mode, int in_order,
               const char* kernel_name, char* err, int err_len) {
  if (err_len > 0) err[0] = 0;
  memset(&S, 0, sizeof S);
  S.in_order = in_order;
  Dl_info info;
  so_base = nullptr;
  if (dladdr((void*)entry, &info) && info.dli_fname && info.dli_fbase) {
    snprintf(so_path, sizeof so_path, "%s", info.dli_fname);
    so_base = (const char*)info.dli_fbase;
  }
  if (!fork_mode) {
    S.err = err;
    S.err_len = err_len;
    return run_grid(entry, bufs, n_bufs, grid, threadgroup, kernel_name, err, err_len);
  }
  // Shared memory: the error message, then each output.
  size_t total = (size_t)err_len;
  for (int i = 0; i < n_bufs; ++i)
    if (bufs[i].is_output) total += ((size_t)(bufs[i].hi - bufs[i].lo) + 63) / 64 * 64;
  char* shm = (char*)mmap(nullptr, total > 0 ? total : 1, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shm == MAP_FAILED) {
    snprintf(err, err_len, "mmap of %zu bytes failed: %s", total, strerror(errno));
    return 4;
  }
  shm[0] = 0;
  emu_buffer* cb = (emu_buffer*)malloc(sizeof(emu_buffer) * (n_bufs > 0 ? n_bufs : 1));
  size_t off = (size_t)err_len;
  for (int i = 0; i < n_bufs; ++i) {
    cb[i] = bufs[i];
    if (bufs[i].is_output) {
      size_t sz = (size_t)(bufs[i].hi - bufs[i].lo);
      char* m = shm + off;
      memcpy(m, bufs[i].lo, sz);
      cb[i].data = m + (bufs[i].data - bufs[i].lo);
      cb[i].lo = m;
      cb[i].hi = m + sz;
      off += (sz + 63) / 64 * 64;
    }
  }
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid < 0) {
    snprintf(err, err_len, "fork failed: %s", strerror(errno));
    munmap(shm, total);
    free(cb);
    return 4;
  }
  if (pid == 0) {
    S.err = shm;
    S.err_len = err_len;
    S.fork_mode = 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO;
    int sigs[] = {SIGSEGV, SIGFPE, SIGBUS, SIGILL, SIGABRT};
    for (int s : sigs) sigaction(s, &sa, nullptr);
    int rc = run_grid(entry, cb, n_bufs, grid, threadgroup, kernel_name, shm, err_len);
    _exit(rc == 0 ? 0 : 4);
  }
  int status = 0, rc;
  double t0 = now_s();
  long sleep_ns = 20000;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) {
      snprintf(err, err_len, "waitpid failed: %s", strerror(errno));
      munmap(shm, total);
      free(cb);
      return 4;
    }
    if (timeout_s > 0 && now_s() - t0 > timeout_s) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      snprintf(err, err_len,
               "kernel '%s' did not finish within %.1f s and was killed (an infinite loop, "
               "or a grid too large for the emulator; MLX_MOE_EMU_TIMEOUT sets the limit)",
               kernel_name, timeout_s);
      munmap(shm, total);
      free(cb);
      return 2;
    }
    struct timespec ts = {0, sleep_ns};
    nanosleep(&ts, nullptr);
    if (sleep_ns < 2000000) sleep_ns *= 2;
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    for (int i = 0; i < n_bufs; ++i)
      if (bufs[i].is_output)
        memcpy((char*)bufs[i].lo, cb[i].lo, (size_t)(bufs[i].hi - bufs[i].lo));
    rc = 0;
  } else {
    if (shm[0]) {
      snprintf(err, err_len, "%s", shm);
    } else if (WIFSIGNALED(status)) {
      snprintf(err, err_len, "kernel '%s' crashed with signal %d", kernel_name,
               WTERMSIG(status));
    } else {
      snprintf(err, err_len, "kernel '%s' failed (exit status %d)", kernel_name,
               WEXITSTATUS(status));
    }
    rc = (WIFEXITED(status) && WEXITSTATUS(status) == 5) || WIFSIGNALED(status) ? 3 : 1;
  }
  munmap(shm, total);
  free(cb);
  return rc;
}

}  // extern "C"
