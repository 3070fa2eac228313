// The threads a kernel call runs on.
#pragma once

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hybridattn {

// n_threads, or with 0 the OpenMP default; at most four per processor (more only take turns, and far
// more fail to start: OpenMP then ends the process).
inline int resolve_threads(int n_threads) {
#ifdef _OPENMP
  return n_threads > 0 ? std::min(n_threads, 4 * std::max(1, omp_get_num_procs())) : omp_get_max_threads();
#else
  (void)n_threads;
  return 1;
#endif
}

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace hybridattn
