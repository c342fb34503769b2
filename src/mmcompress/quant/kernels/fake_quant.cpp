// Smoothed weight fake quantization with its gradient, one pass per row (MASQuant's training, E8).
//
// MASQuant trains its smoothing vector s through the quantized weight Q(W diag(s)) at every step, for
// every smoothed linear and every modality in the sample.  As a chain of torch ops (mul, abs, amax,
// div, round, mul; and about twenty passes in autograd's backward) that was most of the training time;
// here the forward is one pass per row and the backward one more.  Per row r of W [N, K] and group j of
// `group` consecutive columns (group <= 0: the whole row; the caller sends only groups that divide K),
// with x = W_rk * s_k (float32 product):
//   forward:   a = max_k |x_k|,  p = a / qmax,  D = max(p, eps)
//              q_k = rne(x_k / D) (|q_k| <= qmax as a is finite),  out_k = q_k * D
//   backward (straight-through rounding, gradients through D and a as autograd gives them):
//              gD  = sum_k g_k q_k - sum_k (g_k D) * ((x_k / D) / D),   0 where !(p >= eps)
//              ga  = gD / qmax,  c = #{k : |x_k| = a}
//              gx_k = (g_k D) / D  +  [|x_k| = a] * (ga / c) * sgn(x_k)
//              grad_s_k = sum_r gx_rk * W_rk
// These are the operations of quantizer._absmax_fake_quant_reference applied to W * s and of autograd's
// formulas for them (mul, clamp_min, div, amax, abs), in float32 (true IEEE divisions, no -ffast-math;
// rne = std::nearbyint, round half to even as torch.round): the forward's out, q and D equal the
// reference bit for bit.  The two sums of gD and the sum over rows of grad_s are accumulated in double
// (the reference sums float32 in ATen's order): the gradient equals the reference's to float32
// round-off of those sums (tests/test_fake_quant_kernel.py states the bound).
//
// smoothed_weight_fq(w, s, qmax, group) -> (out, q int8, D [N, G], a [N, G], ok); ok is false when some
// |x| is not finite (NaN or inf): the caller then uses the reference (its clamp is not the identity).
// smoothed_weight_fq_backward(g, w, s, q, D, a, qmax, group) -> grad_s [K] float32.
// Rows are split in fixed blocks of kRows (the grad_s partial sums per block are added in block order):
// the result does not depend on the number of threads.  Registered as torch.ops.mmcompress_fq.*.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr float kEps = 1e-10f;  // quantizer._EPS as float32 (ATen casts the clamp bound to the dtype)
constexpr int64_t kRows = 32;   // rows per block of the backward's partial sums

inline int64_t group_len(int64_t group, int64_t K) { return (group <= 0 || group >= K) ? K : group; }

void check(const at::Tensor& w, const at::Tensor& s, int64_t group, double qmax) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat, "w: contiguous float32 [N, K]");
  TORCH_CHECK(s.dim() == 1 && s.is_contiguous() && s.scalar_type() == at::kFloat && s.size(0) == w.size(1),
              "s: contiguous float32 [K]");
  TORCH_CHECK(w.size(1) % group_len(group, w.size(1)) == 0, "group must divide K");
  TORCH_CHECK(qmax >= 1 && qmax <= 127, "qmax: 1..127 (codes are int8)");
}

// rne(v) for |v| < 2^22 (here |v| <= qmax (1 + 2u)): adding and subtracting 1.5 * 2^23 leaves v rounded to
// an integer under the default rounding mode (half to even), as std::nearbyint; unlike the libm call it
// vectorizes.
inline float rne_small(float v) { return (v + 12582912.f) - 12582912.f; }

// One group of n values: x = w * s, a = max |x|, D, codes and out.  False when some x is NaN or inf.
bool forward_group(const float* __restrict w, const float* __restrict s, float* __restrict x, float* __restrict out,
                   int8_t* __restrict q, int64_t n, float qmax, float* D_out, float* a_out) {
  uint32_t m = 0;  // max |x| as the largest bit pattern of |x| (an integer max vectorizes; NaN sorts above inf)
  for (int64_t k = 0; k < n; ++k) {
    x[k] = w[k] * s[k];
    const uint32_t u = std::bit_cast<uint32_t>(x[k]) & 0x7fffffffu;
    m = u > m ? u : m;
  }
  if (m >= 0x7f800000u) return false;
  const float a = std::bit_cast<float>(m);
  const float p = a / qmax;
  const float D = p < kEps ? kEps : p;
  *D_out = D;
  *a_out = a;
  for (int64_t k = 0; k < n; ++k) {
    const float c = rne_small(x[k] / D);
    q[k] = static_cast<int8_t>(c);
    out[k] = c * D;
  }
  return true;
}

// One group's sums: s1 = sum g q, s2 = sum (g D) ((x / D) / D) in double, c = #{k : |x_k| = a}.  The
// reduction is vectorized (omp simd): its order is fixed by the build, the same on every run.
void backward_sums(const float* __restrict g, const float* __restrict w, const float* __restrict s,
                   const int8_t* __restrict q, int64_t n, float D, float a, double* s1_out, double* s2_out,
                   int64_t* c_out) {
  double s1 = 0.0, s2 = 0.0;
  int64_t c = 0;
#pragma omp simd reduction(+ : s1, s2, c)
  for (int64_t k = 0; k < n; ++k) {
    const float x = w[k] * s[k];
    s1 += static_cast<double>(g[k] * static_cast<float>(q[k]));
    s2 += static_cast<double>((g[k] * D) * ((x / D) / D));
    c += std::fabs(x) == a ? 1 : 0;
  }
  *s1_out = s1;
  *s2_out = s2;
  *c_out = c;
}

// One group's gx (the straight-through part, plus the amax part `per` at the maxima) times w, into acc.
void backward_accumulate(const float* __restrict g, const float* __restrict w, const float* __restrict s,
                         double* __restrict acc, int64_t n, float D, float a, float per) {
  for (int64_t k = 0; k < n; ++k) {
    const float x = w[k] * s[k];
    const float gx = (g[k] * D) / D;
    const float sg = x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f);
    const float gxa = std::fabs(x) == a ? gx + per * sg : gx;
    acc[k] += static_cast<double>(gxa * w[k]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> smoothed_weight_fq(const at::Tensor& w,
                                                                                   const at::Tensor& s, double qmax_d,
                                                                                   int64_t group) {
  check(w, s, group, qmax_d);
  const int64_t N = w.size(0), K = w.size(1), gs = group_len(group, K), G = K / gs;
  const float qmax = static_cast<float>(qmax_d);
  at::Tensor out = at::empty({N, K}, w.options());
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N, G}, w.options());
  at::Tensor amax = at::empty({N, G}, w.options());
  const float* wd = w.data_ptr<float>();
  const float* sd = s.data_ptr<float>();
  float* od = out.data_ptr<float>();
  int8_t* qd = q.data_ptr<int8_t>();
  float* dd = scale.data_ptr<float>();
  float* ad = amax.data_ptr<float>();
  std::vector<char> bad(N, 0);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> x(gs);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t o = r * K + j * gs;
        if (!forward_group(wd + o, sd + j * gs, x.data(), od + o, qd + o, gs, qmax, dd + r * G + j, ad + r * G + j))
          bad[r] = 1;
      }
  });
  bool ok = true;
  for (char b : bad) ok &= !b;
  return {out, q, scale, amax, ok};
}

at::Tensor smoothed_weight_fq_backward(const at::Tensor& g_in, const at::Tensor& w, const at::Tensor& s,
                                       const at::Tensor& q, const at::Tensor& scale, const at::Tensor& amax,
                                       double qmax_d, int64_t group) {
  check(w, s, group, qmax_d);
  const at::Tensor g = g_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), gs = group_len(group, K), G = K / gs;
  TORCH_CHECK(g.sizes() == w.sizes() && g.scalar_type() == at::kFloat, "g: float32 like w");
  TORCH_CHECK(q.sizes() == w.sizes() && q.is_contiguous() && q.scalar_type() == at::kChar, "q: int8 like w");
  TORCH_CHECK(scale.numel() == N * G && amax.numel() == N * G && scale.is_contiguous() && amax.is_contiguous(),
              "scale, amax: [N, G]");
  const float qmax = static_cast<float>(qmax_d);
  const float* gd = g.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  const float* sd = s.data_ptr<float>();
  const int8_t* qd = q.data_ptr<int8_t>();
  const float* dd = scale.data_ptr<float>();
  const float* ad = amax.data_ptr<float>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  std::vector<double> part(blocks * K, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = b * kRows; r < std::min(N, (b + 1) * kRows); ++r)
        for (int64_t j = 0; j < G; ++j) {
          const int64_t o = r * K + j * gs;
          const float D = dd[r * G + j], a = ad[r * G + j];
          double s1, s2;
          int64_t count;
          backward_sums(gd + o, wd + o, sd + j * gs, qd + o, gs, D, a, &s1, &s2, &count);
          const float p = a / qmax;
          const float gD = p >= kEps ? static_cast<float>(s1) + (-static_cast<float>(s2)) : 0.f;
          const float per = (gD / qmax) / static_cast<float>(count);
          backward_accumulate(gd + o, wd + o, sd + j * gs, part.data() + b * K + j * gs, gs, D, a, per);
        }
  });
  at::Tensor grad = at::empty({K}, w.options());
  float* out = grad.data_ptr<float>();
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double t = 0.0;
      for (int64_t b = 0; b < blocks; ++b) t += part[b * K + k];
      out[k] = static_cast<float>(t);
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY(mmcompress_fq, m) {
  m.def("smoothed_weight_fq(Tensor w, Tensor s, float qmax, int group) -> (Tensor, Tensor, Tensor, Tensor, bool)");
  m.def("smoothed_weight_fq_backward(Tensor g, Tensor w, Tensor s, Tensor q, Tensor scale, Tensor amax, float qmax, "
        "int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmcompress_fq, CPU, m) {
  m.impl("smoothed_weight_fq", &smoothed_weight_fq);
  m.impl("smoothed_weight_fq_backward", &smoothed_weight_fq_backward);
}
