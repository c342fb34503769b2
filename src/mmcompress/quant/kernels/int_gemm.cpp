// Integer GEMM/GEMV for deployed quantized linears (mmcompress CPU runtime, AVX-512 VNNI).
//
// Weights: codes q[n, k] stored as in QuantLinear: int8 [N, K] (8 bits) or int4 packed two per byte
// [N, K/2] (low nibble = even k, high nibble = odd k, two's complement nibbles).  Asymmetric codes are
// stored shifted by -2^(b-1), as QuantLinear does.  Step sizes scale[n, g] and zero points zero[n, g]
// per output channel (G = 1) or per group of `group` input channels (G = K / group).
//
// int8_act_gemm (W8A8 / W4A8 / W4A6):  x codes xq[b, k] (int8, per-token scale sx[b])
//   y[b, n] = sx[b] * sum_g scale[n, g] * (sum_{k in g} xq[b, k] * q[n, k] - z'[n, g] * sum_{k in g} xq[b, k])
// with z' the zero point in the shifted code domain (0 for symmetric weights).  VPDPBUSD multiplies
// unsigned by signed bytes, so the weight byte is made unsigned on load (u = q + o, o = 128 for int8,
// o = 8 for int4: one XOR) and the offset folded into the zero point: sum u*x - (o + z') * sum x.
// Everything up to the per-group result is exact int32 arithmetic; the float epilogue is
// scale * (int) per group (per channel: once per output).
//
// float_act_gemm (W4A16 / W8A16): float activations, unsigned codes u widened to float in registers:
//   y[b, n] = sum_g scale[n, g] * (sum_{k in g} x[b, k] * u[n, k] - zc[n, g] * sum_{k in g} x[b, k])
//
// int4 weights are unpacked in registers as [even k of a 64-block | odd k of the block], so the
// activations are permuted the same way per 64-block once per call (cheap: B x K); int8_act_gemm with
// K and the group multiples of 128 takes 128 codes per step instead, per 128-block [even | odd]
// (int4_group128: the odd codes as 16 u, summed in their own int32 accumulator and divided by 16 exactly).
// Requirements (checked in Python): K % 64 == 0, group % 64 == 0 (or per channel); when the group does
// not divide K the last group is shorter (the quantizer's padding holds no codes here).  Any number of
// tokens: units of 64 output rows are shared by the threads (share_work), tokens walked in tiles of up to 4;
// int4 rows every other row (paired_rows), in tiles of 8 rows at one token.
//
// Tiled codes.  Every kernel also takes the codes as a 4-D tensor [N/8, C/64, 8, 64] (C = bytes per row:
// K for int8, K/2 for int4): line j (64 bytes) of rows 8t..8t+7 side by side, so a tile of 8 rows reads one
// contiguous stream instead of eight (rows of K = 4096 int4 codes are 2 KB: eight streams that restart every
// 32 lines, which the compute-heavy int4 kernels did not hide; docs/runtime.md "Tiled codes").  Same
// arithmetic, bit-identical results; needs C % 64 == 0 and N % 8 == 0.  One token: tiles of 8 rows.
//
// Registered as torch.ops.mmcompress_int.* (no pybind: faster to compile).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>

#include "share_work.h"

#include <cmath>
#include <cstdint>
#include <tuple>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

using mmcompress::share_work;  // share_work.h: units handed out to ATen's OpenMP team

constexpr int64_t UNIT_ROWS = 64;  // output rows per work unit

constexpr int R = 4;  // output rows per register tile (paired_rows: 2 R at one token)

// 64 unsigned weight codes k..k+63 from their bytes at p (int8: 64 bytes; int4: 32 bytes)
template <int BITS>
inline __m512i load_w_u8(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8((char)0x80));
  } else {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    b = _mm256_xor_si256(b, _mm256_set1_epi8((char)0x88));
    const __m256i m = _mm256_set1_epi8(0x0F);
    __m256i lo = _mm256_and_si256(b, m);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}

// Codes row-major [N, ws] (ws bytes per row) or tiled (above): the first byte of row n (tiled: of its first
// line), and the address of its byte `off` (a read from there stays within one 64-byte line).
constexpr int TILE_ROWS = 8;  // rows per tile of tiled codes
template <bool TILED>
inline const uint8_t* row_at(const uint8_t* w, int64_t ws, int64_t n) {
  return TILED ? w + (n / TILE_ROWS) * TILE_ROWS * ws + (n % TILE_ROWS) * 64 : w + n * ws;
}
template <bool TILED>
inline const uint8_t* byte_at(const uint8_t* row, int64_t off) {
  return TILED ? row + (off / 64) * 512 + off % 64 : row + off;
}

// 16 unsigned codes of sub-block q of the 64 codes at `blk` (int8: the codes' bytes; int4: the block's 32
// bytes), as float
template <int BITS>
inline __m512 load16_w_f32(const uint8_t* blk, int q) {
  __m128i b;
  if constexpr (BITS == 8) {
    b = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * q)), _mm_set1_epi8((char)0x80));
  } else {  // q = 0, 1: low nibbles of bytes 0..15, 16..31 (even k); q = 2, 3: high nibbles (odd k)
    b = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * (q & 1))),
                      _mm_set1_epi8((char)0x88));
    if (q >= 2) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}

struct Prep {  // activations in kernel order and their per-group sums
  std::vector<int8_t> xp;
  std::vector<int32_t> xsum;  // [B, G]
};

template <typename X>
void permute_rows(const X* x, X* out, int64_t B, int64_t K, bool int4) {
  for (int64_t b = 0; b < B; ++b) {
    const X* s = x + b * K;
    X* d = out + b * K;
    if (!int4) {
      std::memcpy(d, s, K * sizeof(X));
      continue;
    }
    for (int64_t c = 0; c < K; c += 64)
      for (int i = 0; i < 32; ++i) {
        d[c + i] = s[c + 2 * i];
        d[c + 32 + i] = s[c + 2 * i + 1];
      }
  }
}

// tile.template operator()<BITS, RR, T>(n0, b0) over every 4-row block (1-row blocks at the end) and
// every token tile of up to 4 tokens; row blocks are shared by the threads in 64-row units.
template <int BITS, int RR, typename F>
void token_tiles(int64_t B, int64_t n0, const F& tile, int64_t rs = 1) {
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) tile.template operator()<BITS, RR, 4>(n0, b, rs);
  switch (B - b) {
    case 3: tile.template operator()<BITS, RR, 3>(n0, b, rs); break;
    case 2: tile.template operator()<BITS, RR, 2>(n0, b, rs); break;
    case 1: tile.template operator()<BITS, RR, 1>(n0, b, rs); break;
    default: break;
  }
}

// Rows [n0, end) of int4 weights at one token, walked as tile.template operator()<RR>(n, rs) on rows
// n, n + rs, ..., n + (RR - 1) rs: blocks of 4 R rows as two tiles of 2 R rows of every other row
// (n0, n0 + 2, ... and n0 + 1, n0 + 3, ...), then blocks of 2 R rows the same way in tiles of R, then
// tiles of R and single rows.  Every other row: an int4 row of K = 4096 is 2 KB, so two consecutive
// rows share a 4 KB page, and walking both side by side (offsets j * 64 and 2048 + j * 64, alternating)
// defeats the hardware stream prefetcher (1.6x slower W4A16 GEMV at 11008 x 4096; docs/runtime.md
// "The int4 kernels at decode").  The 2 R-row tiles at one token share each activation load over more rows.
template <typename F>
void paired_rows(int64_t n0, int64_t end, const F& tile) {
  for (; n0 + 4 * R <= end; n0 += 4 * R) {
    tile.template operator()<2 * R>(n0, 2);
    tile.template operator()<2 * R>(n0 + 1, 2);
  }
  for (; n0 + 2 * R <= end; n0 += 2 * R) {
    tile.template operator()<R>(n0, 2);
    tile.template operator()<R>(n0 + 1, 2);
  }
  for (; n0 + R <= end; n0 += R) tile.template operator()<R>(n0, 1);
  for (; n0 < end; ++n0) tile.template operator()<1>(n0, 1);
}

// PAIRS (int4 weights): one token through paired_rows; more tokens in blocks of 2 R rows walked as two
// R-row tiles of every other row, like paired_rows' second stage.  `tiled` (tiled codes, N % 8 == 0):
// one token in tiles of 2 R = 8 rows (one stream each), more tokens in tiles of R rows.
template <int BITS, bool PAIRS = false, typename F>
void run_tiles(int64_t B, int64_t N, const F& tile, bool tiled = false) {
  share_work((N + UNIT_ROWS - 1) / UNIT_ROWS, [&](int64_t u) {
    const int64_t end = std::min(N, (u + 1) * UNIT_ROWS);
    int64_t n0 = u * UNIT_ROWS;
    if (tiled) {
      if (B == 1)
        for (; n0 < end; n0 += 2 * R) tile.template operator()<BITS, 2 * R, 1>(n0, 0, 1);
      else
        for (; n0 < end; n0 += R) token_tiles<BITS, R>(B, n0, tile);
      return;
    }
    if constexpr (PAIRS) {
      if (B == 1) {
        paired_rows(n0, end, [&]<int RR>(int64_t n, int64_t rs) { tile.template operator()<BITS, RR, 1>(n, 0, rs); });
        return;
      }
      for (; n0 + 2 * R <= end; n0 += 2 * R) {
        token_tiles<BITS, R>(B, n0, tile, 2);
        token_tiles<BITS, R>(B, n0 + 1, tile, 2);
      }
    }
    for (; n0 < end; n0 += R) {
      if (n0 + R <= end) {
        token_tiles<BITS, R>(B, n0, tile);
      } else {
        for (int64_t n = n0; n < end; ++n) token_tiles<BITS, 1>(B, n, tile);
      }
    }
  });
}

struct Dims {
  int64_t B, K, N, G, gs;
  int64_t ws;  // bytes of codes per row: K, or K/2 for int4
  bool tiled;  // codes tiled [N/8, ws/64, 8, 64]
};

Dims check_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "activations: contiguous [B, K]");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 4 or 8");
  const bool tiled = w.dim() == 4;
  const int64_t B = x.size(0), K = x.size(1), N = tiled ? 8 * w.size(0) : w.size(0);
  TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64");
  const int64_t gs = group > 0 ? group : K;
  TORCH_CHECK(gs % 64 == 0, "group size must be a multiple of 64");
  const int64_t G = (K + gs - 1) / gs;  // a shorter last group when gs does not divide K (still a multiple of 64)
  const int64_t ws = bits == 8 ? K : K / 2;
  if (tiled) {
    TORCH_CHECK(ws % 64 == 0 && w.is_contiguous() && w.size(1) * 64 == ws && w.size(2) == 8 && w.size(3) == 64,
                "tiled codes: [N/8, C/64, 8, 64] with C = bytes per row (K, or K/2 for int4) a multiple of 64");
  } else {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == ws, "weight codes shape");
  }
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N * G, "scale: float [N, G]");
  TORCH_CHECK(zero.scalar_type() == at::kFloat && zero.is_contiguous() && zero.numel() == N * G, "zero: float [N, G]");
  return {B, K, N, G, gs, ws, tiled};
}

// The float epilogue the grouped tiles share.  In the group loop only one vector op per output:
// accf += scale[n, g] * (group lanes).  The zero-point term is left to the end and summed in double
// over the groups, eight at a time:  y = sum(accf) - sum_g scale[n, g] * zc[n, g] * xsum[b, g], where
// zc = zbase + (sym ? zsym : zero[n, g]) is the zero point in the domain of the codes the lanes
// multiplied.  (Doing that scalar double work per group doubled the instruction count of a 128-group.)
template <int RR, int T>
struct GroupSums {
  __m512 accf[RR][T];
  GroupSums() {
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < T; ++t) accf[r][t] = _mm512_setzero_ps();
  }
  void add(int r, int t, __m512 lanes, float sc) {
    accf[r][t] = _mm512_fmadd_ps(lanes, _mm512_set1_ps(sc), accf[r][t]);
  }
  template <typename XS>
  void store(float* y, int64_t N, int64_t n0, int64_t b0, const float* scale, const float* zero, bool sym,
             double zbase, double zsym, const XS* xsum, int64_t G, const float* sx = nullptr, int64_t rs = 1) const {
    for (int r = 0; r < RR; ++r) {
      const float* s = scale + (n0 + r * rs) * G;
      const float* z = zero + (n0 + r * rs) * G;
      for (int t = 0; t < T; ++t) {
        const XS* xs = xsum + (b0 + t) * G;
        __m512d c = _mm512_setzero_pd();
        for (int64_t g = 0; g < G; g += 8) {
          const __mmask8 m = G - g >= 8 ? 0xFF : static_cast<__mmask8>((1u << (G - g)) - 1);
          const __m512d sv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, s + g));
          const __m512d zv = sym ? _mm512_set1_pd(zbase + zsym)
                                 : _mm512_add_pd(_mm512_set1_pd(zbase), _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, z + g)));
          __m512d xv;
          if constexpr (std::is_same_v<XS, float>)
            xv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, xs + g));
          else
            xv = _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(m, xs + g));
          c = _mm512_fmadd_pd(_mm512_mul_pd(sv, zv), xv, c);
        }
        double v = static_cast<double>(_mm512_reduce_add_ps(accf[r][t])) - _mm512_reduce_add_pd(c);
        if (sx != nullptr) v *= sx[b0 + t];
        y[(b0 + t) * N + n0 + r * rs] = static_cast<float>(v);
      }
    }
  }
};

// ---- int8 activations ---------------------------------------------------------------------------

// int4 codes, 128 per step: the 64 bytes of a row give (b & 0x0F) ^ 0x08 = u (the even k) and
// (b & 0xF0) ^ 0x80 = 16 u (the odd k) in one ternary-logic op each (no shift, no 256-bit halves); the odd
// lanes accumulate 16 x sum u x in their own int32 accumulator, exactly divided by 16 (an arithmetic
// shift) when the group ends.  Activations in the order of w4_block128 (below).  No int32 overflow: a lane
// adds at most 4 * 240 * 128 per step, so a group may hold up to 2^31 / 122880 * 128 > 2 million codes.
inline bool w4_block128(int64_t K, int64_t gs) { return K % 128 == 0 && gs % 128 == 0; }

template <int RR, int T, bool TILED>
inline void int4_group128(const int8_t* const* xr, const uint8_t* const* rows, int64_t k0, int64_t k1,
                          __m512i (&acc)[RR][T]) {
  const __m512i mlo = _mm512_set1_epi8(0x0F), olo = _mm512_set1_epi8(0x08);
  const __m512i mhi = _mm512_set1_epi8((char)0xF0), ohi = _mm512_set1_epi8((char)0x80);
  __m512i acc16[RR][T];
  for (int r = 0; r < RR; ++r)
    for (int t = 0; t < T; ++t) acc16[r][t] = _mm512_setzero_si512();
  for (int64_t k = k0; k < k1; k += 128) {
    __m512i xe[T], xo[T];
    for (int t = 0; t < T; ++t) {
      xe[t] = _mm512_loadu_si512(xr[t] + k);
      xo[t] = _mm512_loadu_si512(xr[t] + k + 64);
    }
    for (int r = 0; r < RR; ++r) {
      const __m512i b = _mm512_loadu_si512(byte_at<TILED>(rows[r], k / 2));
      const __m512i lo = _mm512_ternarylogic_epi32(b, mlo, olo, 0x6A);  // (b & m) ^ o
      const __m512i hi = _mm512_ternarylogic_epi32(b, mhi, ohi, 0x6A);
      for (int t = 0; t < T; ++t) {
        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo, xe[t]);
        acc16[r][t] = _mm512_dpbusd_epi32(acc16[r][t], hi, xo[t]);
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_add_epi32(acc[r][t], _mm512_srai_epi32(acc16[r][t], 4));
}

template <int BITS, int RR, int T, bool TILED = false>
void int_tile(const int8_t* xp, const int32_t* xsum, const float* sx, const uint8_t* w, int64_t wstride,
              const float* scale, const float* zero, bool sym, int64_t n0, int64_t b0, int64_t K, int64_t G,
              int64_t gs, float* y, int64_t N, int64_t rs = 1) {
  constexpr int OFF = BITS == 8 ? 128 : 8;
  const uint8_t* rows[RR];
  for (int r = 0; r < RR; ++r) rows[r] = row_at<TILED>(w, wstride, n0 + r * rs);  // rs = 1 when TILED
  const int8_t* xr[T];
  for (int t = 0; t < T; ++t) xr[t] = xp + (b0 + t) * K;
  const bool b128 = BITS == 4 && w4_block128(K, gs);
  GroupSums<RR, T> sums;  // grouped weights
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[RR][T];
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
    const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
    if (b128) {
      int4_group128<RR, T, TILED>(xr, rows, k0, k1, acc);
    } else {
      for (int64_t k = k0; k < k1; k += 64) {
        __m512i xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(xr[t] + k);
        for (int r = 0; r < RR; ++r) {
          __m512i wv = load_w_u8<BITS>(byte_at<TILED>(rows[r], BITS == 8 ? k : k / 2));
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], wv, xv[t]);
        }
      }
    }
    if (G == 1) {  // per channel: one exact integer per output
      for (int r = 0; r < RR; ++r) {
        const float s = scale[n0 + r * rs];
        const int32_t zc = sym ? OFF : static_cast<int32_t>(zero[n0 + r * rs]);
        for (int t = 0; t < T; ++t) {
          int64_t d = static_cast<int64_t>(_mm512_reduce_add_epi32(acc[r][t])) - static_cast<int64_t>(zc) * xsum[b0 + t];
          y[(b0 + t) * N + n0 + r * rs] = static_cast<float>(static_cast<double>(s) * static_cast<double>(d) * sx[b0 + t]);
        }
      }
      return;
    }
    for (int r = 0; r < RR; ++r) {
      const float s = scale[(n0 + r * rs) * G + g];
      for (int t = 0; t < T; ++t) sums.add(r, t, _mm512_cvtepi32_ps(acc[r][t]), s);
    }
  }
  sums.store(y, N, n0, b0, scale, zero, sym, 0.0, OFF, xsum, G, sx, rs);
}

// int8_act_gemm's activation order for int4 weights: per 128-block [even k | odd k] (64 + 64) when
// w4_block128(K, gs), else per 64-block [even k | odd k] (32 + 32), as permute_rows
inline void permute_int8_w4(const int8_t* x, int8_t* out, int64_t B, int64_t K, int64_t gs) {
  if (!w4_block128(K, gs)) {
    permute_rows(x, out, B, K, true);
    return;
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < K; c += 128)
      for (int i = 0; i < 64; ++i) {
        out[b * K + c + i] = x[b * K + c + 2 * i];
        out[b * K + c + 64 + i] = x[b * K + c + 2 * i + 1];
      }
}

at::Tensor int8_act_gemm(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& w, const at::Tensor& scale,
                         const at::Tensor& zero, int64_t bits, int64_t group, bool sym) {
  TORCH_CHECK(xq.scalar_type() == at::kChar, "xq: int8");
  TORCH_CHECK(sx.scalar_type() == at::kFloat && sx.is_contiguous() && sx.numel() == xq.size(0), "sx: float [B]");
  const auto [B, K, N, G, gs, ws, tiled] = check_args(xq, w, scale, zero, bits, group);
  Prep p;
  p.xp.resize(B * K);
  if (bits == 4) permute_int8_w4(xq.data_ptr<int8_t>(), p.xp.data(), B, K, gs);
  else permute_rows(xq.data_ptr<int8_t>(), p.xp.data(), B, K, false);
  p.xsum.assign(B * G, 0);
  const int8_t* xd = xq.data_ptr<int8_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) s += xd[b * K + k];
      p.xsum[b * G + g] = s;
    }
  at::Tensor y = at::empty({B, N}, xq.options().dtype(at::kFloat));
  const uint8_t* wd = static_cast<const uint8_t*>(w.data_ptr());
  const float *sc = scale.data_ptr<float>(), *ze = zero.data_ptr<float>(), *sxd = sx.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  auto tile = [&]<int BITS, int RR, int T>(int64_t n0, int64_t b0, int64_t rs) {
    if (tiled) int_tile<BITS, RR, T, true>(p.xp.data(), p.xsum.data(), sxd, wd, ws, sc, ze, sym, n0, b0, K, G, gs, yd, N, rs);
    else int_tile<BITS, RR, T>(p.xp.data(), p.xsum.data(), sxd, wd, ws, sc, ze, sym, n0, b0, K, G, gs, yd, N, rs);
  };
  if (bits == 8) run_tiles<8>(B, N, tile, tiled);
  else run_tiles<4, true>(B, N, tile, tiled);
  return y;
}

// ---- float activations (weight-only) -------------------------------------------------------------

template <int BITS, int RR, int T, bool TILED = false>
void float_tile(const float* xp, const float* xsum, const uint8_t* w, int64_t wstride, const float* scale,
                const float* zero, bool sym, int64_t n0, int64_t b0, int64_t K, int64_t G, int64_t gs, float* y,
                int64_t N) {
  // per group: lanes accumulate sum x * u (u = unsigned code, exact in float); at the group end
  // y += scale * lanes, and the scalar scale * zc * sum x is removed at the end.
  constexpr int OFF = BITS == 8 ? 128 : 8;
  const uint8_t* rows[RR];
  for (int r = 0; r < RR; ++r) rows[r] = row_at<TILED>(w, wstride, n0 + r);
  GroupSums<RR, T> sums;
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[RR][T];
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); k += 64) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        __m512 xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(xp + (b0 + t) * K + k + 16 * q);
        for (int r = 0; r < RR; ++r) {
          __m512 wf = load16_w_f32<BITS>(byte_at<TILED>(rows[r], BITS == 8 ? k : k / 2), q);
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wf, xv[t], acc[r][t]);
        }
      }
    }
    for (int r = 0; r < RR; ++r) {
      const float sc = scale[(n0 + r) * G + g];
      for (int t = 0; t < T; ++t) sums.add(r, t, acc[r][t], sc);
    }
  }
  sums.store(y, N, n0, b0, scale, zero, sym, 0.0, OFF, xsum, G);
}

at::Tensor float_act_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                          int64_t bits, int64_t group, bool sym) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x: float32");
  const auto [B, K, N, G, gs, ws, tiled] = check_args(x, w, scale, zero, bits, group);
  std::vector<float> xp(B * K);
  permute_rows(x.data_ptr<float>(), xp.data(), B, K, bits == 4);
  std::vector<float> xsum(B * G, 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0.0;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) acc += xp[b * K + k];
      xsum[b * G + g] = static_cast<float>(acc);
    }
  at::Tensor y = at::empty({B, N}, x.options());
  const uint8_t* wd = static_cast<const uint8_t*>(w.data_ptr());
  const float *sc = scale.data_ptr<float>(), *ze = zero.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  auto tile = [&]<int BITS, int RR, int T>(int64_t n0, int64_t b0, int64_t) {  // rs = 1 (no PAIRS)
    if (tiled) float_tile<BITS, RR, T, true>(xp.data(), xsum.data(), wd, ws, sc, ze, sym, n0, b0, K, G, gs, yd, N);
    else float_tile<BITS, RR, T>(xp.data(), xsum.data(), wd, ws, sc, ze, sym, n0, b0, K, G, gs, yd, N);
  };
  if (bits == 8) run_tiles<8>(B, N, tile, tiled);
  else run_tiles<4>(B, N, tile, tiled);
  return y;
}

// ---- bf16 activations, int4 weights (W4A16 of a bf16 model) ---------------------------------------
//
// VDPBF16PS multiplies pairs of bf16 and accumulates in fp32; a product of two bf16 is exact in fp32,
// so with bf16 activations (the model's own values) the only rounding is the fp32 accumulation.  An
// int4 code becomes a bf16 without a shuffle: a 16-bit word holds four nibbles, and
// (word >> 4i) & 0xF | 0x4300 is the bf16 of 128 + u (0x4300 = 128.0, whose mantissa step is 1), so
//   sum_k x_k (128 + u_k) - (128 + zc) sum_k x_k = sum_k x_k (u_k - zc).
// Word j of a 64-byte block (128 codes from k0) holds codes k0+4j..4j+3: vector i pairs with the
// activations x[k0 + 4j + i], j = 0..31, laid out once per call (in bf16_act_gemm).  Needs K % 128 == 0
// and group % 128 == 0 (checked in Python: kernels._bf16_ok).
#ifdef __AVX512BF16__
constexpr bool kHaveBf16 = true;

// One token, groups of 128 (W4A16 g128, the usual weight-only scheme): a group is one 128-code step, and each
// row's step goes into its float accumulator at once (no accumulator per row held across the rows), and an
// 8-row tile of tiled codes prefetches its stream TILE_PREFETCH bytes ahead (PREFETCHT2).  Both measured in
// the fused decode step on the 7B stack (AMD Zen 4, docs/runtime.md "W4A16 at decode (session 42)"):
// about 1.1x each, 1.2-1.3x together.  Same sums in the same order: bit-identical results.
constexpr int64_t TILE_PREFETCH = 8192;

template <int RR, int T, bool TILED = false>
void bf16_tile(const uint16_t* xp, const float* xsum, const uint8_t* w, int64_t wstride, const float* scale,
               const float* zero, bool sym, int64_t n0, int64_t b0, int64_t K, int64_t G, int64_t gs, float* y,
               int64_t N, int64_t rs = 1) {
  const uint8_t* rows[RR];
  for (int r = 0; r < RR; ++r) rows[r] = row_at<TILED>(w, wstride, n0 + r * rs);  // rs = 1 when TILED
  GroupSums<RR, T> sums;
  // (nibble & 0xF) ^ 0x4308: the stored two's complement nibble made unsigned (^ 8) and the bf16 of
  // 128 + u (| 0x4300) in one ternary-logic op
  const __m512i nib = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4308);
  if constexpr (T == 1) {
    if (gs == 128) {
      const uint16_t* x = xp + b0 * K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k = g * 128;
        __m512bh xv[4];
        for (int i = 0; i < 4; ++i) xv[i] = (__m512bh)_mm512_loadu_si512(x + k + 32 * i);
        for (int r = 0; r < RR; ++r) {
          __m512i wv = _mm512_loadu_si512(byte_at<TILED>(rows[r], k / 2));
          __asm__("" : "+v"(wv));
          if constexpr (TILED && RR == TILE_ROWS)  // line r of the tile's 512 bytes TILE_PREFETCH ahead
            _mm_prefetch(reinterpret_cast<const char*>(byte_at<TILED>(rows[0], k / 2)) + TILE_PREFETCH + 64 * r,
                         _MM_HINT_T2);
          __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            const __m512i sh = i == 0 ? wv : _mm512_srli_epi16(wv, 4 * i);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_ternarylogic_epi32(sh, nib, magic, 0x6A), xv[i]);
          }
          sums.add(r, 0, acc, scale[(n0 + r * rs) * G + g]);
        }
      }
      sums.store(y, N, n0, b0, scale, zero, sym, 128.0, 8.0, xsum, G, nullptr, rs);
      return;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[RR][T];  // one accumulator per output: a second one (shorter chains) cost register spills
    for (int r = 0; r < RR; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); k += 128) {
      __m512bh xv[4][T];
      for (int i = 0; i < 4; ++i)
        for (int t = 0; t < T; ++t)
          xv[i][t] = (__m512bh)_mm512_loadu_si512(xp + (b0 + t) * K + k + 32 * i);
      for (int r = 0; r < RR; ++r) {
        __m512i wv = _mm512_loadu_si512(byte_at<TILED>(rows[r], k / 2));
        __asm__("" : "+v"(wv));  // one load per row: GCC otherwise re-reads the line for each shift (and spills)
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m512i sh = i == 0 ? wv : _mm512_srli_epi16(wv, 4 * i);
          const __m512bh wb = (__m512bh)_mm512_ternarylogic_epi32(sh, nib, magic, 0x6A);  // (a & b) ^ c
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wb, xv[i][t]);
        }
      }
    }
    for (int r = 0; r < RR; ++r) {
      const float sc = scale[(n0 + r * rs) * G + g];
      for (int t = 0; t < T; ++t) sums.add(r, t, acc[r][t], sc);
    }
  }
  sums.store(y, N, n0, b0, scale, zero, sym, 128.0, 8.0, xsum, G, nullptr, rs);
}
#else
constexpr bool kHaveBf16 = false;
#endif

at::Tensor bf16_act_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                         int64_t bits, int64_t group, bool sym) {
  TORCH_CHECK(kHaveBf16, "bf16_act_gemm: built without AVX512_BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x: bfloat16");
  TORCH_CHECK(bits == 4, "bf16_act_gemm: int4 weights only");
  const auto [B, K, N, G, gs, ws, tiled] = check_args(x, w, scale, zero, bits, group);
  TORCH_CHECK(K % 128 == 0 && gs % 128 == 0, "bf16_act_gemm: K and group must be multiples of 128");
  at::Tensor y = at::empty({B, N}, x.options().dtype(at::kFloat));
#ifdef __AVX512BF16__
  const uint16_t* xd = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<uint16_t> xp(B * K);
  std::vector<float> xsum(B * G, 0.f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < K; c += 128)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 32; ++j) xp[b * K + c + 32 * i + j] = xd[b * K + c + 4 * j + i];
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0.0;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) {
        uint32_t u = static_cast<uint32_t>(xd[b * K + k]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        acc += f;
      }
      xsum[b * G + g] = static_cast<float>(acc);
    }
  }
  const uint8_t* wd = static_cast<const uint8_t*>(w.data_ptr());
  const float *sc = scale.data_ptr<float>(), *ze = zero.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  auto tile = [&]<int BITS, int RR, int T>(int64_t n0, int64_t b0, int64_t rs) {
    if (tiled) bf16_tile<RR, T, true>(xp.data(), xsum.data(), wd, ws, sc, ze, sym, n0, b0, K, G, gs, yd, N, rs);
    else bf16_tile<RR, T>(xp.data(), xsum.data(), wd, ws, sc, ze, sym, n0, b0, K, G, gs, yd, N, rs);
  };
  run_tiles<4, true>(B, N, tile, tiled);
#endif
  return y;
}

bool bf16_act_available() { return kHaveBf16; }

// ---- the per-token activation quantizer ---------------------------------------------------------
// Bit-identical to quantizer.quantize_activation, in one op (the torch form is ~8 ops per call, and
// inside torch.compile inductor rewrote its divisions): per row b of x [B, K] (fp32, bf16 or fp16),
//   s_b = max(max_k |x_bk| / qmax, eps)        (in x's dtype: one IEEE division, rounded to the dtype)
//   q_bk = clamp(rne(x_bk / s_b), -qmax, qmax)  (x_bk / s_b rounded to x's dtype first)
// as ATen's CPU kernels compute them (reduced types: float division, round-to-nearest-even back to the
// dtype; true divisions, never a reciprocal: no -ffast-math here).  Returns the int8 codes and s as
// float32 [B] (exact: s is a value of x's dtype).  Non-finite inputs are not specified.
template <typename T>
void quantize_rows(const T* x, int8_t* q, float* s, int64_t b0, int64_t b1, int64_t K, float qmax, T eps) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* row = x + b * K;
    float m = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(static_cast<float>(row[k]));
      m = a > m ? a : m;
    }
    T st = static_cast<T>(m / qmax);
    st = st < eps ? eps : st;  // clamp(min=eps) as std::max(a, min)
    const float sf = static_cast<float>(st);
    int8_t* qr = q + b * K;
    for (int64_t k = 0; k < K; ++k) {
      const float v = static_cast<float>(static_cast<T>(static_cast<float>(row[k]) / sf));
      float r = std::nearbyint(v);
      r = r < -qmax ? -qmax : (r > qmax ? qmax : r);
      qr[k] = static_cast<int8_t>(r);
    }
    s[b] = sf;
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, int64_t bits, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [B, K]");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits: 2..8");
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({B, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({B}, x.options().dtype(at::kFloat));
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  int8_t* qd = q.data_ptr<int8_t>();
  float* sd = s.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xd = static_cast<const T*>(x.data_ptr());
    const T e = static_cast<T>(static_cast<float>(eps));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { quantize_rows<T>(xd, qd, sd, b0, b1, K, qmax, e); });
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "quantize_act: x must be float32, bfloat16 or float16");
  }
  return {q, s};
}

}  // namespace

// runtime/fused_step.cpp includes this file for the tile kernels only (its ops are registered here)
#ifndef MMCOMPRESS_INT_GEMM_KERNELS_ONLY
TORCH_LIBRARY(mmcompress_int, m) {
  m.def("int8_act_gemm(Tensor xq, Tensor sx, Tensor w, Tensor scale, Tensor zero, int bits, int group, bool sym) -> Tensor");
  m.def("float_act_gemm(Tensor x, Tensor w, Tensor scale, Tensor zero, int bits, int group, bool sym) -> Tensor");
  m.def("bf16_act_gemm(Tensor x, Tensor w, Tensor scale, Tensor zero, int bits, int group, bool sym) -> Tensor");
  m.def("bf16_act_available() -> bool", &bf16_act_available);
  m.def("quantize_act(Tensor x, int bits, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcompress_int, CPU, m) {
  m.impl("int8_act_gemm", &int8_act_gemm);
  m.impl("float_act_gemm", &float_act_gemm);
  m.impl("bf16_act_gemm", &bf16_act_gemm);
  m.impl("quantize_act", &quantize_act);
}
#endif  // MMCOMPRESS_INT_GEMM_KERNELS_ONLY
