// Batch-1..8 sparse GEMV over an input-channel-major weight (mmcompress CPU backend).
//
//   y[b, :] = sum_{i in S_b} x[b, i] * WT[i, :] (+ bias)
//
// WT is the pre-transposed weight [in, out] (fp32 or bf16, contiguous), so every kept input channel
// is one contiguous row of WT and every skipped channel is a skipped contiguous chunk of memory.
// S_b is the Top-K set of |x[b, :]| (selected here with a radix pre-pass + nth_element, no sort),
// a magnitude threshold, or a given index list.  For several tokens the kernel walks the union of
// the kept rows once (token b contributes 0 on rows it did not keep), so each weight row is read once.
//
// Parallelism: the kept rows are split into one part per thread (split-K, default; set_row_split(1)
// gives the former split of the output columns into one contiguous block per thread), so each thread
// streams whole kept rows, the longest contiguous runs the layout allows; each task keeps an fp32
// accumulator for its columns and walks its rows in groups (8 rows at batch 1, else 4; the next group's
// rows prefetched where that pays, g_prefetch) with an inner SIMD loop; bf16 weights are widened to
// fp32 on load, or at batch 1 with bf16-valued inputs multiplied in pairs of rows by VDPBF16PS
// (gemv_group_dot); the row parts' partial sums are added at the end.  The int8 variant (topk_int8_gemv,
// below) works the same way, in passes of 4 to 16 kept rows (int8_block).  Blocks are handed out from an
// atomic counter to the threads of ATen's OpenMP team (share_work.h, through parallel_tasks).
//
// Registered as torch.ops.mmcompress_sparse.* (no pybind: faster to compile).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <immintrin.h>

#include "share_work.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#ifndef MMC_SPLIT
#define MMC_SPLIT 1
#endif

namespace {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename W>
inline float ldw(const W* p, int64_t j);
template <>
inline float ldw<float>(const float* p, int64_t j) { return p[j]; }
template <>
inline float ldw<uint16_t>(const uint16_t* p, int64_t j) { return bf16_to_f32(p[j]); }

inline uint32_t abs_bits(float v) {  // order-preserving key of |v| (non-negative float bits)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x7fffffffu;
}

// Rows of token-input x (fp32 copy) -> magnitude keys.
template <typename X>
void load_row(const X* x, int64_t d, float* out);
template <>
void load_row<float>(const float* x, int64_t d, float* out) { std::memcpy(out, x, d * sizeof(float)); }
template <>
void load_row<uint16_t>(const uint16_t* x, int64_t d, float* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = bf16_to_f32(x[i]);
}

// Exact Top-K by magnitude of one row (NaN counts as largest).  Appends the kept indices in increasing
// order.  Radix pre-pass: a 2048-bin histogram of the top key bits finds the bin holding the K-th
// largest key; only that bin's keys go through nth_element.  Ties at the K-th key keep the lowest
// indices.
void topk_row(const float* xr, int64_t d, int64_t k, std::vector<uint32_t>& keys, std::vector<uint32_t>& cand,
              std::vector<int32_t>& out) {
  if (k >= d) {
    for (int64_t i = 0; i < d; ++i) out.push_back(static_cast<int32_t>(i));
    return;
  }
  if (k <= 0) return;
  keys.resize(d);
  uint32_t hist[2048];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < d; ++i) {
    uint32_t u = abs_bits(xr[i]);
    keys[i] = u;
    hist[u >> 20]++;
  }
  int64_t above = 0;  // keys in bins strictly above the K-th key's bin
  int bin = 2047;
  for (; bin >= 0; --bin) {
    if (above + hist[bin] >= k) break;
    above += hist[bin];
  }
  cand.clear();
  for (int64_t i = 0; i < d; ++i)
    if ((keys[i] >> 20) == static_cast<uint32_t>(bin)) cand.push_back(keys[i]);
  const int64_t r = k - above;  // rank of the K-th key inside its bin (1-based, from the top)
  std::nth_element(cand.begin(), cand.begin() + (r - 1), cand.end(), std::greater<uint32_t>());
  const uint32_t tau = cand[r - 1];
  int64_t gt = above;
  for (int64_t j = 0; j < r - 1; ++j)
    if (cand[j] > tau) ++gt;  // elements before the pivot are >= tau
  int64_t ties = k - gt;
  for (int64_t i = 0; i < d; ++i) {
    uint32_t u = keys[i];
    if (u > tau || (u == tau && ties-- > 0)) out.push_back(static_cast<int32_t>(i));
  }
}

void threshold_row(const float* xr, int64_t d, float thr, std::vector<int32_t>& out) {
  for (int64_t i = 0; i < d; ++i)
    if (!(std::fabs(xr[i]) < thr)) out.push_back(static_cast<int32_t>(i));  // |x| >= thr (NaN kept)
}

// Union of the per-token kept sets -> sorted rows + packed values [nrows, B] (0 where a token did not keep
// the row).
template <typename V>
void build_union(const std::vector<std::vector<int32_t>>& sel, const std::vector<std::vector<V>>& val,
                 int64_t d, std::vector<int32_t>& rows, std::vector<V>& vals) {
  const int64_t B = static_cast<int64_t>(sel.size());
  rows.clear();
  if (B == 1) {
    rows = sel[0];
    vals = val[0];
    return;
  }
  std::vector<int32_t> pos(d, -1);
  for (int64_t b = 0; b < B; ++b)
    for (int32_t i : sel[b]) pos[i] = 0;
  for (int64_t i = 0; i < d; ++i)
    if (pos[i] == 0) {
      pos[i] = static_cast<int32_t>(rows.size());
      rows.push_back(static_cast<int32_t>(i));
    }
  vals.assign(rows.size() * B, V(0));
  for (int64_t b = 0; b < B; ++b)
    for (size_t j = 0; j < sel[b].size(); ++j) vals[pos[sel[b][j]] * B + b] = val[b][j];
}

// How the block kernels prefetch (MMCOMPRESS_KERNEL_PREFETCH = rows | ahead | none, read once when the library
// loads; the hints carry no data: the results are the same either way).
//
// rows: gemv_group, gemv_group_dot and int8_walk's passes prefetch the next group's kept rows.  Skipped rows
// break the hardware prefetchers' streams at every kept row, so the next group's rows can be prefetched at the
// same column offset while this group is processed (one line per row per step, about one group ahead).  On an
// Intel Xeon (sitting D, one thread) 5-15 % faster than no prefetch: the default on CPUs other than AMD.
//
// ahead: gemv_group_dot (bf16 rows at one token) and int8_pass prefetch each of their current rows
// ROW_AHEAD bytes ahead of the line they read (PREFETCHT2), within the row.  On the AMD EPYC Zen 4 of sessions
// 37-42 (2 threads) the next group's rows cost 0-11 % (bf16) and 12-20 % (int8 at 11008 columns) (docs/runtime.md
// "Prefetch by CPU"); in the fused decode step on the 7B stack the rows 1 KB ahead made the dense kernel at 0 %
// 0.4-8.7 % faster, LaRoSA 40 % and its joint form with W8A8 1-8 % (docs/runtime.md "W4A16 at decode (session
// 42)"): the default on AMD.  In gemv_group_dot the stream runs on into the next group's rows: over a row's last
// ROW_AHEAD bytes it prefetches the first ROW_AHEAD bytes of the row that follows it in the walk (LaRoSA 40 %
// 0.5-5.0 % faster in eight of eight processes, docs/runtime.md "Session 43").
//
// none: no software prefetch.
//
// The hints must be T0/T1/T2, never non-temporal: one group ahead is R rows x len columns (64 KB of bf16 at
// R = 8, len 4096), more than L1 holds, and PREFETCHNTA (__builtin_prefetch(p, 0, 0)) on an Intel Xeon (AVX-512
// BF16, AMX) made the bf16 GEMV 2.2x slower than no prefetch at all (5.5 vs 12.2 GB/s, T0 12.6-14.6 GB/s, one
// thread; docs/runtime.md "Why sitting D was slow"): the NTA lines are evidently dropped before use and fetched
// again.
enum class Prefetch { none, rows, ahead };

Prefetch default_prefetch() {
  if (const char* e = std::getenv("MMCOMPRESS_KERNEL_PREFETCH")) {
    if (!std::strcmp(e, "rows")) return Prefetch::rows;
    if (!std::strcmp(e, "ahead")) return Prefetch::ahead;
    if (!std::strcmp(e, "none")) return Prefetch::none;
  }
  __builtin_cpu_init();
  return __builtin_cpu_is("amd") ? Prefetch::ahead : Prefetch::rows;
}

const Prefetch g_prefetch = default_prefetch();
const bool g_prefetch_rows = g_prefetch == Prefetch::rows;
const bool g_prefetch_ahead = g_prefetch == Prefetch::ahead;
constexpr int64_t ROW_AHEAD = 1024;  // bytes ahead within a row (ahead)

// g_prefetch ahead for NR rows walked together: the line at element ca of each current row (cur) while ca < len,
// then the same distance into the rows the walk takes next (next, or null: none), within their first len elements
template <int NR, typename T>
inline void prefetch_ahead(const T* const* cur, const T* const* next, int64_t ca, int64_t len) {
  if (ca < len)
    for (int q = 0; q < NR; ++q) _mm_prefetch(reinterpret_cast<const char*>(cur[q] + ca), _MM_HINT_T2);
  else if (next && ca - len < len)
    for (int q = 0; q < NR; ++q) _mm_prefetch(reinterpret_cast<const char*>(next[q] + (ca - len)), _MM_HINT_T2);
}

// acc[b*len + j] += sum_{q<R} xv[b][q] * WT[rg[q], j0 + j] for j in [0, len): one group of R kept rows
// (rg), walked one 64-byte line of every row at a time; nx: the next group's R rows, or null (the last group),
// prefetched along with this group's (g_prefetch rows).
template <typename W, int B, int R>
inline void gemv_group(const W* __restrict wt, int64_t n, const int32_t* rg, const int32_t* nx, const float* vals,
                       int64_t j0, int64_t len, float* __restrict acc) {
  const W* w[R];
  const W* p[R];
  float xv[B][R];
  for (int q = 0; q < R; ++q) {
    w[q] = wt + static_cast<int64_t>(rg[q]) * n + j0;
    p[q] = nx ? wt + static_cast<int64_t>(nx[q]) * n + j0 : w[q];
    for (int b = 0; b < B; ++b) xv[b][q] = vals[q * B + b];
  }
  constexpr int64_t CH = 64 / sizeof(W);  // elements per cache line
  int64_t c = 0;
  for (; c + CH <= len; c += CH) {
    if (g_prefetch_rows && nx)
      for (int q = 0; q < R; ++q) __builtin_prefetch(p[q] + c, 0, 3);
#pragma omp simd
    for (int64_t j = c; j < c + CH; ++j)
      for (int b = 0; b < B; ++b) {
        float t = 0.f;
        for (int q = 0; q < R; ++q) t += xv[b][q] * ldw(w[q], j);
        acc[b * len + j] += t;
      }
  }
  for (int64_t j = c; j < len; ++j)
    for (int b = 0; b < B; ++b) {
      float t = 0.f;
      for (int q = 0; q < R; ++q) t += xv[b][q] * ldw(w[q], j);
      acc[b * len + j] += t;
    }
}

#ifdef __AVX512BF16__
// gemv_group at batch 1 for bf16 weights and bf16-valued inputs (a bf16 model's activations): VDPBF16PS on
// pairs of kept rows.  One 64-byte line of rows q and q+1 (32 columns each) is interleaved into column pairs
// (WT[q, j], WT[q+1, j]) by two permutes, and one VDPBF16PS per 16 columns adds
// x[q+1]·WT[q+1, j] + x[q]·WT[q, j] to acc[j] (exact bf16 products, fp32 sums rounded to nearest even, in that
// order; denormals flushed, as the instruction does): three instructions per pair of lines where widening
// each line to fp32 first takes six.  xp[q/2]: the pair (x[q], x[q+1]) as two bf16 codes; len: a multiple of
// 32 (gemv_block does the rest); nx: as gemv_group, and with g_prefetch ahead prefetched where this group's rows
// end.
template <int R>
inline void gemv_group_dot(const uint16_t* __restrict wt, int64_t n, const int32_t* rg, const int32_t* nx,
                           const uint32_t* xp, int64_t j0, int64_t len, float* __restrict acc) {
  static_assert(R % 2 == 0, "pairs of rows");
  const uint16_t* w[R];
  const uint16_t* p[R];
  for (int q = 0; q < R; ++q) {
    w[q] = wt + static_cast<int64_t>(rg[q]) * n + j0;
    p[q] = nx ? wt + static_cast<int64_t>(nx[q]) * n + j0 : w[q];
  }
  __m512bh xb[R / 2];
  for (int q = 0; q < R / 2; ++q) xb[q] = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xp[q]));
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22,
                                      53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t c = 0; c < len; c += 32) {
    if (g_prefetch_rows && nx)
      for (int q = 0; q < R; ++q) __builtin_prefetch(p[q] + c, 0, 3);
    if (g_prefetch_ahead) prefetch_ahead<R>(w, nx ? p : nullptr, c + ROW_AHEAD / 2, len);  // ROW_AHEAD bytes ahead
    __m512 a0 = _mm512_loadu_ps(acc + c), a1 = _mm512_loadu_ps(acc + c + 16);
    for (int q = 0; q < R; q += 2) {
      const __m512i u = _mm512_loadu_si512(w[q] + c), v = _mm512_loadu_si512(w[q + 1] + c);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_permutex2var_epi16(u, lo, v), xb[q / 2]);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_permutex2var_epi16(u, hi, v), xb[q / 2]);
    }
    _mm512_storeu_ps(acc + c, a0);
    _mm512_storeu_ps(acc + c + 16, a1);
  }
}
#endif

// Whether every value is a bf16 value (its low 16 bits zero): gemv_block's test for gemv_group_dot.
inline bool bf16_valued(const float* v, int64_t n) {
  uint32_t low = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, v + i, 4);
    low |= u & 0xffffu;
  }
  return low == 0;
}

// acc[b*len + (j - j0)] += sum_r vals[r*B + b] * WT[rows[r], j]  for j in [j0, j1): groups of 8 rows at
// batch 1 (4 above: measured at batch 1 only, one thread, loaded: 8-row groups 2-9 % faster than 4,
// docs/runtime.md), then one group of 4 and single rows for the rest.
template <typename W, int B>
void gemv_block(const W* __restrict wt, int64_t n, const int32_t* rows, const float* vals, int64_t nrows, int64_t j0,
                int64_t j1, float* __restrict acc) {
  constexpr int R = B == 1 ? 8 : 4;
  const int64_t len = j1 - j0;
  // the next group's rows, if it is a full group
  auto next = [&](int64_t r) { return r + 2 * R <= nrows ? rows + r + R : nullptr; };
  int64_t r = 0;
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<W, uint16_t> && B == 1) {
    const int64_t len32 = len / 32 * 32, ng = nrows / R * R;
    if (len32 && ng && bf16_valued(vals, ng)) {  // the groups of R rows on VDPBF16PS, their last columns below
      uint32_t xp[R / 2];
      for (; r + R <= nrows; r += R) {
        for (int q = 0; q < R / 2; ++q) {
          uint32_t a, b;
          std::memcpy(&a, vals + r + 2 * q, 4);
          std::memcpy(&b, vals + r + 2 * q + 1, 4);
          xp[q] = (a >> 16) | (b & 0xffff0000u);
        }
        gemv_group_dot<R>(wt, n, rows + r, next(r), xp, j0, len32, acc);
      }
      if (len32 < len)
        for (int64_t q = 0; q < ng; ++q) {
          const uint16_t* w0 = wt + static_cast<int64_t>(rows[q]) * n + j0;
          for (int64_t j = len32; j < len; ++j) acc[j] += vals[q] * ldw(w0, j);
        }
    }
  }
#endif
  for (; r + R <= nrows; r += R)
    gemv_group<W, B, R>(wt, n, rows + r, next(r), vals + r * B, j0, len, acc);
  if constexpr (R > 4) {
    if (r + 4 <= nrows) {
      gemv_group<W, B, 4>(wt, n, rows + r, nullptr, vals + r * B, j0, len, acc);
      r += 4;
    }
  }
  for (; r < nrows; ++r) {
    const W* __restrict w0 = wt + static_cast<int64_t>(rows[r]) * n + j0;
    float xv[B];
    for (int b = 0; b < B; ++b) xv[b] = vals[r * B + b];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float a0 = ldw(w0, j);
      for (int b = 0; b < B; ++b) acc[b * len + j] += xv[b] * a0;
    }
  }
}

template <typename W>
using block_fn = void (*)(const W*, int64_t, const int32_t*, const float*, int64_t, int64_t, int64_t, float*);

template <typename W>
block_fn<W> pick_block(int64_t B) {
  switch (B) {
    case 1: return gemv_block<W, 1>;
    case 2: return gemv_block<W, 2>;
    case 3: return gemv_block<W, 3>;
    case 4: return gemv_block<W, 4>;
    case 5: return gemv_block<W, 5>;
    case 6: return gemv_block<W, 6>;
    case 7: return gemv_block<W, 7>;
    default: return gemv_block<W, 8>;
  }
}

// Row parts of the GEMV kernels' work split (0 = one per thread, i.e. pure split-K at batch 1;
// 1 = column blocks only).  Settable for measurements (torch.ops.mmcompress_sparse.set_row_split).
std::atomic<int64_t> g_row_split{0};

int64_t row_split_parts(int nt) {
  const int64_t v = g_row_split.load(std::memory_order_relaxed);
  return v <= 0 ? nt : v;
}

int64_t set_row_split(int64_t parts) { return g_row_split.exchange(parts); }

// Run task(p, t, j0, j1, acc) for every row part p in [0, rp) and column block t = [j0, j1) of the n
// columns (blocks of blk) on nt threads (see the file header); acc is a scratch buffer of the thread.
template <typename Acc, typename Task>
void parallel_tasks(int64_t rp, int64_t blk, int64_t n, int nt, const Task& task) {
  const int64_t nblocks = (n + blk - 1) / blk;
  auto run = [&](int64_t s, int64_t e) {
    std::vector<Acc> acc;
    for (int64_t i = s; i < e; ++i) {
      const int64_t t = i % nblocks, p = i / nblocks, j0 = t * blk;
      task(p, t, j0, std::min(n, j0 + blk), acc);
    }
  };
  if (nblocks * rp == 1 || nt == 1) {
    run(0, nblocks * rp);  // one call: the scratch buffer is set up once
    return;
  }
  mmcompress::share_work(nblocks * rp, [&](int64_t i) { run(i, i + 1); }, nt);
}

// y[B, n] <- rows/vals GEMV over wt (+ bias), parallel over rp row parts x contiguous column blocks
// (see row_split_parts: split-K lets each thread stream whole kept rows; partial sums added at the end).
template <typename W>
void run_gemv(const W* wt, int64_t n, const std::vector<int32_t>& rows, const std::vector<float>& vals, int64_t B,
              const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int nt = std::max<int>(1, at::get_num_threads());
  const int64_t nrows = static_cast<int64_t>(rows.size());
  const int64_t rp = std::max<int64_t>(1, std::min<int64_t>(row_split_parts(nt), std::max<int64_t>(1, nrows / 4)));
  // MMC_SPLIT column blocks per thread of a row part (default 1), 32-column aligned.
  int64_t nb = (nt + rp - 1) / rp * MMC_SPLIT;
  int64_t blk = (n + nb - 1) / nb;
  blk = std::max<int64_t>(32, (blk + 31) / 32 * 32);
  auto fn = pick_block<W>(B);
  const bool out_bf16 = y.scalar_type() == at::kBFloat16;
  const bool bias_bf16 = bias.has_value() && bias->scalar_type() == at::kBFloat16;
  const void* bptr = bias.has_value() ? bias->data_ptr() : nullptr;
  void* yptr = y.data_ptr();
  std::vector<float> part(rp > 1 ? static_cast<size_t>(rp * B * n) : 0);
  auto finish = [&](int64_t j0, int64_t len, float* acc) {  // acc [B, len] += bias, then store
    for (int64_t b = 0; b < B; ++b) {
      float* a = acc + b * len;
      if (bptr) {
        for (int64_t j = 0; j < len; ++j)
          a[j] += bias_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(bptr)[j0 + j])
                            : static_cast<const float*>(bptr)[j0 + j];
      }
      if (out_bf16) {
        uint16_t* yo = static_cast<uint16_t*>(yptr) + b * n + j0;
        for (int64_t j = 0; j < len; ++j) yo[j] = f32_to_bf16(a[j]);
      } else {
        std::memcpy(static_cast<float*>(yptr) + b * n + j0, a, len * sizeof(float));
      }
    }
  };
  parallel_tasks<float>(rp, blk, n, nt, [&](int64_t p, int64_t, int64_t j0, int64_t j1, std::vector<float>& acc) {
    const int64_t len = j1 - j0, r0 = nrows * p / rp, r1 = nrows * (p + 1) / rp;
    acc.assign(B * len, 0.f);
    fn(wt, n, rows.data() + r0, vals.data() + r0 * B, r1 - r0, j0, j1, acc.data());
    if (rp == 1) {
      finish(j0, len, acc.data());
    } else {
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(part.data() + (p * B + b) * n + j0, acc.data() + b * len, len * sizeof(float));
    }
  });
  if (rp > 1) {
    for (int64_t p = 1; p < rp; ++p)
      for (int64_t i = 0; i < B * n; ++i) part[i] += part[p * B * n + i];
    finish(0, n, part.data());  // part[0 .. B*n) is [B, n]
  }
}

void check_weight(const at::Tensor& wt) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), "WT must be a contiguous [in, out] tensor");
  TORCH_CHECK(wt.device().is_cpu(), "WT must be on the CPU");
  TORCH_CHECK(wt.scalar_type() == at::kFloat || wt.scalar_type() == at::kBFloat16, "WT must be float32 or bfloat16");
}

void check_input(const at::Tensor& x, const at::Tensor& wt) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [B, in] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x.size(1) == wt.size(0), "x has ", x.size(1), " channels, WT has ", wt.size(0), " rows");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "the CPU sparse kernel takes 1..8 tokens, got ", x.size(0));
}

// Selection for every token: kind 0 = Top-K (param = k), 1 = threshold (param = thr).
void select_all(const at::Tensor& x, int kind, double param, std::vector<std::vector<int32_t>>& sel,
                std::vector<std::vector<float>>& val) {
  const int64_t B = x.size(0), d = x.size(1);
  sel.assign(B, {});
  val.assign(B, {});
  std::vector<float> xr(d);
  std::vector<uint32_t> keys, cand;
  for (int64_t b = 0; b < B; ++b) {
    if (x.scalar_type() == at::kBFloat16)
      load_row(reinterpret_cast<const uint16_t*>(x.data_ptr()) + b * d, d, xr.data());
    else
      load_row(x.data_ptr<float>() + b * d, d, xr.data());
    auto& s = sel[b];
    s.reserve(kind == 0 ? static_cast<size_t>(std::min<int64_t>(d, static_cast<int64_t>(param))) : d);
    if (kind == 0 && static_cast<int64_t>(param) >= d) {
      s.resize(d);
      for (int64_t i = 0; i < d; ++i) s[i] = static_cast<int32_t>(i);
      val[b] = xr;
      continue;
    }
    if (kind == 0)
      topk_row(xr.data(), d, static_cast<int64_t>(param), keys, cand, s);
    else
      threshold_row(xr.data(), d, static_cast<float>(param), s);
    auto& v = val[b];
    v.resize(s.size());
    for (size_t j = 0; j < s.size(); ++j) v[j] = xr[s[j]];
  }
}

at::Tensor gemv_from_selection(const std::vector<std::vector<int32_t>>& sel, const std::vector<std::vector<float>>& val,
                               const at::Tensor& wt, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const int64_t B = static_cast<int64_t>(sel.size()), d = wt.size(0), n = wt.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n && bias->is_contiguous(), "bias must be contiguous [out]");
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, "bias dtype");
  }
  std::vector<int32_t> rows;
  std::vector<float> vals;
  build_union(sel, val, d, rows, vals);
  at::Tensor y = at::empty({B, n}, wt.options().dtype(out_dtype));
  if (wt.scalar_type() == at::kBFloat16)
    run_gemv(reinterpret_cast<const uint16_t*>(wt.data_ptr()), n, rows, vals, B, bias, y);
  else
    run_gemv(wt.data_ptr<float>(), n, rows, vals, B, bias, y);
  return y;
}

// ---- operators -------------------------------------------------------------------------------

at::Tensor topk_gemv(const at::Tensor& x, const at::Tensor& wt, int64_t k, const std::optional<at::Tensor>& bias) {
  check_weight(wt);
  check_input(x, wt);
  std::vector<std::vector<int32_t>> sel;
  std::vector<std::vector<float>> val;
  select_all(x, 0, static_cast<double>(k), sel, val);
  return gemv_from_selection(sel, val, wt, bias, x.scalar_type());
}

at::Tensor threshold_gemv(const at::Tensor& x, const at::Tensor& wt, double thr, const std::optional<at::Tensor>& bias) {
  check_weight(wt);
  check_input(x, wt);
  std::vector<std::vector<int32_t>> sel;
  std::vector<std::vector<float>> val;
  select_all(x, 1, thr, sel, val);
  return gemv_from_selection(sel, val, wt, bias, x.scalar_type());
}

// Per-token indices [B, k] (any order, int64 or int32; duplicates add their values) and values [B, k]
// -> ascending kept channels + values per token.
void parse_indexed(const at::Tensor& idx, const at::Tensor& values, int64_t d, std::vector<std::vector<int32_t>>& sel,
                   std::vector<std::vector<float>>& val) {
  TORCH_CHECK(idx.dim() == 2 && values.sizes() == idx.sizes(), "indices and values must both be [B, k]");
  TORCH_CHECK(idx.size(0) >= 1 && idx.size(0) <= 8, "the CPU sparse kernel takes 1..8 tokens, got ", idx.size(0));
  const int64_t B = idx.size(0), k = idx.size(1);
  at::Tensor i64 = idx.to(at::kLong).contiguous();
  at::Tensor v32 = values.to(at::kFloat).contiguous();
  const int64_t* ip = i64.data_ptr<int64_t>();
  const float* vp = v32.data_ptr<float>();
  sel.assign(B, {});
  val.assign(B, {});
  std::vector<int32_t> order(k);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK(ip[b * k + j] >= 0 && ip[b * k + j] < d, "index ", ip[b * k + j], " out of range [0, ", d, ")");
      order[j] = static_cast<int32_t>(j);
    }
    bool sorted = true;
    for (int64_t j = 1; j < k && sorted; ++j) sorted = ip[b * k + j - 1] < ip[b * k + j];
    if (!sorted)
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return ip[b * k + a] < ip[b * k + c]; });
    for (int64_t j = 0; j < k; ++j) {
      const int32_t i = static_cast<int32_t>(ip[b * k + order[j]]);
      if (!sel[b].empty() && sel[b].back() == i) {  // duplicate index: add the values
        val[b].back() += vp[b * k + order[j]];
        continue;
      }
      sel[b].push_back(i);
      val[b].push_back(vp[b * k + order[j]]);
    }
  }
}

// Given per-token indices [B, k] (any order, int64 or int32) and values [B, k].
at::Tensor indexed_gemv(const at::Tensor& idx, const at::Tensor& values, const at::Tensor& wt,
                        const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_weight(wt);
  std::vector<std::vector<int32_t>> sel;
  std::vector<std::vector<float>> val;
  parse_indexed(idx, values, wt.size(0), sel, val);
  return gemv_from_selection(sel, val, wt, bias, out_dtype);
}

// Top-K selection only: (indices [B, k] int64 sorted ascending, values [B, k] fp32).
std::tuple<at::Tensor, at::Tensor> topk_select(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [B, D] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t B = x.size(0), d = x.size(1);
  const int64_t kk = std::max<int64_t>(0, std::min(k, d));
  at::Tensor idx = at::empty({B, kk}, x.options().dtype(at::kLong));
  at::Tensor vals = at::empty({B, kk}, x.options().dtype(at::kFloat));
  std::vector<float> xr(d);
  std::vector<uint32_t> keys, cand;
  std::vector<int32_t> s;
  int64_t* ip = idx.data_ptr<int64_t>();
  float* vp = vals.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (x.scalar_type() == at::kBFloat16)
      load_row(reinterpret_cast<const uint16_t*>(x.data_ptr()) + b * d, d, xr.data());
    else
      load_row(x.data_ptr<float>() + b * d, d, xr.data());
    s.clear();
    topk_row(xr.data(), d, kk, keys, cand, s);
    for (int64_t j = 0; j < kk; ++j) {
      ip[b * kk + j] = s[j];
      vp[b * kk + j] = xr[s[j]];
    }
  }
  return {idx, vals};
}


// ---- sparse int8 GEMV (W8A8 after Top-K) -----------------------------------------------------
//
//   y[b, j] = sa_b * dw_j * (sum_{i in S_b} qa[b, i] * (c[i, j] - z_j)) (+ bias_j)
//
// qa = per-token symmetric activation codes of the kept values v_i = x_i / s_i (s: optional smoothing
// divisor), scale sa_b = max_i |v_i| / qmax over the kept values, qa = clamp(rne(v / sa), -qmax, qmax);
// c = int8 weight codes, stored transposed as u = c + 128 (uint8 [in, out]) so that a kept channel is
// one contiguous row and the u8 x s8 VNNI dot product (vpdpbusd) applies with the weight as the unsigned
// operand: sum qa * u = sum qa * c + 128 * sum qa, so the offset is removed with one per-token sum
// (zc_j = 128 + z_j, z_j = the zero point in code units; 0 for symmetric weights).
// vpdpbusd sums 4 consecutive bytes of each 32-bit lane, so four kept rows are interleaved in
// registers (two unpack stages); up to four such interleaves (16 rows) are added into the accumulator
// registers per load/store of it (int8_pass); the accumulator of each 64-column chunk is kept in that
// lane order and put back in column order in the epilogue.  Accumulation is exact in int32 (|sum| <= 255 * 127 * in).

inline float quantize_values(const float* v, int64_t n, int qmax, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  float scale = amax / static_cast<float>(qmax);
  if (!(scale >= 1e-10f)) scale = 1e-10f;
  for (int64_t i = 0; i < n; ++i) {
    float r = std::nearbyint(v[i] / scale);
    r = std::min(std::max(r, static_cast<float>(-qmax)), static_cast<float>(qmax));
    q[i] = static_cast<int8_t>(r);
  }
  return scale;
}

// One pass over G consecutive 4-row groups (4G kept rows, rg; qp[g*B + b] packs the four activation codes
// of group g, token b, byte r = row 4g + r) for columns [j0, j0 + len): acc[b*len + ...] += their sums.
// Each 64-column chunk loads the accumulator once, adds all G interleaves (vpdpbusd into the same
// registers) and stores it once, so the int32 accumulator (4 bytes per column) is read and written once
// per 4G rows instead of once per 4: at G = 1 accumulator traffic equals weight traffic.  nx: the next npf
// rows (a multiple of 4, <= 4G), prefetched at the same column offset, one line per row per chunk (g_prefetch
// rows), or, when they are a whole pass of 4G, where this pass's rows end (g_prefetch ahead, as gemv_group_dot;
// the joint model's step on the 7B stack 1-4.6 % faster in five of six processes, docs/runtime.md "Session 43").
template <int B, int G>
inline void int8_pass(const uint8_t* __restrict wt, int64_t n, const int32_t* rg, const uint32_t* qp,
                      const int32_t* nx, int npf, int64_t j0, int64_t len, int32_t* __restrict acc) {
  const uint8_t* w[4 * G];
  const uint8_t* p[4 * G];
  for (int r = 0; r < 4 * G; ++r) {
    w[r] = wt + static_cast<int64_t>(rg[r]) * n + j0;
    p[r] = r < npf ? wt + static_cast<int64_t>(nx[r]) * n + j0 : w[r];
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const int64_t full = len / 64 * 64;
  __m512i qb[G][B];
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < B; ++b) qb[g][b] = _mm512_set1_epi32(static_cast<int32_t>(qp[g * B + b]));
  for (int64_t c = 0; c < full; c += 64) {
    if (g_prefetch_rows)
      for (int r = 0; r < npf; ++r) _mm_prefetch(reinterpret_cast<const char*>(p[r] + c), _MM_HINT_T0);
    if (g_prefetch_ahead) prefetch_ahead<4 * G>(w, npf == 4 * G ? p : nullptr, c + ROW_AHEAD, full);
    __m512i e[G][4];
    for (int g = 0; g < G; ++g) {
      const __m512i r0 = _mm512_loadu_si512(w[4 * g] + c), r1 = _mm512_loadu_si512(w[4 * g + 1] + c);
      const __m512i r2 = _mm512_loadu_si512(w[4 * g + 2] + c), r3 = _mm512_loadu_si512(w[4 * g + 3] + c);
      const __m512i a = _mm512_unpacklo_epi8(r0, r1), bb = _mm512_unpackhi_epi8(r0, r1);
      const __m512i cc = _mm512_unpacklo_epi8(r2, r3), d = _mm512_unpackhi_epi8(r2, r3);
      e[g][0] = _mm512_unpacklo_epi16(a, cc);
      e[g][1] = _mm512_unpackhi_epi16(a, cc);
      e[g][2] = _mm512_unpacklo_epi16(bb, d);
      e[g][3] = _mm512_unpackhi_epi16(bb, d);
    }
    for (int b = 0; b < B; ++b) {
      int32_t* ac = acc + b * len + c;
      __m512i s0 = _mm512_loadu_si512(ac), s1 = _mm512_loadu_si512(ac + 16);
      __m512i s2 = _mm512_loadu_si512(ac + 32), s3 = _mm512_loadu_si512(ac + 48);
      for (int g = 0; g < G; ++g) {
        s0 = _mm512_dpbusd_epi32(s0, e[g][0], qb[g][b]);
        s1 = _mm512_dpbusd_epi32(s1, e[g][1], qb[g][b]);
        s2 = _mm512_dpbusd_epi32(s2, e[g][2], qb[g][b]);
        s3 = _mm512_dpbusd_epi32(s3, e[g][3], qb[g][b]);
      }
      _mm512_storeu_si512(ac, s0);
      _mm512_storeu_si512(ac + 16, s1);
      _mm512_storeu_si512(ac + 32, s2);
      _mm512_storeu_si512(ac + 48, s3);
    }
  }
  const int64_t tail0 = full;
#else
  (void)p;
  const int64_t tail0 = 0;  // no VNNI: every column in natural order (the epilogue is told so)
#endif
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < B; ++b) {
      const uint32_t q4 = qp[g * B + b];
      const int32_t q0 = static_cast<int8_t>(q4 & 0xff), q1 = static_cast<int8_t>((q4 >> 8) & 0xff);
      const int32_t q2 = static_cast<int8_t>((q4 >> 16) & 0xff), q3 = static_cast<int8_t>(q4 >> 24);
      const uint8_t *w0 = w[4 * g], *w1 = w[4 * g + 1], *w2 = w[4 * g + 2], *w3 = w[4 * g + 3];
      int32_t* ac = acc + b * len;
      for (int64_t j = tail0; j < len; ++j) ac[j] += q0 * w0[j] + q1 * w1[j] + q2 * w2[j] + q3 * w3[j];
    }
}

// Groups of 4 kept rows per VNNI interleave (rows padded to a multiple of 4, padding rows carry code 0),
// walked G interleaves per pass (see int8_pass), then the remaining groups one at a time; each pass
// prefetches the next pass's rows (g_prefetch rows: along with its own; ahead: where its own end, full passes only).
template <int B, int G>
void int8_walk(const uint8_t* __restrict wt, int64_t n, const int32_t* rows, const uint32_t* qp, int64_t ngroups,
               int64_t j0, int64_t len, int32_t* __restrict acc) {
  int64_t g = 0;
  for (; g + G <= ngroups; g += G) {
    const int npf = static_cast<int>(std::min<int64_t>(G, ngroups - g - G)) * 4;
    int8_pass<B, G>(wt, n, rows + 4 * g, qp + g * B, rows + 4 * (g + G), npf, j0, len, acc);
  }
  if constexpr (G > 1) {
    for (; g < ngroups; ++g) {
      const int npf = g_prefetch_rows && g + 1 < ngroups ? 4 : 0;
      int8_pass<B, 1>(wt, n, rows + 4 * g, qp + g * B, rows + 4 * (g + 1), npf, j0, len, acc);
    }
  }
}

// Interleaves per pass: at one token always several (kInt8Groups: 16 kept rows per pass); at more tokens
// several only when the accumulator [B, len] int32 is larger than kInt8L1Acc bytes, i.e. does not stay in L1
// and every load/store of it goes to L2 (gate/up: 11008 columns, 43 KB).  A 4096-column accumulator (16 KB)
// stays in L1, and there 16 rows per pass once measured 9-13 % slower than 4 on the down projection
// (docs/sparse_int8.md "Kernel"); since the rows are prefetched ahead on AMD (g_prefetch), one token's 16 rows
// per pass are the faster walk there: 11-13 % per GEMV with 4096 outputs, and the joint model's decode step on
// the 7B stack 13-20 % faster (docs/runtime.md "W4A16 at decode (session 42)").  More tokens: unmeasured, as before.
#ifndef MMC_INT8_GROUPS
#define MMC_INT8_GROUPS 4
#endif
#ifndef MMC_INT8_L1_ACC
#define MMC_INT8_L1_ACC 32768
#endif
template <int B>
constexpr int kInt8Groups = B == 1 ? MMC_INT8_GROUPS : (B <= 4 ? 2 : 1);
constexpr int64_t kInt8L1Acc = MMC_INT8_L1_ACC;

template <int B>
void int8_block(const uint8_t* __restrict wt, int64_t n, const int32_t* rows, const uint32_t* qp, int64_t ngroups,
                int64_t j0, int64_t j1, int32_t* __restrict acc) {
  const int64_t len = j1 - j0;
  if (B == 1 || B * len * static_cast<int64_t>(sizeof(int32_t)) > kInt8L1Acc)
    int8_walk<B, kInt8Groups<B>>(wt, n, rows, qp, ngroups, j0, len, acc);
  else
    int8_walk<B, 1>(wt, n, rows, qp, ngroups, j0, len, acc);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kInt8Permuted = true;
#else
constexpr bool kInt8Permuted = false;
#endif

// Rows kept by one or more tokens (ascending) and their codes qr [nrows, B] -> rows padded to a multiple of
// 4 (padding rows repeat rows[0] and carry code 0) and qp[g*B + b] = the four codes of group g, token b
// (byte r = row 4g + r), as int8_block reads them.  Returns the number of groups.
inline int64_t pack_groups(std::vector<int32_t>& rows, const int8_t* qr, int64_t B, std::vector<uint32_t>& qp) {
  const int64_t nr = static_cast<int64_t>(rows.size());
  const int64_t ngroups = (nr + 3) / 4;
  const int32_t pad_row = nr > 0 ? rows[0] : 0;
  rows.resize(ngroups * 4, pad_row);
  qp.assign(ngroups * B, 0u);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t b = 0; b < B; ++b)
      qp[(r / 4) * B + b] |= static_cast<uint32_t>(static_cast<uint8_t>(qr[r * B + b])) << (8 * (r % 4));
  return ngroups;
}

// One token's int32 sums a (int8_block's order: its full 64-column chunks in lane order, then the tail in
// column order) of columns [j0, j0 + len) -> out[j] = (a_j - zc_j * qsum) * (sa * dw_j), before the bias.
inline void int8_dequant(const int32_t* a, int64_t j0, int64_t len, const int32_t* zp, int32_t qsum, float sa,
                         const float* dw, float* out) {
  const int64_t full = kInt8Permuted ? len / 64 * 64 : 0;
  // column 16L + 4m + i of a 64-column chunk sits at 16m + 4L + i
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // the same arithmetic 16 columns at a time: a 4x4 transpose of the chunk's 128-bit lanes puts them back
  // in column order; then (a - zc * qsum) -> float, times the float product sa * dw (two roundings, no FMA)
  const __m512i vq = _mm512_set1_epi32(qsum);
  const __m512 vsa = _mm512_set1_ps(sa);
  for (int64_t c = 0; c < full; c += 64) {
    const __m512i s0 = _mm512_loadu_si512(a + c), s1 = _mm512_loadu_si512(a + c + 16);
    const __m512i s2 = _mm512_loadu_si512(a + c + 32), s3 = _mm512_loadu_si512(a + c + 48);
    const __m512i t0 = _mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t1 = _mm512_shuffle_i32x4(s2, s3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t2 = _mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i t3 = _mm512_shuffle_i32x4(s2, s3, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i o[4] = {_mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)),
                          _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1))};
    for (int L = 0; L < 4; ++L) {
      const int64_t j = c + 16 * L;
      const __m512i v = _mm512_sub_epi32(o[L], _mm512_mullo_epi32(_mm512_loadu_si512(zp + j0 + j), vq));
      const __m512 sc = _mm512_mul_ps(vsa, _mm512_loadu_ps(dw + j0 + j));
      _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_cvtepi32_ps(v), sc));
    }
  }
  for (int64_t j = full; j < len; ++j) out[j] = static_cast<float>(a[j] - zp[j0 + j] * qsum) * (sa * dw[j0 + j]);
#else
  for (int64_t c = 0; c < full; c += 64)
    for (int m = 0; m < 4; ++m)
      for (int L = 0; L < 4; ++L)
        for (int i = 0; i < 4; ++i) {
          const int64_t j = c + 16 * L + 4 * m + i;
          out[j] = static_cast<float>(a[c + 16 * m + 4 * L + i] - zp[j0 + j] * qsum);
        }
  for (int64_t j = full; j < len; ++j) out[j] = static_cast<float>(a[j] - zp[j0 + j] * qsum);
  for (int64_t j = 0; j < len; ++j) out[j] = out[j] * (sa * dw[j0 + j]);
#endif
}

using int8_fn = void (*)(const uint8_t*, int64_t, const int32_t*, const uint32_t*, int64_t, int64_t, int64_t, int32_t*);

int8_fn pick_int8(int64_t B) {
  switch (B) {
    case 1: return int8_block<1>;
    case 2: return int8_block<2>;
    case 3: return int8_block<3>;
    case 4: return int8_block<4>;
    case 5: return int8_block<5>;
    case 6: return int8_block<6>;
    case 7: return int8_block<7>;
    default: return int8_block<8>;
  }
}

void check_int8_weight(const at::Tensor& wq, const at::Tensor& wscale, const at::Tensor& zc) {
  TORCH_CHECK(wq.dim() == 2 && wq.is_contiguous() && wq.device().is_cpu() && wq.scalar_type() == at::kByte,
              "WQ must be a contiguous CPU uint8 [in, out] tensor (codes + 128)");
  const int64_t n = wq.size(1);
  TORCH_CHECK(wscale.dim() == 1 && wscale.numel() == n && wscale.is_contiguous() && wscale.scalar_type() == at::kFloat,
              "weight scale must be contiguous float32 [out]");
  TORCH_CHECK(zc.dim() == 1 && zc.numel() == n && zc.is_contiguous() && zc.scalar_type() == at::kInt,
              "zero correction must be contiguous int32 [out] (128 + zero point)");
}

// Per-token kept channels + float values -> y.  smooth: optional divisor [in].
at::Tensor int8_from_selection(std::vector<std::vector<int32_t>>& sel, std::vector<std::vector<float>>& val,
                               const at::Tensor& wq, const at::Tensor& wscale, const at::Tensor& zc,
                               const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& bias,
                               int64_t abits, at::ScalarType out_dtype) {
  check_int8_weight(wq, wscale, zc);
  TORCH_CHECK(abits >= 2 && abits <= 8, "activation bits must be 2..8, got ", abits);
  const int64_t B = static_cast<int64_t>(sel.size()), d = wq.size(0), n = wq.size(1);
  const int qmax = (1 << (abits - 1)) - 1;
  if (smooth.has_value()) {
    TORCH_CHECK(smooth->dim() == 1 && smooth->numel() == d && smooth->is_contiguous() &&
                smooth->scalar_type() == at::kFloat, "smoothing must be contiguous float32 [in]");
    const float* sp = smooth->data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (size_t j = 0; j < sel[b].size(); ++j) val[b][j] = val[b][j] / sp[sel[b][j]];
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n && bias->is_contiguous(), "bias must be contiguous [out]");
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, "bias dtype");
  }
  // activation codes per token, then the union of rows (padded to a multiple of 4) with packed codes
  std::vector<float> sa(B);
  std::vector<int32_t> qsum(B, 0);
  std::vector<std::vector<int8_t>> q(B);
  for (int64_t b = 0; b < B; ++b) {
    q[b].resize(sel[b].size());
    sa[b] = quantize_values(val[b].data(), static_cast<int64_t>(val[b].size()), qmax, q[b].data());
    for (int8_t v : q[b]) qsum[b] += v;
  }
  std::vector<int32_t> rows;
  std::vector<int8_t> qr;  // [nrows, B]
  build_union(sel, q, d, rows, qr);
  std::vector<uint32_t> qp;
  const int64_t ngroups = pack_groups(rows, qr.data(), B, qp);

  at::Tensor y = at::empty({B, n}, wq.options().dtype(out_dtype));
  const int nt = std::max<int>(1, at::get_num_threads());
  // Work split: rp row parts (split-K: each thread streams whole kept rows, the partial int32 sums are
  // added at the end) x cb column blocks (64-aligned).  Longer contiguous runs per kept row help the
  // hardware prefetcher; see set_row_split.
  const int64_t rp = std::max<int64_t>(1, std::min<int64_t>(row_split_parts(nt), std::max<int64_t>(1, ngroups)));
  const int64_t cb = (nt + rp - 1) / rp;
  int64_t blk = (n + cb - 1) / cb;
  blk = std::max<int64_t>(64, (blk + 63) / 64 * 64);
  const int64_t nblocks = (n + blk - 1) / blk;
  auto fn = pick_int8(B);
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const float* dw = wscale.data_ptr<float>();
  const int32_t* zp = zc.data_ptr<int32_t>();
  const bool out_bf16 = out_dtype == at::kBFloat16;
  TORCH_CHECK(out_bf16 || out_dtype == at::kFloat, "output dtype must be float32 or bfloat16");
  const bool bias_bf16 = bias.has_value() && bias->scalar_type() == at::kBFloat16;
  const void* bptr = bias.has_value() ? bias->data_ptr() : nullptr;
  void* yptr = y.data_ptr();
  // Partial int32 sums of row part p: part[(p * B + b) * n + j] (chunk lane order within each column block).
  // Not zero-filled here: every task clears its own slice.  At batch 1, or with one column block, a task's
  // [B, len] accumulator is that slice itself (no scratch copy).
  const bool direct = B == 1 || nblocks == 1;
  std::unique_ptr<int32_t[]> part(new int32_t[static_cast<size_t>(rp * B * n)]);
  // sums a[b * lda + (j - j0)] of column block t -> y (undo the lane order, scale, bias, output dtype)
  auto epilogue = [&](int64_t t, const int32_t* a, int64_t lda) {
    const int64_t j0 = t * blk, j1 = std::min(n, j0 + blk), len = j1 - j0;
    std::unique_ptr<float[]> out(new float[len]);
    for (int64_t b = 0; b < B; ++b) {
      int8_dequant(a + b * lda, j0, len, zp, qsum[b], sa[b], dw, out.get());
      for (int64_t j = 0; j < len; ++j) {
        float v = out[j];
        if (bptr)
          v += bias_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(bptr)[j0 + j])
                         : static_cast<const float*>(bptr)[j0 + j];
        if (out_bf16)
          static_cast<uint16_t*>(yptr)[b * n + j0 + j] = f32_to_bf16(v);
        else
          static_cast<float*>(yptr)[b * n + j0 + j] = v;
      }
    }
  };
  parallel_tasks<int32_t>(rp, blk, n, nt, [&](int64_t p, int64_t t, int64_t j0, int64_t j1, std::vector<int32_t>& acc) {
    const int64_t len = j1 - j0, g0 = ngroups * p / rp, g1 = ngroups * (p + 1) / rp;
    int32_t* slice = part.get() + p * B * n + j0;  // token b's columns at slice + b * n
    int32_t* a = slice;
    if (direct) {
      std::fill(a, a + B * len, 0);
    } else {
      acc.assign(B * len, 0);
      a = acc.data();
    }
    fn(wp, n, rows.data() + 4 * g0, qp.data() + g0 * B, g1 - g0, j0, j1, a);
    if (rp == 1) {
      epilogue(t, a, len);
    } else if (!direct) {
      for (int64_t b = 0; b < B; ++b) std::memcpy(slice + b * n, a + b * len, len * sizeof(int32_t));
    }
  });
  if (rp > 1) {  // add the row parts into part 0, then the epilogue of every column block
    int32_t* p0 = part.get();
    for (int64_t p = 1; p < rp; ++p) {
      const int32_t* q = part.get() + p * B * n;
      for (int64_t i = 0; i < B * n; ++i) p0[i] += q[i];
    }
    for (int64_t t = 0; t < nblocks; ++t) epilogue(t, p0 + t * blk, n);
  }
  return y;
}

at::Tensor topk_int8_gemv(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wscale, const at::Tensor& zc,
                          int64_t k, const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& bias,
                          int64_t abits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [B, in] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x.size(1) == wq.size(0), "x has ", x.size(1), " channels, WQ has ", wq.size(0), " rows");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "the CPU sparse kernel takes 1..8 tokens, got ", x.size(0));
  std::vector<std::vector<int32_t>> sel;
  std::vector<std::vector<float>> val;
  select_all(x, 0, static_cast<double>(k), sel, val);
  return int8_from_selection(sel, val, wq, wscale, zc, smooth, bias, abits, x.scalar_type());
}

// Given per-token indices [B, k] (any order; duplicates add their values) and values [B, k].
at::Tensor indexed_int8_gemv(const at::Tensor& idx, const at::Tensor& values, const at::Tensor& wq,
                             const at::Tensor& wscale, const at::Tensor& zc, const std::optional<at::Tensor>& smooth,
                             const std::optional<at::Tensor>& bias, int64_t abits, at::ScalarType out_dtype) {
  check_int8_weight(wq, wscale, zc);
  std::vector<std::vector<int32_t>> sel;
  std::vector<std::vector<float>> val;
  parse_indexed(idx, values, wq.size(0), sel, val);
  return int8_from_selection(sel, val, wq, wscale, zc, smooth, bias, abits, out_dtype);
}

}  // namespace

#ifndef MMCOMPRESS_SPARSE_GEMV_KERNELS_ONLY  // fused_step.cpp includes the kernels without the ops
TORCH_LIBRARY(mmcompress_sparse, m) {
  m.def("topk_gemv(Tensor x, Tensor wt, int k, Tensor? bias=None) -> Tensor");
  m.def("threshold_gemv(Tensor x, Tensor wt, float thr, Tensor? bias=None) -> Tensor");
  m.def("indexed_gemv(Tensor idx, Tensor values, Tensor wt, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("topk_select(Tensor x, int k) -> (Tensor, Tensor)");
  m.def("set_row_split(int parts) -> int", &set_row_split);  // no tensor: a catch-all kernel
  m.def("topk_int8_gemv(Tensor x, Tensor wq, Tensor wscale, Tensor zc, int k, Tensor? smooth, Tensor? bias, int abits) -> Tensor");
  m.def("indexed_int8_gemv(Tensor idx, Tensor values, Tensor wq, Tensor wscale, Tensor zc, Tensor? smooth, Tensor? bias, int abits, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmcompress_sparse, CPU, m) {
  m.impl("topk_gemv", &topk_gemv);
  m.impl("threshold_gemv", &threshold_gemv);
  m.impl("indexed_gemv", &indexed_gemv);
  m.impl("topk_select", &topk_select);
  m.impl("topk_int8_gemv", &topk_int8_gemv);
  m.impl("indexed_int8_gemv", &indexed_int8_gemv);
}
#endif  // MMCOMPRESS_SPARSE_GEMV_KERNELS_ONLY
