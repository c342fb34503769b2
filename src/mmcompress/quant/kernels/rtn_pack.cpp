// Round-to-nearest weight quantization in one pass per row (mmcompress data-free RTN).
//
// Bit-identical to quantizer.quantize_weight followed by pack_int4 (bits <= 4), as ATen's CPU kernels
// compute them.  Per row r of w [N, K] (fp32, bf16 or fp16; values are widened to float exactly) and
// group g of `group` consecutive columns (group <= 0 or >= K: the whole row; a partial last group is
// what the reference zero-pads, and zeros change neither max|w| nor the clamped min/max):
//   symmetric:  s = max(max|w| / qmax, eps)                        qmax = 2^(b-1) - 1
//               q = clamp(rne(w / s), -qmax, qmax)
//   asymmetric: lo = min(min w, 0), hi = max(max w, 0), d = (hi - lo) / qmax,   qmax = 2^b - 1
//               z = rne(-lo / max(d, eps)), s = max(d, eps)
//               q = clamp(rne(w / s) + z, 0, qmax) - 2^(b-1)
// in float32: true IEEE divisions (no reciprocal: no -ffast-math here), rne = std::nearbyint under the
// default rounding mode (round half to even, as torch.round).  bits <= 4: codes packed two per byte,
// low nibble = even column, high nibble = odd column, a zero high nibble in the last byte of an odd row.
//
// quantize_weight_(w, codes, scale, zero, bits, group, sym) writes into the given tensors (the caller
// reuses them: no fresh pages per tensor) and returns false when a group's statistics are not finite
// (NaN or inf in w), or when an asymmetric group holds -0.0 and no negative value (the sign of the
// reference's zero point then depends on ATen's reduction order): the caller redoes such a tensor with
// the reference.
//
// One thread: the data-free pipeline overlaps it with its reader and writer threads, and on a machine
// shared with other jobs an OpenMP team waits for its slowest (descheduled) thread at every call.
// Registered as torch.ops.mmcompress_rtn.* (no pybind: faster to compile).

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline void widen(const float* x, float* out, int64_t n) { std::memcpy(out, x, n * sizeof(float)); }

inline void widen(const c10::BFloat16* x, float* out, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = static_cast<uint32_t>(u[k]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    out[k] = f;
  }
}

inline void widen(const c10::Half* x, float* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(x[k]);
}

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// One group: statistics -> (scale, zero), codes into q.  Returns false if the statistics are not finite.
// The statistics are integer max/min reductions over the floats' bit patterns (a float max reduction
// does not vectorize without -ffast-math): |w| compares as its bits (NaN above inf), and a signed float
// as the monotone key bits ^ ((bits >> 31) & 0x7fffffff) (-0.0 -> -1, just below +0.0 -> 0).
inline bool quantize_group(const float* w, int8_t* q, int64_t n, bool sym, float qmax, float shift, float* scale,
                           float* zero) {
  constexpr float eps = 1e-10f;  // quantizer._EPS as float32 (ATen casts the clamp bound to the dtype)
  constexpr uint32_t kInf = 0x7f800000u;
  const uint32_t* u = reinterpret_cast<const uint32_t*>(w);
  float s, z = 0.f;
  if (sym) {
    uint32_t m = 0;
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t a = u[k] & 0x7fffffffu;
      m = a > m ? a : m;
    }
    if (m >= kInf) {  // NaN or inf
      *scale = *zero = 0.f;
      return false;
    }
    s = from_bits(m) / qmax;
    s = s < eps ? eps : s;
  } else {
    int32_t lo = 0, hi = 0;  // keys of min(w, +0.0) and max(w, +0.0)
    for (int64_t k = 0; k < n; ++k) {
      const int32_t b = static_cast<int32_t>(u[k]);
      const int32_t key = b ^ ((b >> 31) & 0x7fffffff);
      lo = key < lo ? key : lo;
      hi = key > hi ? key : hi;
    }
    // NaN or inf; or a -0.0 and no negative value: then the reference's min(w.amin(), 0) may be -0.0
    // (z = +0.0) or +0.0 (z = -0.0) depending on ATen's reduction, so that tensor is left to it
    if (hi >= static_cast<int32_t>(kInf) || lo <= static_cast<int32_t>(kInf ^ 0xffffffffu) || lo == -1) {
      *scale = *zero = 0.f;
      return false;
    }
    const float flo = lo < 0 ? from_bits(static_cast<uint32_t>(lo ^ 0x7fffffff)) : 0.f;
    const float fhi = from_bits(static_cast<uint32_t>(hi));
    const float d = (fhi - flo) / qmax;
    s = d < eps ? eps : d;
    z = std::nearbyint(-flo / s);
  }
  *scale = s;
  *zero = z;
  if (!std::isfinite(s) || !std::isfinite(z)) return false;
  if (sym) {
    for (int64_t k = 0; k < n; ++k) {
      float r = std::nearbyint(w[k] / s);
      r = r < -qmax ? -qmax : (r > qmax ? qmax : r);
      q[k] = static_cast<int8_t>(r);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      float r = std::nearbyint(w[k] / s) + z;
      r = r < 0.f ? 0.f : (r > qmax ? qmax : r);
      q[k] = static_cast<int8_t>(static_cast<int>(r - shift));
    }
  }
  return true;
}

template <typename T>
bool run(const at::Tensor& w, at::Tensor& codes, at::Tensor& scale, at::Tensor& zero, int64_t bits, int64_t group,
         bool sym) {
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t gs = (group <= 0 || group >= K) ? K : group;
  const int64_t G = (K + gs - 1) / gs;
  const float qmax = sym ? static_cast<float>((1 << (bits - 1)) - 1) : static_cast<float>((1 << bits) - 1);
  const float shift = static_cast<float>(1 << (bits - 1));
  const bool packed = bits <= 4;
  const T* wd = static_cast<const T*>(w.data_ptr());
  float* sd = scale.data_ptr<float>();
  float* zd = zero.data_ptr<float>();
  uint8_t* cd = static_cast<uint8_t*>(codes.data_ptr());
  const int64_t row_bytes = packed ? (K + 1) / 2 : K;
  std::vector<float> f(K);
  std::vector<int8_t> q(packed ? K + 1 : 0);
  bool good = true;
  for (int64_t r = 0; r < N; ++r) {
    widen(wd + r * K, f.data(), K);
    int8_t* qr = packed ? q.data() : reinterpret_cast<int8_t*>(cd + r * row_bytes);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs, n = std::min(gs, K - k0);
      good &= quantize_group(f.data() + k0, qr + k0, n, sym, qmax, shift, sd + r * G + g, zd + r * G + g);
    }
    if (packed) {
      q[K] = 0;
      uint8_t* out = cd + r * row_bytes;
      const int8_t* pairs = q.data();
      for (int64_t j = 0; j < row_bytes; ++j)
        out[j] = static_cast<uint8_t>((pairs[2 * j] & 0xF) | ((pairs[2 * j + 1] & 0xF) << 4));
    }
  }
  return good;
}

bool quantize_weight_(const at::Tensor& w, at::Tensor codes, at::Tensor scale, at::Tensor zero, int64_t bits,
                      int64_t group, bool sym) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w: contiguous [N, K]");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits: 2..8");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t gs = (group <= 0 || group >= K) ? K : group;
  const int64_t G = (K + gs - 1) / gs;
  TORCH_CHECK(codes.is_contiguous() && codes.element_size() == 1 && codes.numel() == N * (bits <= 4 ? (K + 1) / 2 : K),
              "codes: contiguous int8/uint8 [N, K] (or [N, ceil(K/2)] at <= 4 bits)");
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous() && scale.scalar_type() == at::kFloat &&
                  zero.scalar_type() == at::kFloat && scale.numel() == N * G && zero.numel() == N * G,
              "scale, zero: contiguous float32 [N, G]");
  switch (w.scalar_type()) {
    case at::kFloat: return run<float>(w, codes, scale, zero, bits, group, sym);
    case at::kBFloat16: return run<c10::BFloat16>(w, codes, scale, zero, bits, group, sym);
    case at::kHalf: return run<c10::Half>(w, codes, scale, zero, bits, group, sym);
    default: TORCH_CHECK(false, "quantize_weight_: w must be float32, bfloat16 or float16");
  }
  return false;
}

}  // namespace

TORCH_LIBRARY(mmcompress_rtn, m) {
  m.def("quantize_weight_(Tensor w, Tensor(a!) codes, Tensor(b!) scale, Tensor(c!) zero, int bits, int group, "
        "bool sym) -> bool");
}

TORCH_LIBRARY_IMPL(mmcompress_rtn, CPU, m) { m.impl("quantize_weight_", &quantize_weight_); }
