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

// Which threads parallel_run uses: the host's OpenMP team (and when) or sparseinfer's thread pool.
const char* threading_name();

}  // namespace sparseinfer
