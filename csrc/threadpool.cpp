#include "sparseinfer/threadpool.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <pthread.h>
#endif

namespace sparseinfer {
namespace {

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
    drain();  // the caller takes tasks too
    // Wait until every helper that joined this generation has finished its last task.
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [&] { return active_ == 0; });
    wanted_ = 0;  // late wakers of this generation find nothing to do
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < n_tasks_; i = next_.fetch_add(1)) fn_(ctx_, i);
  }

  void grow(int helpers) {
    while (int(workers_.size()) < helpers) {
      workers_.emplace_back([this] { worker(); });
      workers_.back().detach();  // the pool lives until the process exits
    }
  }

  void worker() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_work_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (wanted_ <= 0) continue;  // more workers than this run asked for
      --wanted_, ++active_;
      lk.unlock();
      drain();
      lk.lock();
      if (--active_ == 0) cv_done_.notify_one();
    }
  }

  std::mutex region_mu_;  // held by the thread whose run is in flight
  std::mutex mu_;         // guards everything below except next_
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  int wanted_ = 0, active_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
};

ThreadPool* g_pool = nullptr;
std::once_flag g_atfork_once;

ThreadPool& pool() {
  static std::mutex create_mu;
  std::lock_guard<std::mutex> lk(create_mu);
#if !defined(_WIN32)
  // The child of a fork() has none of the parent's workers: forget the pool (leaked on purpose,
  // its mutexes may be held by threads that do not exist there) and build a new one on demand.
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
#endif
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
  pool().run(n_tasks, max_threads, fn, ctx);
}

}  // namespace sparseinfer
