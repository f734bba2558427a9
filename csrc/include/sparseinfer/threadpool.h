// A small persistent thread pool for splitting one kernel call over cores.
//
// run(n, fn, ctx) calls fn(ctx, i) once for every i in [0, n) and returns when all are done. The
// calling thread works too, and tasks are claimed dynamically, so a late-waking worker costs
// nothing. Workers are created on first need and kept; a run allocates nothing. Only one run is
// in flight at a time: a concurrent caller (another Python thread, the GIL being released) runs
// its tasks on its own thread instead of waiting. After fork() the child gets a fresh pool.
// Where the process has loaded an OpenMP runtime (PyTorch's), parallel_run uses its team instead
// (threadpool.cpp says why), except for a while after a region's end barrier waited long for a
// team member another process kept off the cores; SPARSEINFER_OPENMP=0 keeps the pool.
#pragma once

#include <cstdint>

namespace sparseinfer {

using TaskFn = void (*)(void* ctx, int64_t task);

void parallel_run(int64_t n_tasks, int max_threads, TaskFn fn, void* ctx);

// A sequence of parallel steps in one parallel region, for chains of calls too short to pay a
// fork-join each (a decode step: ~150 kernel calls and vector ops of a few microseconds). Stage s
// runs fn(ctx, i) for i in 0..tasks-1, its tasks claimed by whichever thread is free; stage s + 1
// starts when every task of stage s has finished (and sees what they wrote). The caller may run
// every task alone: a helper that wakes late joins at the stage running then. Stages may have 0 tasks.
struct Stage {
  TaskFn fn;
  void* ctx;
  int64_t tasks;
};
void run_stages(const Stage* stages, int64_t n_stages, int max_threads);

// Which threads parallel_run uses: the host's OpenMP team (and when) or sparseinfer's thread pool.
const char* threading_name();

}  // namespace sparseinfer
