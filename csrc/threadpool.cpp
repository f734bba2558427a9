#include "sparseinfer/threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if !defined(_WIN32)
#include <pthread.h>
#include <sched.h>
#endif
#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

namespace sparseinfer {
namespace {

// How long a worker spins for the next run, and the caller for the last helper, before sleeping on
// a condition variable: a futex wake-up costs tens of microseconds on a VM, more than a 768 x 768
// GEMV, and a model's layers call back to back. SPARSEINFER_SPIN_US (read once) changes it; 0 never
// spins. (ONNX Runtime's intra-op threads spin the same way by default.)
int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* env = std::getenv("SPARSEINFER_SPIN_US");
    const long us = env && *env ? std::strtol(env, nullptr, 10) : 50;
    return int64_t(us < 0 ? 0 : us) * 1000;
  }();
  return ns;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

inline void yield_cpu() {
#if !defined(_WIN32)
  sched_yield();
#else
  std::this_thread::yield();
#endif
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Spins until done() or spin_ns() pass; true if done() became true.
template <class Done>
bool spin_until(Done done) {
  const int64_t budget = spin_ns();
  if (budget <= 0) return done();
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(budget)) return done();
  }
}

// Calls fn(ctx, i) for every task i not yet claimed (`next` counts the claims): the caller and each
// helper run it, so tasks go to whoever is free and a late-waking thread costs nothing.
void claim_tasks(TaskFn fn, void* ctx, int64_t n_tasks, std::atomic<int64_t>& next) {
  for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) fn(ctx, i);
}

class ThreadPool {
 public:
  void run(int64_t n_tasks, int max_threads, TaskFn fn, void* ctx) {
    const int64_t helpers = std::min<int64_t>(n_tasks, max_threads) - 1;
    std::unique_lock<std::mutex> region(region_mu_, std::try_to_lock);
    if (helpers <= 0 || !region.owns_lock()) {  // serial: too little work, or the pool is busy
      for (int64_t i = 0; i < n_tasks; ++i) fn(ctx, i);
      return;
    }
    grow(int(helpers));
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn, ctx_ = ctx, n_tasks_ = n_tasks, wanted_ = int(helpers);
      next_.store(0), active_ = 0;
      ++generation_;
    }
    cv_work_.notify_all();
    drain();  // the caller takes tasks too, so a helper that is slow to wake costs nothing
    // Wait until every helper that joined this generation has finished its last task: spin, then
    // yield the core rather than sleep (a helper preempted mid-task may be waiting for this very
    // core; a futex sleep would add a wake-up to the critical path).
    for (;;) {
      if (!spin_until([&] { return active_.load(std::memory_order_acquire) == 0; }))
        while (active_.load(std::memory_order_acquire) != 0) yield_cpu();
      std::lock_guard<std::mutex> lk(mu_);
      if (active_ == 0) {  // checked under mu_: a helper joining now would still see wanted_ > 0
        wanted_ = 0;       // late wakers of this generation find nothing to do
        return;
      }
    }
  }

 private:
  void drain() { claim_tasks(fn_, ctx_, n_tasks_, next_); }

  void grow(int helpers) {
    while (int(workers_.size()) < helpers) {
      workers_.emplace_back([this] { worker(); });
      workers_.back().detach();  // the pool lives until the process exits
    }
  }

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lk(mu_);
      cv_work_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (wanted_ <= 0) continue;  // more workers than this run asked for
      --wanted_, ++active_;
      lk.unlock();
      drain();
      lk.lock();
      --active_;
    }
  }

  std::mutex region_mu_;  // held by the thread whose run is in flight
  std::mutex mu_;         // guards everything below except next_
  std::condition_variable cv_work_;
  std::vector<std::thread> workers_;
  // Written under mu_; atomic so that spinning threads may read them without it.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0};
  int wanted_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
};

ThreadPool* g_pool = nullptr;
std::once_flag g_atfork_once;

// -- the host's OpenMP team -----------------------------------------------------------------------
// PyTorch runs its CPU ops on an OpenMP team whose threads spin for a while after every op. A second
// pool beside it fights them for the cores: on 2 cores, a model whose compressed layers sit between
// torch ops ran its layers at half speed. So when the process has loaded an OpenMP runtime (found
// among the loaded libraries: libgomp, or Intel / LLVM runtimes, which export the same GOMP entry),
// parallel regions run on that team; else, or with SPARSEINFER_OPENMP=0, or after fork() (an
// OpenMP team does not survive it), on the pool above.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
std::atomic<bool> g_forked{false};

#if defined(__linux__)
// The GOMP entry of a loaded OpenMP runtime; torch's own (under .../torch/lib/) wins over others a
// process may hold (scikit-learn and others vendor a libgomp of their own).
struct GompSearch {
  GompParallel any = nullptr, torch = nullptr;
};

int find_gomp(dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libgomp", 7) && std::strncmp(base, "libiomp", 7) && std::strncmp(base, "libomp", 6)) return 0;
  void* lib = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);  // already loaded: just a handle
  if (!lib) return 0;
  const auto f = reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel"));
  GompSearch* s = static_cast<GompSearch*>(out);
  if (f && !s->any) s->any = f;
  if (f && std::strstr(name, "/torch/lib/")) s->torch = f;
  return s->torch != nullptr;  // nonzero stops the walk
}
#endif

GompParallel host_openmp() {
  static const GompParallel found = [] {
    GompParallel f = nullptr;
    const char* env = std::getenv("SPARSEINFER_OPENMP");
    if (env && std::strcmp(env, "0") == 0) return f;
#if defined(__linux__)
    GompSearch search;
    dl_iterate_phdr(find_gomp, &search);
    f = search.torch ? search.torch : search.any;
#endif
    return f;
  }();
  return g_forked.load(std::memory_order_relaxed) ? nullptr : found;
}

struct TeamRun {
  TaskFn fn;
  void* ctx;
  int64_t n_tasks;
  std::thread::id caller;
  std::atomic<int64_t> next{0};
  int64_t caller_done_ns = 0;  // when the caller ran out of tasks (the rest is the team's barrier)
};

void team_body(void* p) {  // every team member claims tasks until none is left
  TeamRun* r = static_cast<TeamRun*>(p);
  claim_tasks(r->fn, r->ctx, r->n_tasks, r->next);
  if (std::this_thread::get_id() == r->caller) r->caller_done_ns = now_ns();
}

// -- shared cores ---------------------------------------------------------------------------------
// An OpenMP region ends at a barrier that waits for every team member, including one that has not
// even been scheduled yet: when another process holds the cores, a 20 us call waited whole
// scheduler slices (bench/README.md, "Shared cores": ~100x dense). The caller notices, because it
// took every task itself and still waited at the barrier; then, for a while, calls run on
// sparseinfer's own pool instead, whose caller never waits for a helper that has not started a
// task; then the team is tried again.
constexpr int64_t kLateBarrierNs = 200 * 1000;        // a barrier wait this long means shared cores
constexpr int64_t kSharedHoldNs = 200 * 1000 * 1000;  // how long the pool serves after one
std::atomic<int64_t> g_shared_until{0};

bool cores_shared() { return now_ns() < g_shared_until.load(std::memory_order_relaxed); }

void note_team_wait(int64_t start_ns, int64_t caller_done_ns, int64_t end_ns) {
  const int64_t waited = end_ns - caller_done_ns, worked = caller_done_ns - start_ns;
  if (waited > kLateBarrierNs && waited > worked)
    g_shared_until.store(end_ns + kSharedHoldNs, std::memory_order_relaxed);
}

// The child of a fork() has none of the parent's threads: it forgets the pool (leaked on purpose,
// its mutexes may be held by threads that do not exist there; a new one is built on demand) and
// the host's team. Installed by the first parallel run.
void install_fork_handler() {
#if !defined(_WIN32)
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr, g_forked.store(true); });
  });
#endif
}

ThreadPool& pool() {
  static std::mutex create_mu;
  std::lock_guard<std::mutex> lk(create_mu);
  if (!g_pool) g_pool = new ThreadPool();  // never destroyed: workers are detached
  return *g_pool;
}

}  // namespace

void parallel_run(int64_t n_tasks, int max_threads, TaskFn fn, void* ctx) {
  if (n_tasks <= 0) return;
  if (n_tasks == 1 || max_threads <= 1) {
    for (int64_t i = 0; i < n_tasks; ++i) fn(ctx, i);
    return;
  }
  install_fork_handler();
  GompParallel parallel = host_openmp();
  if (parallel && !cores_shared()) {
    TeamRun run{fn, ctx, n_tasks, std::this_thread::get_id()};
    const int64_t start = now_ns();
    parallel(team_body, &run, unsigned(std::min<int64_t>(n_tasks, max_threads)), 0);
    if (run.caller_done_ns) note_team_wait(start, run.caller_done_ns, now_ns());
    return;
  }
  pool().run(n_tasks, max_threads, fn, ctx);
}

namespace {

struct StageRun {
  const Stage* stages;
  int64_t n;
  std::atomic<uint64_t> state{0};  // (stage << 32) | tasks claimed in it
  std::atomic<int64_t> done{0};    // tasks of the current stage finished
};

int64_t first_stage(const Stage* stages, int64_t from, int64_t n) {
  while (from < n && stages[from].tasks <= 0) ++from;
  return from;
}

// One participant: claims tasks of the current stage; when all are claimed, waits for the last to
// finish (spinning, then yielding the core). The thread finishing a stage's last task opens the next.
void stage_participant(void* p, int64_t) {
  StageRun& r = *static_cast<StageRun*>(p);
  int64_t waits = 0;
  for (;;) {
    uint64_t word = r.state.load(std::memory_order_acquire);
    const int64_t s = int64_t(word >> 32), i = int64_t(word & 0xffffffffu);
    if (s >= r.n) return;
    const Stage& st = r.stages[s];
    if (i >= st.tasks) {  // every task claimed: another thread is finishing one
      if (++waits < 4096) cpu_relax();
      else yield_cpu();
      continue;
    }
    if (!r.state.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel, std::memory_order_relaxed)) continue;
    waits = 0;
    st.fn(st.ctx, i);
    if (r.done.fetch_add(1, std::memory_order_acq_rel) + 1 == st.tasks) {
      r.done.store(0, std::memory_order_relaxed);
      r.state.store(uint64_t(first_stage(r.stages, s + 1, r.n)) << 32, std::memory_order_release);
    }
  }
}

}  // namespace

void run_stages(const Stage* stages, int64_t n_stages, int max_threads) {
  StageRun run;
  run.stages = stages, run.n = n_stages;
  run.state.store(uint64_t(first_stage(stages, 0, n_stages)) << 32);
  if (max_threads <= 1) {
    stage_participant(&run, 0);
    return;
  }
  parallel_run(max_threads, max_threads, stage_participant, &run);
}

const char* threading_name() {
  return host_openmp() ? "the host's OpenMP team (sparseinfer's pool while the cores are shared)"
                       : "sparseinfer's thread pool";
}

}  // namespace sparseinfer
