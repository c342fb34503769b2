// Work sharing of the mmcompress CPU extensions (int_gemm.cpp, sparse_gemv.cpp, fused_step.cpp).
//
// The threads of ATen's OpenMP team take work units from an atomic counter (dynamic, so a thread the
// OS parks does not hold a fixed share).  Running on the OpenMP team matters: torch's own ops between
// our calls leave its workers spin-waiting, and helpers from another pool would compete with them for
// the same cores (measured 1.7x slower per call in a decode step on 2 cores).
//
// Included as "share_work.h": compile_and_load (sparse/kernels/cpu.py) puts this folder on the include
// path and extension_name hashes every header here, so a change rebuilds every extension.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mmcompress {

// Run body(u) for every unit u in [0, nunits) on up to nt threads (default: ATen's thread count).
template <typename F>
inline void share_work(int64_t nunits, const F& body, int nt = at::get_num_threads()) {
  nt = std::max<int>(1, nt);
  if (nt == 1 || nunits == 1) {
    for (int64_t u = 0; u < nunits; ++u) body(u);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nt, nunits), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < nunits;
           u = next.fetch_add(1, std::memory_order_relaxed))
        body(u);
  });
}

}  // namespace mmcompress
