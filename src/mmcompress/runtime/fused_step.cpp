// One decode step of a Llama-family decoder (Llama, Qwen2, Mistral without sliding window) in one C++
// call: embedding row, per layer RMSNorm -> q/k/v -> RoPE -> K/V into the static cache -> attention
// (GQA) -> o_proj -> residual -> RMSNorm -> gate/up -> SiLU * up -> down -> residual, final norm, LM head.
//
// The arithmetic is the Python fast path's (runtime/decode.py), op for op: every intermediate is rounded
// to the model dtype where the torch ops round it (bf16 models: after each elementwise op, each linear,
// the attention output), so the logits agree with it to float round-off.  Linears:
//   kind 0  dense weight (fp32 or bf16; a bf16 weight in an fp32 model is the reduced LM head of
//           runtime/fused.py): the AVX-512 GEMV below (fp32 sums);
//   kind 1  deployed W8A8/W4A8/...: the activation quantizer and the int8-activation tiles of
//           quant/kernels/int_gemm.cpp (the deployed IntLinear's own kernel code, included below);
//   kind 2  weight-only on float activations: int_gemm.cpp's float tiles;
//   kind 3  weight-only int4 on bf16 activations: int_gemm.cpp's bf16 tiles.
//   kind 4  float weight stored input-channel-major WT [K, N] (LaRoSA's SparseLinear, and a residual
//           adapter in the kernel layout) behind a per-token Top-K of its input (keep < K; keep = K:
//           dense): the channels of sparse/kernels/sparse_gemv.cpp's selection (topk_row: exactly keep
//           channels, ties to the lowest index, as sparse/topk.py), selected by topk_select (below, the
//           same radix select in AVX-512), and that file's row-group GEMV (gemv_block) on the kept rows;
//           or (TEAL's SparseLinear, mode "threshold") behind a fixed magnitude threshold t instead: keep
//           channel i iff !(|x_i| < t) (sparse_gemv.cpp's threshold_row, the Python step's kernel: |x| >= t
//           in fp32, NaN kept), a variable number of kept rows per token (threshold_select, below);
//   kind 5  LaRoSA + W8A8 (SparseInt8Linear): the same Top-K, per-token int8 codes of the kept values
//           (divided by the fp32 smoothing row if any; quantize_values), uint8 codes + 128 [K, N] walked
//           four kept rows at a time with VNNI (int8_block: a unit's accumulator of <= MAXCOLS columns stays
//           in L1, so one interleave per pass; exact int32 sums), int8_dequant's epilogue.
// Kinds 4 and 5 are the deployed modules' own kernel code (sparse_gemv.cpp is included below), so one
// unit of 64 output columns computes exactly what those kernels compute for the same columns.
// A smoothing row divides the input first (in the model dtype), as IntLinear does; linears that read
// the same smoothed input (q/k/v, gate/up) quantize it once (flag "share"; kinds 4 and 5: one Top-K
// selection and, kind 5, one set of activation codes; a shared threshold selection needs the same t).
//
// LaRoSA's residual adapter (r <- r A after a layer, ResidualAdaptedLayer) is one more phase at the end
// of that layer: a linear on the residual stream (kind 4 dense, or a kind 0/2 linear) whose output
// replaces the stream.
//
// Threads: the whole step is ONE OpenMP parallel region (not one per op).  Per layer five phases,
// separated by a barrier (`phase_barrier`, below): q/k/v, attention (heads), o_proj, gate/up (+ SiLU * up), down (and the
// residual adapter, if the layer has one); then the LM head.  Within a phase the threads take 64-row units (attention: heads) from an atomic counter of
// that phase, so a descheduled thread does not hold a fixed share.  What every thread needs whole — the
// residual stream, the norms, the smoothing and activation quantization of a linear's input — each
// thread computes itself into its own buffers (a few microseconds; identical values on every thread),
// which saves a barrier per op.
//
// A plan (the model's tensors, shapes and the engine's K/V caches, all by reference) is made once by
// fused_plan() and stepped by fused_step(plan, token, pos) -> logits [1, V] in the model dtype.
// fused_set_profile / fused_profile: per-phase time of thread 0 (its own small ops, its row units, its
// wait at the barrier), for docs/runtime.md's profile (benchmarks/decode_profile.py).
// Registered as torch.ops.mmcompress_fused.* (built like the other kernels: runtime/fused.py).

#define MMCOMPRESS_INT_GEMM_KERNELS_ONLY
#include "../quant/kernels/int_gemm.cpp"  // int_tile, float_tile, bf16_tile, quantize_rows (anonymous namespace)
#define MMCOMPRESS_SPARSE_GEMV_KERNELS_ONLY
#include "../sparse/kernels/sparse_gemv.cpp"  // topk_row, gemv_block, quantize_values, pack_groups, int8_block, int8_dequant

#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <thread>

namespace {

inline float to_bf16_value(float f) { return static_cast<float>(c10::BFloat16(f)); }
inline uint16_t bf16_bits(float f) { return c10::BFloat16(f).x; }

struct Lin {
  int64_t kind = 0, bits = 8, group = 0, abits = 8, N = 0, K = 0, G = 1, gs = 0, keep = 0;
  int64_t cols = 64;  // output features per work unit (kinds 4, 5: columns of WT; see fused_set_unit_cols)
  bool sym = true, share = false, wbf16 = false;  // wbf16: a kind-0 or kind-4 weight stored as bf16
  bool tiled = false;   // kinds 1-3: codes tiled [N/8, C/64, 8, 64], C = bytes per row (int_gemm.cpp)
  bool thresh = false;  // kind 4: keep |x| >= thr (TEAL) instead of the Top-K of keep channels
  float thr = 0.f;
  at::Tensor w, scale, zero;   // w: dense weight [N, K], packed codes, or (kinds 4, 5) WT [K, N]
  std::vector<float> bias;     // empty: none (values of the model dtype)
  std::vector<float> smooth;   // empty: none (values of the model dtype; kind 5: the module's fp32 row)
};

struct Layer {
  std::vector<float> ln1, ln2;
  Lin q, k, v, o, gate, up, down;
  bool has_adapt = false;
  Lin adapt;          // LaRoSA's residual adapter r <- r A (N = K = H)
  at::Tensor kc, vc;  // [1, kv_heads, max_len, head_dim], model dtype, contiguous
};

// One linear's input as its kernel wants it (per thread).
struct Input {
  std::vector<float> xs;       // smoothed input, fp32 (values of the model dtype)
  std::vector<float> xf;       // kind 2: fp32, in the int4 kernel's order
  std::vector<uint16_t> xb;    // kind 0 in a bf16 model: bf16 bits; kind 3: bf16 bits in its kernel's order
  std::vector<int8_t> xq;      // kind 1: codes, in the kernel's order
  std::vector<int32_t> xsi;    // kind 1: per-group sums of the codes
  std::vector<float> xsf;      // kinds 2, 3: per-group sums
  std::vector<c10::BFloat16> xt;  // kind 1 in a bf16 model: the quantizer's input
  std::vector<int8_t> xq0;     // kind 1: codes in natural order
  float sx = 1.f;
  // kinds 4, 5: the Top-K (sparse_gemv.cpp's topk_row) or threshold selection and what the kernels take
  std::vector<int32_t> rows;   // kept channels, ascending (kind 5: padded to a multiple of 4)
  std::vector<float> vals;     // their values (kind 5: divided by the smoothing row)
  std::vector<int8_t> qa;      // kind 5: activation codes of the kept values
  std::vector<uint32_t> qp;    // kind 5: the codes packed per group of four rows
  std::vector<uint32_t> keys, cand;  // topk_row's scratch
  int64_t ngroups = 0;
  int32_t qsum = 0;
  float sa = 1.f;
};

struct Local {  // one thread's buffers
  std::vector<float> h, x, y;
  std::vector<float> t;  // [H]: a residual linear's whole output, reduced by this thread (see own_reduce)
  Input prep[3];
  float qt[1024], kt[1024], acc[1024];
};

constexpr int NPHASE = 7;  // qkv, attention, o_proj, gate/up, down, head, residual adapter
constexpr int64_t UNIT = 64;    // output rows per work unit of the row-major kinds 0..3
constexpr int64_t MAXCOLS = 4096;  // the widest unit (kinds 4, 5)
constexpr int64_t DEFAULT_SPARSE_COLS = 256;  // docs/runtime.md: 1.4x faster than 64 on smollm2 joint, one thread

// Output columns per work unit of a sparse kind (4, 5) of N outputs on nt threads: about two units per thread,
// at least DEFAULT_SPARSE_COLS, at most MAXCOLS, a multiple of 64.  A unit streams a run of `cols` columns of
// every kept row of WT [K, N]; at 7B widths (N = 4096, 11008) 256-column runs (512 bytes of bf16, 256 of
// int8 codes) left the step's sparse GEMVs at half the Python step's speed (docs/runtime.md).
inline int64_t sparse_cols(int64_t N, int nt) {
  const int64_t want = (N + 2 * nt - 1) / (2 * nt);
  return std::min(MAXCOLS, std::max(DEFAULT_SPARSE_COLS, (want + 63) / 64 * 64));
}

// Split-K (session 33): a sparse phase's units are row parts instead — part p of `nparts` sums its range of
// the kept rows (kind 5: groups of four) over ALL N columns into its own partial [N] (sparse_part), the
// Python-stepped kernels' split (sparse_gemv.cpp run_gemv / int8_from_selection with rp = threads): each
// unit streams whole kept rows of WT, the longest contiguous runs the layout has.  A second phase, parallel
// over REDUCE_COLS-column units, adds the parts in order (p = 0, 1, ...) and applies the epilogue
// (sparse_reduce).  o_proj, down and the residual adapter, whose outputs every thread adds to its own residual
// stream, skip that sub-phase and its barrier (session 34, own_reduce): each thread adds all the parts itself,
// in the same order (fused_set_reduce(0) gives back the shared units).  The rule: split-K when every part gets
// at least SPLITK_MIN_ROWS kept rows, else the column units above (fused_set_split forces either, for
// measurements and tests).
constexpr int64_t REDUCE_COLS = 512;    // columns per reduction unit (a multiple of 64: int8 lane order)
constexpr int64_t SPLITK_MIN_ROWS = 16;
// Slots of partial sums (each [parts][pstride]): q/k/v 0..2, gate/up 0..1, o_proj 3, down 4 before a residual
// adapter (else 3), the adapter 3.  A residual linear reduced by every thread itself (own_reduce) ends
// without a barrier, so a fast thread may already write the next split-K phase's parts while a slow one
// still reads these: the slots are chosen so that a residual linear's never is the next phase's.
constexpr int64_t PSLOTS = 5;

struct Plan {
  int64_t H = 0, nh = 0, nkv = 0, hd = 0, L = 0, max_len = 0, V = 0, I = 0;
  bool bf16 = false;
  float eps = 1e-6f, scaling = 1.f;
  double qeps = 0.0;  // the activation quantizer's eps for the model dtype
  at::Tensor embed;   // [V, H] model dtype
  std::vector<float> norm, cos, sin;  // cos/sin [max_len, hd]
  Lin head;
  std::vector<Layer> layers;
  // shared between the threads of a step
  std::vector<float> q, k, v, a, g, t, t2;  // t: o_proj / down output; t2: the residual adapter's
  std::vector<float> scores;           // [nh, max_len]
  std::unique_ptr<std::atomic<int64_t>[]> next;  // one work counter per phase of a step
  alignas(64) std::atomic<int> bar_count{0};     // phase_barrier's arrivals
  alignas(64) std::atomic<int> bar_gen{0};       // and generation, each on its own cache line
  int64_t nphases = 0, nadapt = 0;
  std::vector<std::unique_ptr<Local>> local;
  // split-K of the sparse kinds (see sparse_part): the row parts' partial sums, [PSLOTS][parts][pstride]
  // (fp32 for kind 4, int32 for kind 5), allocated when the step first needs more parts, not per step
  int select_mode = 0;         // Top-K: 0 topk_select, 1 sparse_gemv.cpp's topk_row (fused_set_select)
  int own_reduce = 1;          // split-K residual linears reduced by every thread, no barrier (fused_set_reduce)
  int split_mode = 0;          // 0: per linear by splitk_rule; 1: output columns only; 2: split-K always
  int64_t parts_per_thread = 1;
  int64_t nparts_alloc = 0, pstride = 0;
  std::unique_ptr<int32_t[]> parts;
  // profile: [phase][own small ops, own units, barrier wait, own split-K reduction units] seconds of thread 0,
  // and steps
  bool profile = false;
  double prof[NPHASE][4] = {};
  int64_t prof_steps = 0;
  // trace (fused_set_trace): per layer, what thread 0 saw of the last step (see fused_trace)
  bool trace = false;
  std::vector<float> tr;
};

std::mutex g_mu;
std::vector<std::unique_ptr<Plan>> g_plans;

inline float rnd(const Plan& P, float v) { return P.bf16 ? to_bf16_value(v) : v; }

std::vector<float> floats(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {};
  at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// ---- dense GEMV rows: y[r] = sum_k W[n0 + r, k] x[k], W row-major in fp32 or bf16 -------------------

template <typename W>
inline __m512 load16(const W* p, __mmask16 m) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

template <typename W, int RR>
inline void gemv_rows(const W* w, const float* x, int64_t K, float* y) {
  __m512 acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    for (int r = 0; r < RR; ++r) acc[r] = _mm512_fmadd_ps(load16<W>(w + r * K + k, m), xv, acc[r]);
  }
  for (int r = 0; r < RR; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

#ifdef __AVX512BF16__
// bf16 weights times bf16 activations (a bf16 model's activations are bf16 values): VDPBF16PS, exact
// products, fp32 sums, 32 codes per instruction without widening
template <int RR>
inline void gemv_rows_bf16(const uint16_t* w, const uint16_t* x, int64_t K, float* y) {
  __m512 acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << (K - k)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
    for (int r = 0; r < RR; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * K + k), xv);
  }
  for (int r = 0; r < RR; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// ---- Top-K selection (session 34) ----------------------------------------------------------------

// The Top-K of one token's input x [d] by magnitude, exactly sparse_gemv.cpp's topk_row (keep k channels;
// key = |x| as the bits of a non-negative float, so NaN counts as largest; ties at the K-th key keep the
// lowest indices) and its kept values: rows ascending, vals[j] = x[rows[j]].  topk_row's radix pre-pass,
// in AVX-512: one pass for the keys (and their maximum, where the bin search starts), a 2048-bin histogram
// of the top 11 key bits, the K-th key's bin gathered with a compress; inside a bin of more than 256 keys
// two more histogram levels (bits 9..19, then 0..8) give the K-th key exactly instead of nth_element; the
// output pass compresses the indices and values of the kept lanes (no data-dependent branch per channel;
// ties at the threshold taken from the lowest lanes with pdep).  Each thread selects for itself (every
// thread needs the whole selection), so the selection is on the step's critical path: 16 per token on
// the 7B stack, 0.41-0.43 ms/token less than with topk_row there (docs/runtime.md, session 34).
void topk_select(const float* x, int64_t d, int64_t k, std::vector<uint32_t>& keyv, std::vector<uint32_t>& candv,
                 std::vector<int32_t>& rows, std::vector<float>& vals) {
  if (k >= d || k <= 0) {
    const int64_t n = k <= 0 ? 0 : d;
    rows.resize(n);
    vals.resize(n);
    for (int64_t i = 0; i < n; ++i) rows[i] = static_cast<int32_t>(i);
    if (n) std::memcpy(vals.data(), x, n * sizeof(float));
    return;
  }
  keyv.resize(d + 16);
  uint32_t* keys = keyv.data();
  uint32_t hist[2048];
  std::memset(hist, 0, sizeof(hist));
  const __m512i absm = _mm512_set1_epi32(0x7fffffff);
  __m512i vmax = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i < d; i += 16) {
    const __mmask16 m = d - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - i)) - 1);
    const __m512i kv = _mm512_and_si512(_mm512_maskz_loadu_epi32(m, x + i), absm);
    _mm512_mask_storeu_epi32(keys + i, m, kv);
    vmax = _mm512_max_epu32(vmax, kv);
  }
  for (i = 0; i + 4 <= d; i += 4) {
    hist[keys[i] >> 20]++;
    hist[keys[i + 1] >> 20]++;
    hist[keys[i + 2] >> 20]++;
    hist[keys[i + 3] >> 20]++;
  }
  for (; i < d; ++i) hist[keys[i] >> 20]++;
  int64_t above = 0;
  int bin = static_cast<int>(_mm512_reduce_max_epu32(vmax) >> 20);
  for (; bin >= 0; --bin) {
    if (above + hist[bin] >= k) break;
    above += hist[bin];
  }
  candv.resize(hist[bin] + 16);
  uint32_t* cand = candv.data();
  int64_t nc = 0;
  const __m512i vb = _mm512_set1_epi32(bin);
  for (i = 0; i < d; i += 16) {
    const __mmask16 m = d - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - i)) - 1);
    const __m512i kv = _mm512_maskz_loadu_epi32(m, keys + i);
    const __mmask16 e = _mm512_mask_cmpeq_epi32_mask(m, _mm512_srli_epi32(kv, 20), vb);
    _mm512_storeu_si512(cand + nc, _mm512_maskz_compress_epi32(e, kv));
    nc += __builtin_popcount(e);
  }
  const int64_t r = k - above;  // rank of the K-th key inside its bin (1-based, from the top)
  uint32_t tau;
  int64_t gt = above;
  if (nc > 256) {  // two more radix levels (bits 9..19, then 0..8) instead of nth_element on a big bin
    uint32_t h2[2048];
    std::memset(h2, 0, sizeof(h2));
    for (int64_t j = 0; j < nc; ++j) h2[(cand[j] >> 9) & 0x7ff]++;
    int b2 = 2047;
    for (; b2 >= 0; --b2) {
      if (gt + h2[b2] >= k) break;
      gt += h2[b2];
    }
    uint32_t h3[512];
    std::memset(h3, 0, sizeof(h3));
    for (int64_t j = 0; j < nc; ++j)
      if (((cand[j] >> 9) & 0x7ff) == static_cast<uint32_t>(b2)) h3[cand[j] & 0x1ff]++;
    int b3 = 511;
    for (; b3 >= 0; --b3) {
      if (gt + h3[b3] >= k) break;
      gt += h3[b3];
    }
    tau = (static_cast<uint32_t>(bin) << 20) | (static_cast<uint32_t>(b2) << 9) | static_cast<uint32_t>(b3);
  } else {
    std::nth_element(cand, cand + (r - 1), cand + nc, std::greater<uint32_t>());
    tau = cand[r - 1];
    for (int64_t j = 0; j < r - 1; ++j) gt += cand[j] > tau;  // elements before the pivot are >= tau
  }
  uint32_t ties = static_cast<uint32_t>(k - gt);
  rows.resize(k + 16);
  vals.resize(k + 16);
  int32_t* ro = rows.data();
  float* vo = vals.data();
  int64_t n = 0;
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(tau));
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  for (i = 0; i < d; i += 16, idx = _mm512_add_epi32(idx, sixteen)) {
    const __mmask16 m = d - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - i)) - 1);
    const __m512i kv = _mm512_maskz_loadu_epi32(m, keys + i);
    __mmask16 keep = _mm512_mask_cmpgt_epu32_mask(m, kv, vt);
    if (ties) {
      const uint32_t eq = _mm512_mask_cmpeq_epi32_mask(m, kv, vt);
      if (eq) {
        const uint32_t c = static_cast<uint32_t>(__builtin_popcount(eq));
        const uint32_t take = c <= ties ? eq : _pdep_u32((1u << ties) - 1, eq);
        ties -= c <= ties ? c : ties;
        keep |= static_cast<__mmask16>(take);
      }
    }
    _mm512_storeu_si512(ro + n, _mm512_maskz_compress_epi32(keep, idx));
    _mm512_storeu_ps(vo + n, _mm512_maskz_compress_ps(keep, _mm512_maskz_loadu_ps(m, x + i)));
    n += __builtin_popcount(keep);
  }
  rows.resize(n);
  vals.resize(n);
}

// TEAL's selection of one token's input x [d]: the channels with !(|x_i| < thr), i.e. |x_i| >= thr with NaN
// kept (sparse_gemv.cpp's threshold_row, which the Python step's threshold_gemv runs: the same comparison on
// the same fp32 values, the threshold rounded to float32 as there), ascending, with their values.  One pass:
// |x| (sign bit cleared), an unordered not-less-than compare, the kept lanes' indices and values compressed.
void threshold_select(const float* x, int64_t d, float thr, std::vector<int32_t>& rows, std::vector<float>& vals) {
  rows.resize(d + 16);
  vals.resize(d + 16);
  int32_t* ro = rows.data();
  float* vo = vals.data();
  int64_t n = 0;
  const __m512 vt = _mm512_set1_ps(thr);
  const __m512i absm = _mm512_set1_epi32(0x7fffffff);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  for (int64_t i = 0; i < d; i += 16, idx = _mm512_add_epi32(idx, sixteen)) {
    const __mmask16 m = d - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - i)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 av = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(xv), absm));
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, av, vt, _CMP_NLT_UQ);
    _mm512_storeu_si512(ro + n, _mm512_maskz_compress_epi32(keep, idx));
    _mm512_storeu_ps(vo + n, _mm512_maskz_compress_ps(keep, xv));
    n += __builtin_popcount(keep);
  }
  rows.resize(n);
  vals.resize(n);
}

// ---- a linear's input, per thread (the deployed linear's and its kernel's preparation, for one token)

void prepare(const Plan& P, const Lin& l, const float* x, Input& p) {
  const int64_t K = l.K;
  if (l.kind >= 4) {  // Top-K of x (exactly keep channels, ties to the lowest index; keep >= K: all)
    if (l.thresh) {  // TEAL: |x| >= thr, however many that is (kind 4 only)
      threshold_select(x, K, l.thr, p.rows, p.vals);
    } else if (P.select_mode == 0) {
      topk_select(x, K, l.keep, p.keys, p.cand, p.rows, p.vals);
    } else {  // fused_set_select(1): sparse_gemv.cpp's topk_row, then the values (the reference)
      p.rows.clear();
      topk_row(x, K, l.keep, p.keys, p.cand, p.rows);
      p.vals.resize(p.rows.size());
      for (size_t j = 0; j < p.rows.size(); ++j) p.vals[j] = x[p.rows[j]];
    }
    const int64_t n = static_cast<int64_t>(p.rows.size());
    if (l.kind == 5) {  // int8_from_selection's activation codes, one token
      if (!l.smooth.empty())
        for (int64_t j = 0; j < n; ++j) p.vals[j] = p.vals[j] / l.smooth[p.rows[j]];
      p.qa.resize(n);
      p.sa = quantize_values(p.vals.data(), n, (1 << (l.abits - 1)) - 1, p.qa.data());
      p.qsum = 0;
      for (int8_t v : p.qa) p.qsum += v;
      p.ngroups = pack_groups(p.rows, p.qa.data(), 1, p.qp);
    }
    return;
  }
  p.xs.resize(K);
  if (!l.smooth.empty())
    for (int64_t k = 0; k < K; ++k) p.xs[k] = rnd(P, x[k] / l.smooth[k]);
  else
    std::memcpy(p.xs.data(), x, K * sizeof(float));
  const float* xs = p.xs.data();
  if (l.kind == 0) {
    if (P.bf16 && kBf16Dot) {
      p.xb.resize(K);
      for (int64_t k = 0; k < K; ++k) p.xb[k] = bf16_bits(xs[k]);  // exact: xs holds bf16 values
    }
    return;
  }
  const int64_t G = l.G, gs = l.gs;
  if (l.kind == 1) {  // quantize_act + int8_act_gemm's preparation
    p.xq0.resize(K);
    p.xq.resize(K);
    const float qmax = static_cast<float>((1 << (l.abits - 1)) - 1);
    if (P.bf16) {
      p.xt.resize(K);
      for (int64_t k = 0; k < K; ++k) p.xt[k] = c10::BFloat16(xs[k]);
      quantize_rows<c10::BFloat16>(p.xt.data(), p.xq0.data(), &p.sx, 0, 1, K, qmax,
                                   static_cast<c10::BFloat16>(static_cast<float>(P.qeps)));
    } else {
      quantize_rows<float>(xs, p.xq0.data(), &p.sx, 0, 1, K, qmax, static_cast<float>(P.qeps));
    }
    if (l.bits == 4) permute_int8_w4(p.xq0.data(), p.xq.data(), 1, K, gs);
    else permute_rows(p.xq0.data(), p.xq.data(), 1, K, false);
    p.xsi.assign(G, 0);
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) s += p.xq0[k];
      p.xsi[g] = s;
    }
  } else if (l.kind == 2) {  // float_act_gemm's preparation
    p.xf.resize(K);
    permute_rows(xs, p.xf.data(), 1, K, l.bits == 4);
    p.xsf.assign(G, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0.0;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) acc += p.xf[k];
      p.xsf[g] = static_cast<float>(acc);
    }
  } else {  // bf16_act_gemm's preparation
    p.xb.resize(K);
    for (int64_t c = 0; c < K; c += 128)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 32; ++j) p.xb[c + 32 * i + j] = bf16_bits(xs[c + 4 * j + i]);
    p.xsf.assign(G, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0.0;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) acc += static_cast<double>(to_bf16_value(xs[k]));
      p.xsf[g] = static_cast<float>(acc);
    }
  }
}

// rows [n0, n1) of linear l on its prepared input, through the epilogue (bias, rounding) into
// out[0 .. n1 - n0); y: scratch of n1 - n0 floats
void linear_rows(const Plan& P, const Lin& l, const Input& p, int64_t n0, int64_t n1, float* y, float* out) {
  const int64_t K = l.K, G = l.G, gs = l.gs, rows = n1 - n0;
  if (l.kind >= 4) {  // columns [n0, n1) of the sparse kernels (sparse_gemv.cpp), bias, one rounding
    if (l.kind == 4) {
      std::fill(y, y + rows, 0.f);
      const int64_t nk = static_cast<int64_t>(p.rows.size());
      if (l.wbf16)
        gemv_block<uint16_t, 1>(reinterpret_cast<const uint16_t*>(l.w.data_ptr()), l.N, p.rows.data(), p.vals.data(),
                                nk, n0, n1, y);
      else
        gemv_block<float, 1>(l.w.data_ptr<float>(), l.N, p.rows.data(), p.vals.data(), nk, n0, n1, y);
    } else {
      int32_t acc[MAXCOLS];
      std::fill(acc, acc + rows, 0);
      int8_block<1>(l.w.data_ptr<uint8_t>(), l.N, p.rows.data(), p.qp.data(), p.ngroups, n0, n1, acc);
      int8_dequant(acc, n0, rows, l.zero.data_ptr<int32_t>(), p.qsum, p.sa, l.scale.data_ptr<float>(), y);
    }
    for (int64_t r = 0; r < rows; ++r) out[r] = rnd(P, l.bias.empty() ? y[r] : y[r] + l.bias[n0 + r]);
    return;
  }
  if (l.kind == 0) {
    auto run = [&](auto* w, auto&& rows4, auto&& rows1) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) rows4(w + (n0 + r) * K, y + r);
      for (; r < rows; ++r) rows1(w + (n0 + r) * K, y + r);
    };
    if (!l.wbf16) {
      run(l.w.data_ptr<float>(), [&](const float* w, float* yy) { gemv_rows<float, 4>(w, p.xs.data(), K, yy); },
          [&](const float* w, float* yy) { gemv_rows<float, 1>(w, p.xs.data(), K, yy); });
    } else {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(l.w.data_ptr());
#ifdef __AVX512BF16__
      if (P.bf16) {
        run(w, [&](const uint16_t* ww, float* yy) { gemv_rows_bf16<4>(ww, p.xb.data(), K, yy); },
            [&](const uint16_t* ww, float* yy) { gemv_rows_bf16<1>(ww, p.xb.data(), K, yy); });
      } else
#endif
      {
        run(w, [&](const uint16_t* ww, float* yy) { gemv_rows<uint16_t, 4>(ww, p.xs.data(), K, yy); },
            [&](const uint16_t* ww, float* yy) { gemv_rows<uint16_t, 1>(ww, p.xs.data(), K, yy); });
      }
    }
    for (int64_t r = 0; r < rows; ++r) out[r] = rnd(P, l.bias.empty() ? y[r] : y[r] + l.bias[n0 + r]);
    return;
  }
  const int64_t ws = l.bits == 4 ? K / 2 : K;  // bytes per row of codes (tiled: a tile is 8 ws bytes)
  const uint8_t* w = static_cast<const uint8_t*>(l.w.data_ptr()) + n0 * ws;  // tiled: n0 % 8 == 0 (units of 64)
  const float* sc = l.scale.data_ptr<float>() + n0 * G;
  const float* ze = l.zero.data_ptr<float>() + n0 * G;
  auto tiles = [&](auto&& tile4, auto&& tile1) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) tile4(r);
    for (; r < rows; ++r) tile1(r);
  };
  // the kernels write y[(b0 + t) * N + n0 + r]: called with b0 = 0 and N = rows, n0 = r (rows offset above)
  if (l.tiled) {  // whole tiles of 8 rows, one stream each (N % 8 == 0, units of 64 rows)
    for (int64_t r = 0; r < rows; r += 8) {
      if (l.kind == 1 && l.bits == 8)
        int_tile<8, 8, 1, true>(p.xq.data(), p.xsi.data(), &p.sx, w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows);
      else if (l.kind == 1)
        int_tile<4, 8, 1, true>(p.xq.data(), p.xsi.data(), &p.sx, w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows);
      else if (l.kind == 2 && l.bits == 8)
        float_tile<8, 8, 1, true>(p.xf.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows);
      else if (l.kind == 2)
        float_tile<4, 8, 1, true>(p.xf.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows);
#ifdef __AVX512BF16__
      else  // as bf16_act_gemm at one token
        bf16_tile<8, 1, true>(p.xb.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows, 1);
#endif
    }
  } else if (l.kind == 1) {
    if (l.bits == 8) {  // row-major int8 codes in 8-row tiles: eight streams at once, the fastest walk measured
      int64_t r = 0;    // (in the 7B stack's decode: 8 rows faster than 4 or 2, 16 slower; docs/runtime.md "Sitting W")
      for (; r + 8 <= rows; r += 8)
        int_tile<8, 8, 1>(p.xq.data(), p.xsi.data(), &p.sx, w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows);
      for (; r + 4 <= rows; r += 4)
        int_tile<8, 4, 1>(p.xq.data(), p.xsi.data(), &p.sx, w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows);
      for (; r < rows; ++r)
        int_tile<8, 1, 1>(p.xq.data(), p.xsi.data(), &p.sx, w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows);
    } else {  // int4: int_gemm.cpp's paired_rows walk, as int8_act_gemm at one token
      paired_rows(0, rows, [&]<int RR>(int64_t r, int64_t rs) {
        int_tile<4, RR, 1>(p.xq.data(), p.xsi.data(), &p.sx, w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows, rs);
      });
    }
  } else if (l.kind == 2) {
    if (l.bits == 8)
      tiles([&](int64_t r) { float_tile<8, 4, 1>(p.xf.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows); },
            [&](int64_t r) { float_tile<8, 1, 1>(p.xf.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows); });
    else
      tiles([&](int64_t r) { float_tile<4, 4, 1>(p.xf.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows); },
            [&](int64_t r) { float_tile<4, 1, 1>(p.xf.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows); });
  } else {
#ifdef __AVX512BF16__
    paired_rows(0, rows, [&]<int RR>(int64_t r, int64_t rs) {  // as bf16_act_gemm at one token
      bf16_tile<RR, 1>(p.xb.data(), p.xsf.data(), w, ws, sc, ze, l.sym, r, 0, K, G, gs, y, rows, rs);
    });
#endif
  }
  for (int64_t r = 0; r < rows; ++r)
    out[r] = l.bias.empty() ? rnd(P, y[r]) : rnd(P, rnd(P, y[r]) + l.bias[n0 + r]);
}

// ---- split-K of the sparse kinds (4, 5) ------------------------------------------------------------

// kept rows a linear's Top-K gives (kind 5: groups of four rows, the int8 walk's unit)
inline int64_t kept_units(const Lin& l) {
  const int64_t k = std::min(l.keep, l.K);
  return l.kind == 5 ? (k + 3) / 4 : k;
}

// split-K for linear l with nparts row parts: a sparse kind whose every part gets >= SPLITK_MIN_ROWS kept rows
// (fused_set_split's mode 1 / 2: never / always).  A threshold linear's kept rows are this token's (`in`, its
// prepared input: the same selection on every thread, so every thread decides alike); without `in` (the count
// of fused_set_split) its keep, K.
inline bool use_splitk(const Plan& P, const Lin& l, int64_t nparts, const Input* in = nullptr) {
  if (l.kind < 4 || P.split_mode == 1) return false;
  if (P.split_mode == 2) return true;
  const int64_t rows = l.kind == 5 ? 4 * kept_units(l)
                                   : (l.thresh && in ? static_cast<int64_t>(in->rows.size()) : kept_units(l));
  return rows >= SPLITK_MIN_ROWS * nparts;
}

// Row part `part` of `nparts` of linear l's kept rows (as run_gemv / int8_from_selection split them: rows
// [nk * p / np, nk * (p + 1) / np), kind 5 in groups of four) summed over all N columns into dst [N]: fp32
// (kind 4, gemv_block, 8-row groups with the next group prefetched) or int32 in int8_block's lane order
// (kind 5; 16-row passes when the N-column accumulator outgrows L1, as there).
void sparse_part(const Lin& l, const Input& p, int64_t part, int64_t nparts, int32_t* dst) {
  const int64_t N = l.N;
  if (l.kind == 4) {
    float* acc = reinterpret_cast<float*>(dst);
    const int64_t nk = static_cast<int64_t>(p.rows.size()), r0 = nk * part / nparts, r1 = nk * (part + 1) / nparts;
    std::fill(acc, acc + N, 0.f);
    if (l.wbf16)
      gemv_block<uint16_t, 1>(reinterpret_cast<const uint16_t*>(l.w.data_ptr()), N, p.rows.data() + r0,
                              p.vals.data() + r0, r1 - r0, 0, N, acc);
    else
      gemv_block<float, 1>(l.w.data_ptr<float>(), N, p.rows.data() + r0, p.vals.data() + r0, r1 - r0, 0, N, acc);
  } else {
    const int64_t g0 = p.ngroups * part / nparts, g1 = p.ngroups * (part + 1) / nparts;
    std::fill(dst, dst + N, 0);
    int8_block<1>(l.w.data_ptr<uint8_t>(), N, p.rows.data() + 4 * g0, p.qp.data() + g0, g1 - g0, 0, N, dst);
  }
}

// columns [c0, c1) (c0 a multiple of 64) of linear l from its nparts partial sums parts[p * stride + j]: the
// sum in part order (as run_gemv adds its row parts), kind 5 int8_dequant's epilogue, then what linear_rows
// does after its sum (bias, one rounding) into out[0 .. c1 - c0); y: scratch of c1 - c0 floats
void sparse_reduce(const Plan& P, const Lin& l, const Input& p, const int32_t* parts, int64_t nparts, int64_t stride,
                   int64_t c0, int64_t c1, float* y, float* out) {
  const int64_t len = c1 - c0;
  if (l.kind == 4) {
    const float* a = reinterpret_cast<const float*>(parts) + c0;
    std::memcpy(y, a, len * sizeof(float));
    for (int64_t q = 1; q < nparts; ++q) {
      const float* b = a + q * stride;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) y[j] += b[j];
    }
  } else {
    int32_t acc[REDUCE_COLS];
    const int32_t* a = parts + c0;
    std::memcpy(acc, a, len * sizeof(int32_t));
    for (int64_t q = 1; q < nparts; ++q) {
      const int32_t* b = a + q * stride;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) acc[j] += b[j];
    }
    int8_dequant(acc, c0, len, l.zero.data_ptr<int32_t>(), p.qsum, p.sa, l.scale.data_ptr<float>(), y);
  }
  for (int64_t r = 0; r < len; ++r) out[r] = rnd(P, l.bias.empty() ? y[r] : y[r] + l.bias[c0 + r]);
}

// ---- the small ops -------------------------------------------------------------------------------

// the MLP's SiLU(gate) * up for columns [b, e) of the gate/up phase (gbuf, ubuf: those columns) into P.g
inline void silu_mul(Plan& P, const float* gbuf, const float* ubuf, int64_t b, int64_t e) {
  for (int64_t n = b; n < e; ++n) {
    const float g = gbuf[n - b];
    P.g[n] = rnd(P, rnd(P, g / (1.f + std::exp(-g))) * ubuf[n - b]);
  }
}

void rms_norm(const Plan& P, const float* h, const std::vector<float>& w, float* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < P.H; ++i) ss += h[i] * h[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(P.H) + P.eps);
  for (int64_t i = 0; i < P.H; ++i) out[i] = rnd(P, w[i] * rnd(P, h[i] * r));
}

void rope(const Plan& P, const float* v, float* out, int64_t pos) {  // one head
  const int64_t hd = P.hd, half = hd / 2;
  const float* c = P.cos.data() + pos * hd;
  const float* s = P.sin.data() + pos * hd;
  for (int64_t i = 0; i < hd; ++i) {
    const float rot = i < half ? -v[i + half] : v[i - half];
    out[i] = rnd(P, rnd(P, v[i] * c[i]) + rnd(P, rot * s[i]));
  }
}

// query head h at position pos: RoPE of q and of its K/V head's k, scores over the cache (positions
// < pos) and this token's k, softmax, weighted V.  The thread of the first query head of each K/V head
// writes this token's K/V into the cache; no thread reads position pos from the cache in this step.
template <typename T>
void attend_head(Plan& P, Layer& l, Local& L, int64_t h, int64_t pos) {
  const int64_t hd = P.hd, T1 = pos + 1, rep = P.nh / P.nkv, j = h / rep;
  T* kc = static_cast<T*>(l.kc.data_ptr()) + j * P.max_len * hd;
  T* vc = static_cast<T*>(l.vc.data_ptr()) + j * P.max_len * hd;
  rope(P, P.q.data() + h * hd, L.qt, pos);
  rope(P, P.k.data() + j * hd, L.kt, pos);
  const float* vj = P.v.data() + j * hd;
  if (h % rep == 0)
    for (int64_t i = 0; i < hd; ++i) {
      kc[pos * hd + i] = static_cast<T>(L.kt[i]);
      vc[pos * hd + i] = static_cast<T>(vj[i]);
    }
  float* sc = P.scores.data() + h * P.max_len;
  float mx = -INFINITY;
  for (int64_t t = 0; t < T1; ++t) {
    float d = 0.f;
    if (t < pos) {
      const T* kt = kc + t * hd;
      for (int64_t i = 0; i < hd; ++i) d += L.qt[i] * static_cast<float>(kt[i]);
    } else {  // this token's k: the value the cache receives (already a value of T)
      for (int64_t i = 0; i < hd; ++i) d += L.qt[i] * L.kt[i];
    }
    sc[t] = d * P.scaling;
    mx = sc[t] > mx ? sc[t] : mx;
  }
  // as ATen's CPU flash attention: the sum of the fp32 exponentials, the weights that multiply V
  // rounded to the model dtype (its second GEMM runs in the reduced type)
  float sum = 0.f;
  for (int64_t t = 0; t < T1; ++t) {
    const float e = std::exp(sc[t] - mx);
    sum += e;
    sc[t] = rnd(P, e);
  }
  for (int64_t i = 0; i < hd; ++i) L.acc[i] = 0.f;
  for (int64_t t = 0; t < T1; ++t) {
    const float p = sc[t];
    if (t < pos) {
      const T* vt = vc + t * hd;
      for (int64_t i = 0; i < hd; ++i) L.acc[i] += p * static_cast<float>(vt[i]);
    } else {
      for (int64_t i = 0; i < hd; ++i) L.acc[i] += p * vj[i];
    }
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < hd; ++i) P.a[h * hd + i] = rnd(P, L.acc[i] * inv);
}

// ---- plan ----------------------------------------------------------------------------------------

Lin make_lin(const std::vector<at::Tensor>& ts, size_t& ti, const std::vector<int64_t>& meta, size_t& mi) {
  Lin l;
  l.kind = meta[mi++];
  l.bits = meta[mi++];
  l.group = meta[mi++];
  l.sym = meta[mi++] != 0;
  l.abits = meta[mi++];
  l.share = meta[mi++] != 0;
  l.N = meta[mi++];
  l.K = meta[mi++];
  l.keep = meta[mi++];
  const int64_t thr_bits = meta[mi++];  // -1: Top-K (or not sparse); else the float32 bits of a threshold
  TORCH_CHECK(thr_bits >= -1 && thr_bits <= 0xFFFFFFFFLL, "fused_plan: threshold bits");
  if (thr_bits >= 0) {
    const uint32_t b = static_cast<uint32_t>(thr_bits);
    l.thresh = true;
    std::memcpy(&l.thr, &b, sizeof(float));
  }
  l.w = ts[ti++];
  l.scale = ts[ti++];
  l.zero = ts[ti++];
  l.bias = floats(ts[ti++]);
  l.smooth = floats(ts[ti++]);
  TORCH_CHECK(l.w.is_contiguous(), "fused_plan: weights must be contiguous");
  TORCH_CHECK(l.kind >= 0 && l.kind <= 5, "fused_plan: linear kind 0..5");
  TORCH_CHECK(l.kind != 0 || (l.w.dim() == 2 && l.w.size(0) == l.N && l.w.size(1) == l.K), "fused_plan: dense weight shape");
  TORCH_CHECK(l.kind != 0 || l.w.scalar_type() == at::kFloat || l.w.scalar_type() == at::kBFloat16,
              "fused_plan: dense weights float32 or bfloat16");
  l.wbf16 = (l.kind == 0 || l.kind == 4) && l.w.scalar_type() == at::kBFloat16;
  if (l.kind >= 4) {
    l.cols = sparse_cols(l.N, std::max(1, at::get_num_threads()));
    TORCH_CHECK(l.w.dim() == 2 && l.w.size(0) == l.K && l.w.size(1) == l.N, "fused_plan: WT [K, N] shape");
    TORCH_CHECK(l.thresh || l.keep >= 1, "fused_plan: Top-K keeps at least one channel");
    if (l.kind == 4) {
      TORCH_CHECK(l.w.scalar_type() == at::kFloat || l.w.scalar_type() == at::kBFloat16,
                  "fused_plan: sparse float weights float32 or bfloat16");
    } else {
      TORCH_CHECK(l.w.scalar_type() == at::kByte, "fused_plan: sparse int8 codes uint8 (code + 128)");
      TORCH_CHECK(l.scale.scalar_type() == at::kFloat && l.scale.is_contiguous() && l.scale.numel() == l.N &&
                      l.zero.scalar_type() == at::kInt && l.zero.is_contiguous() && l.zero.numel() == l.N,
                  "fused_plan: sparse int8 scale float [N], zero correction int32 [N]");
      TORCH_CHECK(l.abits >= 2 && l.abits <= 8, "fused_plan: activation bits 2..8");
    }
  } else if (l.kind != 0) {
    TORCH_CHECK(l.bits == 8 || l.bits == 4, "fused_plan: 4- or 8-bit codes");
    TORCH_CHECK(l.K % 64 == 0, "fused_plan: K must be a multiple of 64");
    l.tiled = l.w.dim() == 4;  // int_gemm.cpp's tiled codes [N/8, C/64, 8, 64]
    const int64_t C = l.bits == 8 ? l.K : l.K / 2;
    if (l.tiled) {
      TORCH_CHECK(l.N % 8 == 0 && C % 64 == 0 && l.w.size(0) * 8 == l.N && l.w.size(1) * 64 == C &&
                      l.w.size(2) == 8 && l.w.size(3) == 64, "fused_plan: tiled codes [N/8, C/64, 8, 64]");
    } else {
      TORCH_CHECK(l.w.dim() == 2 && l.w.size(0) == l.N && l.w.size(1) == C, "fused_plan: weight codes shape");
    }
    l.gs = l.group > 0 ? l.group : l.K;
    TORCH_CHECK(l.gs % 64 == 0, "fused_plan: group size must be a multiple of 64");
    l.G = (l.K + l.gs - 1) / l.gs;
    TORCH_CHECK(l.scale.scalar_type() == at::kFloat && l.scale.is_contiguous() && l.scale.numel() == l.N * l.G &&
                    l.zero.scalar_type() == at::kFloat && l.zero.is_contiguous() && l.zero.numel() == l.N * l.G,
                "fused_plan: scale / zero: float [N, G]");
    TORCH_CHECK(l.kind != 3 || (kHaveBf16 && l.bits == 4 && l.K % 128 == 0 && l.gs % 128 == 0),
                "fused_plan: the bf16 kernel needs AVX512_BF16, int4 codes, K and group multiples of 128");
    TORCH_CHECK(l.kind != 1 || (l.abits >= 2 && l.abits <= 8), "fused_plan: activation bits 2..8");
  }
  TORCH_CHECK(!l.thresh || l.kind == 4, "fused_plan: a threshold selection is kind 4 (float weight rows)");
  TORCH_CHECK((l.bias.empty() || static_cast<int64_t>(l.bias.size()) == l.N) &&
                  (l.smooth.empty() || static_cast<int64_t>(l.smooth.size()) == l.K),
              "fused_plan: bias or smoothing shape");
  return l;
}

// tensors: embed, final norm, cos [max_len, hd], sin, head (5), then per layer: ln1, ln2, kc, vc, and
// q, k, v, o, gate, up, down (5 each: weight, scale, zero, bias, smoothing; empty tensors for none).
// meta: H, nh, nkv, hd, L, max_len, V, I, bf16, then per linear (head first) kind, bits, group, sym,
// abits, share, N, K, keep, thr (-1: none; kind 4: the float32 bits of a TEAL threshold, keep unused); after
// each layer's seven linears a flag "has a residual adapter" and, if set, the adapter's linear (5 tensors after
// the layer's 35, and its meta).  fmeta: rms eps, attention scaling, quantizer eps.
int64_t fused_plan(const std::vector<at::Tensor>& ts, const std::vector<int64_t>& meta, const std::vector<double>& fmeta) {
  auto P = std::make_unique<Plan>();
  size_t ti = 0, mi = 0;
  P->H = meta[mi++];
  P->nh = meta[mi++];
  P->nkv = meta[mi++];
  P->hd = meta[mi++];
  P->L = meta[mi++];
  P->max_len = meta[mi++];
  P->V = meta[mi++];
  P->I = meta[mi++];
  P->bf16 = meta[mi++] != 0;
  P->eps = static_cast<float>(fmeta[0]);
  P->scaling = static_cast<float>(fmeta[1]);
  P->qeps = fmeta[2];
  TORCH_CHECK(P->hd <= 1024 && P->hd % 2 == 0, "fused_plan: head_dim must be even and <= 1024");
  TORCH_CHECK(P->nh % P->nkv == 0, "fused_plan: heads must be a multiple of kv heads");
  P->embed = ts[ti++];
  P->norm = floats(ts[ti++]);
  P->cos = floats(ts[ti++]);
  P->sin = floats(ts[ti++]);
  P->head = make_lin(ts, ti, meta, mi);
  const auto dt = P->bf16 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(P->embed.scalar_type() == dt && P->embed.is_contiguous(), "fused_plan: embedding dtype");
  for (int64_t i = 0; i < P->L; ++i) {
    Layer l;
    l.ln1 = floats(ts[ti++]);
    l.ln2 = floats(ts[ti++]);
    l.kc = ts[ti++];
    l.vc = ts[ti++];
    TORCH_CHECK(l.kc.scalar_type() == dt && l.kc.is_contiguous() && l.vc.is_contiguous() &&
                    l.kc.numel() == P->nkv * P->max_len * P->hd && l.vc.numel() == l.kc.numel(),
                "fused_plan: K/V cache layout");
    for (Lin* p : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) {
      *p = make_lin(ts, ti, meta, mi);
      TORCH_CHECK((p->kind != 0 && p->kind != 4) || p->w.scalar_type() == dt,
                  "fused_plan: layer weights in the model dtype");
    }
    l.has_adapt = meta[mi++] != 0;
    if (l.has_adapt) {
      l.adapt = make_lin(ts, ti, meta, mi);
      TORCH_CHECK(l.adapt.N == P->H && l.adapt.K == P->H && !l.adapt.share, "fused_plan: residual adapter shape");
      TORCH_CHECK(l.adapt.kind != 4 || (l.adapt.keep >= l.adapt.K && !l.adapt.thresh),
                  "fused_plan: a residual adapter is dense");
      P->nadapt++;
    }
    const int64_t H = P->H, qd = P->nh * P->hd, kd = P->nkv * P->hd, I = P->I;
    TORCH_CHECK(l.q.K == H && l.q.N == qd && l.k.K == H && l.k.N == kd && l.v.K == H && l.v.N == kd &&
                    l.o.K == qd && l.o.N == H && l.gate.K == H && l.gate.N == I && l.up.K == H && l.up.N == I &&
                    l.down.K == I && l.down.N == H && static_cast<int64_t>(l.ln1.size()) == H &&
                    static_cast<int64_t>(l.ln2.size()) == H,
                "fused_plan: layer shapes");
    for (const Lin* p : {&l.k, &l.v, &l.up})
      TORCH_CHECK(!p->share || ((p - 1)->kind == p->kind && (p - 1)->thresh == p->thresh &&
                                (!p->thresh || std::memcmp(&(p - 1)->thr, &p->thr, sizeof(float)) == 0)),
                  "fused_plan: shared input of different kinds or thresholds");
    P->layers.push_back(std::move(l));
  }
  TORCH_CHECK(ti == ts.size() && mi == meta.size(), "fused_plan: argument count");
  TORCH_CHECK(P->head.K == P->H && P->head.N == P->V && static_cast<int64_t>(P->norm.size()) == P->H &&
                  P->embed.size(1) == P->H && static_cast<int64_t>(P->cos.size()) == P->max_len * P->hd &&
                  static_cast<int64_t>(P->sin.size()) == P->max_len * P->hd,
              "fused_plan: head, norm, embedding or RoPE table shape");
  P->q.resize(P->nh * P->hd);
  P->a.resize(P->nh * P->hd);
  P->k.resize(P->nkv * P->hd);
  P->v.resize(P->nkv * P->hd);
  P->g.resize(P->I);
  P->t.resize(P->H);
  P->t2.resize(P->H);
  P->scores.resize(P->nh * P->max_len);
  P->nphases = 2 * (5 * P->L + P->nadapt) + 1;  // a split-K phase takes two counters (its parts, its reduction)
  P->pstride = (std::max({P->H, P->I, P->nh * P->hd}) + 15) / 16 * 16;
  P->next.reset(new std::atomic<int64_t>[P->nphases]);
  std::lock_guard<std::mutex> lock(g_mu);
  g_plans.push_back(std::move(P));
  return static_cast<int64_t>(g_plans.size() - 1);
}

void fused_free(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_plans.size()), "fused_free: no such plan");
  g_plans[id].reset();
}

Plan& get_plan(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_plans.size()) && g_plans[id], "fused: no such plan");
  return *g_plans[id];
}

// ---- the step ------------------------------------------------------------------------------------

using Clock = std::chrono::steady_clock;

struct Timer {  // thread 0's time per phase (only when the plan profiles)
  Plan& P;
  bool on;
  Clock::time_point t;
  void mark(int phase, int part) {
    if (!on) return;
    const auto n = Clock::now();
    P.prof[phase][part] += std::chrono::duration<double>(n - t).count();
    t = n;
  }
};

// the units of one phase, taken from its counter: fn(unit)
template <typename F>
inline void take(std::atomic<int64_t>& next, int64_t units, const F& fn) {
  for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units; u = next.fetch_add(1, std::memory_order_relaxed))
    fn(u);
}

// The barrier between phases: spin briefly, then yield the core.  libgomp's `omp barrier` spins for
// about 3 ms before it sleeps (GOMP_SPINCOUNT's default), so when the step's threads share fewer cores
// than there are threads (another process busy on this machine), the thread that arrived first held the
// core the late one needed at every barrier: qwen2.5-0.5b W8A8 decoded 6x slower next to one busy
// process (430 against 77 ms per token; with GOMP_SPINCOUNT=0 or OMP_PROC_BIND=true, 75 and 88 ms).
inline void phase_barrier(Plan& P, int nt) {
  const int gen = P.bar_gen.load(std::memory_order_acquire);
  if (P.bar_count.fetch_add(1, std::memory_order_acq_rel) == nt - 1) {
    P.bar_count.store(0, std::memory_order_relaxed);
    P.bar_gen.fetch_add(1, std::memory_order_release);
    return;
  }
  for (int i = 0; P.bar_gen.load(std::memory_order_acquire) == gen; ++i) {
    if (i < 2000)
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#else
      ;
#endif
    else
      std::this_thread::yield();
  }
}

inline int64_t units_of(int64_t n) { return (n + UNIT - 1) / UNIT; }
inline int64_t units_of(const Lin& l) { return (l.N + l.cols - 1) / l.cols; }

// the inputs of consecutive linears l[0..n) (a later one reuses the earlier preparation when "share")
inline const Input* prepare_group(const Plan& P, Local& L, const Lin* const* l, int n, const float* x, const Input** out) {
  for (int i = 0; i < n; ++i) {
    if (i > 0 && l[i]->share) {
      out[i] = out[i - 1];
    } else {
      prepare(P, *l[i], x, L.prep[i]);
      out[i] = &L.prep[i];
    }
  }
  return out[0];
}

void step_thread(Plan& P, int64_t token, int64_t pos, void* logits_out, bool& prof_on) {
  const int tid = omp_get_thread_num();
  Local& L = *P.local[tid];
  const int64_t H = P.H;
  Timer tm{P, prof_on && tid == 0, Clock::now()};
  int64_t ph = 0;  // phase counter index
  const int nt = omp_get_num_threads();
  auto barrier = [&](int phase) {
    tm.mark(phase, 1);
    phase_barrier(P, nt);
    tm.mark(phase, 2);
  };
  // the residual stream: every thread keeps its own (identical) copy
  if (P.bf16) {
    const uint16_t* e = reinterpret_cast<const uint16_t*>(P.embed.data_ptr()) + token * H;
    for (int64_t i = 0; i < H; ++i) L.h[i] = c10::BFloat16(e[i], c10::BFloat16::from_bits()).operator float();
  } else {
    std::memcpy(L.h.data(), P.embed.data_ptr<float>() + token * H, H * sizeof(float));
  }
  // split-K row parts of this step (the partial buffers hold at least this many, see fused_step)
  const int64_t np = nt * P.parts_per_thread;
  int32_t* const parts = P.parts.get();
  // the linears lin[0..n) on their prepared inputs into outs[i][0 .. N): each one's column units or, split-K
  // (use_splitk), its row parts (partials of linear i at parts + (i * np + p) * pstride); if any was split-K,
  // a barrier and the reduction units.  The caller ends the phase with its barrier.
  auto run_linears = [&](int phase, int n, const Lin* const* lins, const Input* const* ins, float* const* outs) {
    bool sk[3];
    int64_t cu[3], total = 0;
    bool any = false;
    for (int i = 0; i < n; ++i) {
      sk[i] = use_splitk(P, *lins[i], np, ins[i]);
      cu[i] = sk[i] ? np : units_of(*lins[i]);
      total += cu[i];
      any = any || sk[i];
    }
    take(P.next[ph++], total, [&](int64_t u) {
      int i = 0;
      while (u >= cu[i]) u -= cu[i++];
      const Lin& l = *lins[i];
      if (sk[i]) {
        sparse_part(l, *ins[i], u, np, parts + (i * np + u) * P.pstride);
      } else {
        const int64_t b = u * l.cols;
        linear_rows(P, l, *ins[i], b, std::min(l.N, b + l.cols), L.y.data(), outs[i] + b);
      }
    });
    if (!any) return;
    barrier(phase);
    total = 0;
    for (int i = 0; i < n; ++i) total += cu[i] = sk[i] ? (lins[i]->N + REDUCE_COLS - 1) / REDUCE_COLS : 0;
    take(P.next[ph++], total, [&](int64_t u) {
      int i = 0;
      while (u >= cu[i]) u -= cu[i++];
      const int64_t c0 = u * REDUCE_COLS, c1 = std::min(lins[i]->N, c0 + REDUCE_COLS);
      sparse_reduce(P, *lins[i], *ins[i], parts + i * np * P.pstride, np, P.pstride, c0, c1, L.y.data(), outs[i] + c0);
    });
    tm.mark(phase, 3);
  };
  // a linear [H <- K] on the whole input x whose output is added to the residual stream (o_proj, down).  Split-K
  // with own_reduce (the default): the row parts (partials in slot `slot`), one barrier, then EVERY thread adds
  // all the parts itself (sparse_reduce over the whole output, the same order and epilogue as the shared
  // reduction units: the same values) into its own buffer and its residual stream — no second barrier and no
  // shared output; 2-3 us of redundant adds per thread at H = 4096 instead of a barrier.
  auto own_reduced = [&](int phase, const Lin& lin, const Input& in, int64_t slot) -> const float* {
    if (!P.own_reduce || !use_splitk(P, lin, np, &in)) return nullptr;
    int32_t* ps = parts + slot * np * P.pstride;
    take(P.next[ph++], np, [&](int64_t u) { sparse_part(lin, in, u, np, ps + u * P.pstride); });
    barrier(phase);
    ph++;  // the shared reduction's counter, unused
    for (int64_t c0 = 0; c0 < lin.N; c0 += REDUCE_COLS)
      sparse_reduce(P, lin, in, ps, np, P.pstride, c0, std::min(lin.N, c0 + REDUCE_COLS), L.y.data(), L.t.data() + c0);
    tm.mark(phase, 3);
    return L.t.data();
  };
  auto residual_linear = [&](int phase, const Lin& lin, const float* x, int64_t slot) {
    prepare(P, lin, x, L.prep[0]);
    tm.mark(phase, 0);
    const float* t = own_reduced(phase, lin, L.prep[0], slot);
    if (!t) {
      const Lin* ls[1] = {&lin};
      const Input* in[1] = {&L.prep[0]};
      float* out[1] = {P.t.data()};
      run_linears(phase, 1, ls, in, out);
      barrier(phase);
      t = P.t.data();
    }
    for (int64_t i = 0; i < H; ++i) L.h[i] = rnd(P, L.h[i] + t[i]);
  };
  const Input* pp[3];
  const bool tracing = P.trace && tid == 0;
  float* trp = tracing ? P.tr.data() : nullptr;
  auto trace = [&](const float* v, int64_t n) {  // thread 0 appends v[0..n) to the trace
    if (!tracing) return;
    std::memcpy(trp, v, n * sizeof(float));
    trp += n;
  };
  for (Layer& l : P.layers) {
    // q / k / v
    rms_norm(P, L.h.data(), l.ln1, L.x.data());
    trace(L.x.data(), H);
    const Lin* qkv[3] = {&l.q, &l.k, &l.v};
    prepare_group(P, L, qkv, 3, L.x.data(), pp);
    tm.mark(0, 0);
    {
      float* outs[3] = {P.q.data(), P.k.data(), P.v.data()};
      run_linears(0, 3, qkv, pp, outs);
    }
    barrier(0);
    // attention, one query head per unit
    take(P.next[ph++], P.nh, [&](int64_t h) {
      if (P.bf16)
        attend_head<c10::BFloat16>(P, l, L, h, pos);
      else
        attend_head<float>(P, l, L, h, pos);
    });
    barrier(1);
    trace(P.a.data(), P.nh * P.hd);
    residual_linear(2, l.o, P.a.data(), 3);  // o_proj
    // gate / up, SiLU(gate) * up for the same rows
    rms_norm(P, L.h.data(), l.ln2, L.x.data());
    trace(L.x.data(), H);
    const Lin* gu[2] = {&l.gate, &l.up};
    prepare_group(P, L, gu, 2, L.x.data(), pp);
    tm.mark(3, 0);
    if (use_splitk(P, l.gate, np, pp[0]) && use_splitk(P, l.up, np, pp[1])) {  // gate's row parts, up's, then per column unit
      take(P.next[ph++], 2 * np, [&](int64_t u) {               // both reductions and SiLU * up
        const int64_t i = u / np, part = u % np;
        sparse_part(i ? l.up : l.gate, *pp[i], part, np, parts + (i * np + part) * P.pstride);
      });
      barrier(3);
      take(P.next[ph++], (P.I + REDUCE_COLS - 1) / REDUCE_COLS, [&](int64_t u) {
        const int64_t b = u * REDUCE_COLS, e = std::min(P.I, b + REDUCE_COLS);
        float gbuf[REDUCE_COLS], ubuf[REDUCE_COLS];
        sparse_reduce(P, l.gate, *pp[0], parts, np, P.pstride, b, e, L.y.data(), gbuf);
        sparse_reduce(P, l.up, *pp[1], parts + np * P.pstride, np, P.pstride, b, e, L.y.data(), ubuf);
        silu_mul(P, gbuf, ubuf, b, e);
      });
      tm.mark(3, 3);
    } else {
      take(P.next[ph++], units_of(l.gate), [&](int64_t u) {
        const int64_t b = u * l.gate.cols, e = std::min(P.I, b + l.gate.cols);
        float gbuf[MAXCOLS], ubuf[MAXCOLS];
        linear_rows(P, l.gate, *pp[0], b, e, L.y.data(), gbuf);
        linear_rows(P, l.up, *pp[1], b, e, L.y.data(), ubuf);
        silu_mul(P, gbuf, ubuf, b, e);
      });
    }
    barrier(3);
    trace(P.g.data(), P.I);
    residual_linear(4, l.down, P.g.data(), l.has_adapt ? 4 : 3);  // down
    trace(L.h.data(), H);
    if (l.has_adapt) {  // LaRoSA's residual adapter: the stream becomes h A (its own output buffer t2)
      prepare(P, l.adapt, L.h.data(), L.prep[0]);
      tm.mark(6, 0);
      const float* t = own_reduced(6, l.adapt, L.prep[0], 3);
      if (!t) {
        const Lin* ls[1] = {&l.adapt};
        const Input* in[1] = {&L.prep[0]};
        float* out[1] = {P.t2.data()};
        run_linears(6, 1, ls, in, out);
        barrier(6);
        t = P.t2.data();
      }
      std::memcpy(L.h.data(), t, H * sizeof(float));
    }
    trace(L.h.data(), H);
  }
  // final norm and the LM head, straight into the output tensor
  rms_norm(P, L.h.data(), P.norm, L.x.data());
  prepare(P, P.head, L.x.data(), L.prep[0]);
  tm.mark(5, 0);
  take(P.next[ph++], units_of(P.V), [&](int64_t u) {
    const int64_t b = u * UNIT, e = std::min(P.V, b + UNIT);
    float out[UNIT];
    linear_rows(P, P.head, L.prep[0], b, e, L.y.data(), out);
    if (P.bf16) {
      uint16_t* od = static_cast<uint16_t*>(logits_out);
      for (int64_t n = b; n < e; ++n) od[n] = bf16_bits(out[n - b]);
    } else {
      std::memcpy(static_cast<float*>(logits_out) + b, out, (e - b) * sizeof(float));
    }
  });
  barrier(5);
}

at::Tensor fused_step(int64_t id, int64_t token, int64_t pos) {
  Plan& P = get_plan(id);
  TORCH_CHECK(token >= 0 && token < P.embed.size(0), "fused_step: token id out of range");
  TORCH_CHECK(pos >= 0 && pos < P.max_len, "fused_step: position beyond the cache");
  const int nt = std::max(1, at::get_num_threads());
  while (static_cast<int>(P.local.size()) < nt) {
    auto L = std::make_unique<Local>();
    const int64_t big = std::max({P.H, P.I, P.nh * P.hd});
    L->h.resize(P.H);
    L->x.resize(big);
    L->t.resize(P.H);
    L->y.resize(MAXCOLS);
    P.local.push_back(std::move(L));
  }
  if (nt * P.parts_per_thread > P.nparts_alloc) {  // split-K partial sums: PSLOTS x parts x pstride
    P.nparts_alloc = nt * P.parts_per_thread;
    P.parts.reset(new int32_t[static_cast<size_t>(PSLOTS * P.nparts_alloc * P.pstride)]);
  }
  for (int64_t i = 0; i < P.nphases; ++i) P.next[i].store(0, std::memory_order_relaxed);
  at::Tensor out = at::empty({1, P.V}, at::TensorOptions().dtype(P.bf16 ? at::kBFloat16 : at::kFloat));
  void* od = out.data_ptr();
  bool prof = P.profile;
  // one parallel region for the whole step (a step called inside a parallel region runs on one thread)
#pragma omp parallel num_threads(nt)
  step_thread(P, token, pos, od, prof);
  if (prof) ++P.prof_steps;
  return out;
}

// Trace the following steps (on): per layer, thread 0's ln1 output, attention output, ln2 output, SiLU * up,
// the residual stream after down and after the residual adapter (= after down without one): fp32
// [L, 4H + nh*hd + I].  For the module-by-module comparisons of docs/runtime.md (tests, scripts), not timing.
void fused_set_trace(int64_t id, bool on) {
  Plan& P = get_plan(id);
  P.trace = on;
  P.tr.assign(on ? P.L * (4 * P.H + P.nh * P.hd + P.I) : 0, 0.f);
}

at::Tensor fused_trace(int64_t id) {
  Plan& P = get_plan(id);
  at::Tensor t = at::empty({P.L, 4 * P.H + P.nh * P.hd + P.I}, at::TensorOptions().dtype(at::kFloat));
  TORCH_CHECK(P.trace, "fused_trace: tracing is off");
  std::memcpy(t.data_ptr<float>(), P.tr.data(), P.tr.size() * sizeof(float));
  return t;
}

// Output columns per work unit of the sparse kinds 4 and 5 (multiples of 64, <= MAXCOLS; 0: the default,
// sparse_cols).  A wider unit streams longer runs of each kept row of WT [K, N] (64 columns of int8
// codes are one cache line per row), a narrower one shares the work more evenly.  For measurements.
void fused_set_unit_cols(int64_t id, int64_t cols) {
  Plan& P = get_plan(id);
  TORCH_CHECK(cols == 0 || (cols > 0 && cols % 64 == 0 && cols <= MAXCOLS), "fused_set_unit_cols: 0 or a multiple of 64 up to ", MAXCOLS);
  for (Layer& l : P.layers)
    for (Lin* p : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down, &l.adapt})
      if (p->kind >= 4) p->cols = cols ? cols : sparse_cols(p->N, std::max(1, at::get_num_threads()));
}

// The sparse kinds' work split (see "Split-K" above): mode 0 = per linear by the rule (use_splitk), 1 = output
// columns only (the session-32 units), 2 = split-K always; parts_per_thread >= 1 row parts per thread.  For
// measurements and tests.  Returns how many of the plan's linears a step on ATen's current thread count
// splits by rows (gate and up count only together: both split-K or neither; a threshold linear counted at its
// keep, K: a step decides it per token by the kept rows).
int64_t fused_set_split(int64_t id, int64_t mode, int64_t parts_per_thread) {
  Plan& P = get_plan(id);
  TORCH_CHECK(mode >= 0 && mode <= 2 && parts_per_thread >= 1 && parts_per_thread <= 16,
              "fused_set_split: mode 0..2, 1..16 parts per thread");
  P.split_mode = static_cast<int>(mode);
  P.parts_per_thread = parts_per_thread;
  const int64_t np = std::max(1, at::get_num_threads()) * parts_per_thread;
  int64_t n = 0;
  for (const Layer& l : P.layers) {
    for (const Lin* p : {&l.q, &l.k, &l.v, &l.o, &l.down}) n += use_splitk(P, *p, np);
    if (use_splitk(P, l.gate, np) && use_splitk(P, l.up, np)) n += 2;
    if (l.has_adapt) n += use_splitk(P, l.adapt, np);
  }
  return n;
}

// The Top-K selection of the sparse kinds: mode 0 = topk_select (default), 1 = sparse_gemv.cpp's topk_row (the
// selection before session 34).  Both keep the same channels; for measurements (A/B in one process) and tests.
void fused_set_select(int64_t id, int64_t mode) {
  Plan& P = get_plan(id);
  TORCH_CHECK(mode == 0 || mode == 1, "fused_set_select: mode 0 (topk_select) or 1 (topk_row)");
  P.select_mode = static_cast<int>(mode);
}

// The kept channels (int32, ascending) and their values of one fp32 row x [d] by either selection (mode as
// fused_set_select), for the selection's tests.
std::tuple<at::Tensor, at::Tensor> fused_topk(const at::Tensor& x, int64_t k, int64_t mode) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "fused_topk: a contiguous fp32 row");
  TORCH_CHECK(mode == 0 || mode == 1, "fused_topk: mode 0 or 1");
  const int64_t d = x.numel();
  std::vector<uint32_t> keys, cand;
  std::vector<int32_t> rows;
  std::vector<float> vals;
  if (mode == 0) {
    topk_select(x.data_ptr<float>(), d, k, keys, cand, rows, vals);
  } else {
    topk_row(x.data_ptr<float>(), d, k, keys, cand, rows);
    for (int32_t r : rows) vals.push_back(x.data_ptr<float>()[r]);
  }
  at::Tensor r = at::empty({static_cast<int64_t>(rows.size())}, at::TensorOptions().dtype(at::kInt));
  at::Tensor v = at::empty({static_cast<int64_t>(vals.size())}, at::TensorOptions().dtype(at::kFloat));
  if (!rows.empty()) std::memcpy(r.data_ptr<int32_t>(), rows.data(), rows.size() * sizeof(int32_t));
  if (!vals.empty()) std::memcpy(v.data_ptr<float>(), vals.data(), vals.size() * sizeof(float));
  return {r, v};
}

// The kept channels (int32, ascending) and their values of one fp32 row x [d] by the step's threshold selection
// (threshold_select; thr rounded to float32 as the plan does), for the selection's tests.
std::tuple<at::Tensor, at::Tensor> fused_threshold(const at::Tensor& x, double thr) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "fused_threshold: a contiguous fp32 row");
  std::vector<int32_t> rows;
  std::vector<float> vals;
  threshold_select(x.data_ptr<float>(), x.numel(), static_cast<float>(thr), rows, vals);
  at::Tensor r = at::empty({static_cast<int64_t>(rows.size())}, at::TensorOptions().dtype(at::kInt));
  at::Tensor v = at::empty({static_cast<int64_t>(vals.size())}, at::TensorOptions().dtype(at::kFloat));
  if (!rows.empty()) std::memcpy(r.data_ptr<int32_t>(), rows.data(), rows.size() * sizeof(int32_t));
  if (!vals.empty()) std::memcpy(v.data_ptr<float>(), vals.data(), vals.size() * sizeof(float));
  return {r, v};
}

// How the split-K residual linears (o_proj, down, the residual adapter) are reduced: mode 1 = every thread adds all
// the parts itself, no barrier after (own_reduce, the default since session 34), 0 = shared reduction units and a
// barrier (session 33).  Both give the same values; for measurements and tests.
void fused_set_reduce(int64_t id, int64_t mode) {
  Plan& P = get_plan(id);
  TORCH_CHECK(mode == 0 || mode == 1, "fused_set_reduce: mode 0 (shared units) or 1 (every thread)");
  P.own_reduce = static_cast<int>(mode);
}

void fused_set_profile(int64_t id, bool on) {
  Plan& P = get_plan(id);
  P.profile = on;
  std::memset(P.prof, 0, sizeof(P.prof));
  P.prof_steps = 0;
}

// [phase, part] seconds summed over the profiled steps (thread 0; parts: own small ops, units, barrier waits,
// split-K reduction units), and the number of steps
std::tuple<at::Tensor, int64_t> fused_profile(int64_t id) {
  Plan& P = get_plan(id);
  at::Tensor t = at::empty({NPHASE, 4}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(t.data_ptr<double>(), P.prof, sizeof(P.prof));
  return {t, P.prof_steps};
}

}  // namespace

TORCH_LIBRARY(mmcompress_fused, m) {
  m.def("fused_plan(Tensor[] tensors, int[] meta, float[] fmeta) -> int", &fused_plan);
  m.def("fused_step(int plan, int token, int pos) -> Tensor", &fused_step);
  m.def("fused_free(int plan) -> ()", &fused_free);
  m.def("fused_set_profile(int plan, bool on) -> ()", &fused_set_profile);
  m.def("fused_profile(int plan) -> (Tensor, int)", &fused_profile);
  m.def("fused_set_trace(int plan, bool on) -> ()", &fused_set_trace);
  m.def("fused_set_unit_cols(int plan, int cols) -> ()", &fused_set_unit_cols);
  m.def("fused_trace(int plan) -> Tensor", &fused_trace);
  m.def("fused_set_split(int plan, int mode, int parts_per_thread) -> int", &fused_set_split);
  m.def("fused_set_select(int plan, int mode) -> ()", &fused_set_select);
  m.def("fused_set_reduce(int plan, int mode) -> ()", &fused_set_reduce);
  m.def("fused_topk(Tensor x, int k, int mode) -> (Tensor, Tensor)", &fused_topk);
  m.def("fused_threshold(Tensor x, float thr) -> (Tensor, Tensor)", &fused_threshold);
}
