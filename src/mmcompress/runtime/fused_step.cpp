// One decode step of a Llama-family decoder (Llama, Qwen2, Mistral without sliding window) in one C++
// call: embedding row, per layer RMSNorm -> q/k/v -> RoPE -> K/V into the static cache -> attention
// (GQA) -> o_proj -> residual -> RMSNorm -> gate/up -> SiLU * up -> down -> residual, final norm, LM head.
//
// The arithmetic is the Python fast path's (runtime/decode.py), op for op: every intermediate is rounded
// to the model dtype where the torch ops round it (bf16 models: after each elementwise op, each linear,
// the attention output), so the logits agree with it to float round-off.  Linears:
//   kind 0  dense nn.Linear in the model dtype (fp32 or bf16): our AVX-512 GEMV below (fp32 sums);
//   kind 1  deployed W8A8/W4A8/...: mmcompress_int::quantize_act + int8_act_gemm (the same ops the
//           deployed IntLinear calls, through the dispatcher);
//   kind 2  weight-only on float activations: mmcompress_int::float_act_gemm;
//   kind 3  weight-only int4 on bf16 activations: mmcompress_int::bf16_act_gemm.
// A smoothing row divides the input first (in the model dtype), as IntLinear does; linears that read
// the same smoothed input (q/k/v, gate/up) quantize it once (flag "share").
//
// A plan (the model's tensors, shapes and the engine's K/V caches, all by reference) is made once by
// fused_plan() and stepped by fused_step(plan, token, pos) -> logits [1, V] in the model dtype.
// Registered as torch.ops.mmcompress_fused.* (built like the other kernels: runtime/fused.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using GemmFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, int64_t, int64_t, bool);
using FloatGemmFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                               int64_t, bool);
using QuantFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, double);

struct IntOps {  // the deployed linears' own kernels (mmcompress_int, loaded by Python first)
  c10::TypedOperatorHandle<GemmFn> int8_gemm;
  c10::TypedOperatorHandle<FloatGemmFn> float_gemm, bf16_gemm;
  c10::TypedOperatorHandle<QuantFn> quant;
};

std::unique_ptr<IntOps> int_ops() {
  auto& d = c10::Dispatcher::singleton();
  return std::make_unique<IntOps>(IntOps{
      d.findSchemaOrThrow("mmcompress_int::int8_act_gemm", "").typed<GemmFn>(),
      d.findSchemaOrThrow("mmcompress_int::float_act_gemm", "").typed<FloatGemmFn>(),
      d.findSchemaOrThrow("mmcompress_int::bf16_act_gemm", "").typed<FloatGemmFn>(),
      d.findSchemaOrThrow("mmcompress_int::quantize_act", "").typed<QuantFn>()});
}

inline float to_bf16_value(float f) { return static_cast<float>(c10::BFloat16(f)); }

struct Lin {
  int64_t kind = 0, bits = 8, group = 0, abits = 8, N = 0, K = 0;
  bool sym = true, share = false;
  at::Tensor w, scale, zero;   // w: dense weight [N, K] (model dtype) or packed codes
  std::vector<float> bias;     // empty: none (values of the model dtype)
  std::vector<float> smooth;   // empty: none (values of the model dtype)
};

struct Layer {
  std::vector<float> ln1, ln2;
  Lin q, k, v, o, gate, up, down;
  at::Tensor kc, vc;  // [1, kv_heads, max_len, head_dim], model dtype, contiguous
};

struct Plan {
  int64_t H = 0, nh = 0, nkv = 0, hd = 0, L = 0, max_len = 0, V = 0, I = 0;
  bool bf16 = false;
  float eps = 1e-6f, scaling = 1.f;
  double qeps = 0.0;  // the activation quantizer's eps for the model dtype
  at::Tensor embed;   // [V, H] model dtype
  std::vector<float> norm, cos, sin;  // cos/sin [max_len, hd]
  Lin head;
  std::vector<Layer> layers;
  std::unique_ptr<IntOps> ops;
  // work buffers
  std::vector<float> h, x, xs, q, k, v, a, o, g, u, logits, scores;
  std::vector<uint16_t> xb;
  at::Tensor prep_x, prep_xq, prep_sx;  // the last linear's prepared input (for "share")
};

std::mutex g_mu;
std::vector<std::unique_ptr<Plan>> g_plans;

inline float rnd(const Plan& P, float v) { return P.bf16 ? to_bf16_value(v) : v; }

std::vector<float> floats(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {};
  at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// ---- dense GEMV: y[n] = sum_k W[n, k] x[k], W row-major in fp32 or bf16 -----------------------------

template <typename W>
inline __m512 load16(const W* p, __mmask16 m) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

template <typename W, int RR>
inline void gemv_rows(const W* w, const float* x, int64_t n0, int64_t K, float* y) {
  __m512 acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    for (int r = 0; r < RR; ++r) acc[r] = _mm512_fmadd_ps(load16<W>(w + (n0 + r) * K + k, m), xv, acc[r]);
  }
  for (int r = 0; r < RR; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]);
}

// 64-row units taken from an atomic counter by the threads of ATen's OpenMP team (as the int kernels'
// share_work: a descheduled helper does not hold a fixed share of the rows)
#ifdef __AVX512BF16__
// bf16 weights times bf16 activations (a bf16 model's activations are bf16 values): VDPBF16PS, exact
// products, fp32 sums, 32 codes per instruction without widening
template <int RR>
inline void gemv_rows_bf16(const uint16_t* w, const uint16_t* x, int64_t n0, int64_t K, float* y) {
  __m512 acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << (K - k)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
    for (int r = 0; r < RR; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + (n0 + r) * K + k), xv);
  }
  for (int r = 0; r < RR; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

template <typename W>
void dense_gemv(const W* w, const float* x, int64_t N, int64_t K, float* y) {
#ifdef __AVX512BF16__
  std::vector<uint16_t> xb;
  if constexpr (std::is_same_v<W, uint16_t>) {
    xb.resize(K);
    for (int64_t k = 0; k < K; ++k) xb[k] = c10::BFloat16(x[k]).x;  // exact: x holds bf16 values
  }
#endif
  constexpr int64_t UNIT = 64;
  const int64_t units = (N + UNIT - 1) / UNIT;
  auto body = [&](int64_t u) {
    const int64_t e = std::min(N, (u + 1) * UNIT);
    int64_t n = u * UNIT;
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<W, uint16_t>) {
      for (; n + 4 <= e; n += 4) gemv_rows_bf16<4>(w, xb.data(), n, K, y);
      for (; n < e; ++n) gemv_rows_bf16<1>(w, xb.data(), n, K, y);
      return;
    }
#endif
    for (; n + 4 <= e; n += 4) gemv_rows<W, 4>(w, x, n, K, y);
    for (; n < e; ++n) gemv_rows<W, 1>(w, x, n, K, y);
  };
  const int nt = std::max<int>(1, at::get_num_threads());
  if (nt == 1 || units == 1) {
    for (int64_t u = 0; u < units; ++u) body(u);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nt, units), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
           u = next.fetch_add(1, std::memory_order_relaxed))
        body(u);
  });
}

// ---- one linear ----------------------------------------------------------------------------------

void linear(Plan& P, const Lin& l, const float* x, float* out) {
  std::vector<float>& y = P.o;  // scratch large enough for any N (sized in fused_plan)
  if (l.kind == 0) {
    if (P.bf16)
      dense_gemv(reinterpret_cast<const uint16_t*>(l.w.data_ptr()), x, l.N, l.K, y.data());
    else
      dense_gemv(l.w.data_ptr<float>(), x, l.N, l.K, y.data());
    for (int64_t n = 0; n < l.N; ++n) out[n] = rnd(P, l.bias.empty() ? y[n] : y[n] + l.bias[n]);
    return;
  }
  if (!l.share) {  // smoothed input in the model dtype, as IntLinear: x / s (rounded)
    const float* src = x;
    if (!l.smooth.empty()) {
      for (int64_t k = 0; k < l.K; ++k) P.xs[k] = rnd(P, x[k] / l.smooth[k]);
      src = P.xs.data();
    } else if (src != P.xs.data()) {
      std::memcpy(P.xs.data(), x, l.K * sizeof(float));
    }
    const bool want_bf16 = P.bf16 && l.kind != 2;  // float_act_gemm takes fp32 activations
    if (want_bf16) {
      for (int64_t k = 0; k < l.K; ++k) P.xb[k] = c10::BFloat16(P.xs[k]).x;
      P.prep_x = at::from_blob(P.xb.data(), {1, l.K}, at::TensorOptions().dtype(at::kBFloat16));
    } else {
      P.prep_x = at::from_blob(P.xs.data(), {1, l.K}, at::TensorOptions().dtype(at::kFloat));
    }
    if (l.kind == 1) std::tie(P.prep_xq, P.prep_sx) = P.ops->quant.call(P.prep_x, l.abits, P.qeps);
  }
  at::Tensor r;
  if (l.kind == 1)
    r = P.ops->int8_gemm.call(P.prep_xq, P.prep_sx, l.w, l.scale, l.zero, l.bits, l.group, l.sym);
  else if (l.kind == 2)
    r = P.ops->float_gemm.call(P.prep_x, l.w, l.scale, l.zero, l.bits, l.group, l.sym);
  else
    r = P.ops->bf16_gemm.call(P.prep_x, l.w, l.scale, l.zero, l.bits, l.group, l.sym);
  const float* rd = r.data_ptr<float>();
  for (int64_t n = 0; n < l.N; ++n) out[n] = l.bias.empty() ? rnd(P, rd[n]) : rnd(P, rnd(P, rd[n]) + l.bias[n]);
}

// ---- the small ops -------------------------------------------------------------------------------

void rms_norm(const Plan& P, const float* h, const std::vector<float>& w, float* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < P.H; ++i) ss += h[i] * h[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(P.H) + P.eps);
  for (int64_t i = 0; i < P.H; ++i) out[i] = rnd(P, w[i] * rnd(P, h[i] * r));
}

void rope(const Plan& P, float* t, int64_t heads, int64_t pos) {
  const int64_t hd = P.hd, half = hd / 2;
  const float* c = P.cos.data() + pos * hd;
  const float* s = P.sin.data() + pos * hd;
  float tmp[1024];
  for (int64_t h = 0; h < heads; ++h) {
    float* v = t + h * hd;
    for (int64_t i = 0; i < hd; ++i) {
      const float rot = i < half ? -v[i + half] : v[i - half];
      tmp[i] = rnd(P, rnd(P, v[i] * c[i]) + rnd(P, rot * s[i]));
    }
    std::memcpy(v, tmp, hd * sizeof(float));
  }
}

template <typename T>
void attend(Plan& P, Layer& l, int64_t pos) {
  const int64_t hd = P.hd, T1 = pos + 1, rep = P.nh / P.nkv;
  T* kc = static_cast<T*>(l.kc.data_ptr());
  T* vc = static_cast<T*>(l.vc.data_ptr());
  for (int64_t j = 0; j < P.nkv; ++j)  // this token's K/V into the cache
    for (int64_t i = 0; i < hd; ++i) {
      kc[(j * P.max_len + pos) * hd + i] = static_cast<T>(P.k[j * hd + i]);
      vc[(j * P.max_len + pos) * hd + i] = static_cast<T>(P.v[j * hd + i]);
    }
  // threads over heads only when there is enough work to pay a fork-join (long contexts)
  const int64_t grain = T1 * hd >= (1 << 16) ? 1 : P.nh;
  at::parallel_for(0, P.nh, grain, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t j = h / rep;
      const float* qh = P.q.data() + h * hd;
      float* sc = P.scores.data() + h * P.max_len;
      float mx = -INFINITY;
      for (int64_t t = 0; t < T1; ++t) {
        const T* kt = kc + (j * P.max_len + t) * hd;
        float d = 0.f;
        for (int64_t i = 0; i < hd; ++i) d += qh[i] * static_cast<float>(kt[i]);
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
      float acc[1024];
      for (int64_t i = 0; i < hd; ++i) acc[i] = 0.f;
      for (int64_t t = 0; t < T1; ++t) {
        const T* vt = vc + (j * P.max_len + t) * hd;
        const float p = sc[t];
        for (int64_t i = 0; i < hd; ++i) acc[i] += p * static_cast<float>(vt[i]);
      }
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < hd; ++i) P.a[h * hd + i] = rnd(P, acc[i] * inv);
    }
  });
}

// ---- ops -----------------------------------------------------------------------------------------

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
  l.w = ts[ti++];
  l.scale = ts[ti++];
  l.zero = ts[ti++];
  l.bias = floats(ts[ti++]);
  l.smooth = floats(ts[ti++]);
  TORCH_CHECK(l.w.is_contiguous(), "fused_plan: weights must be contiguous");
  TORCH_CHECK(l.kind >= 0 && l.kind <= 3, "fused_plan: linear kind 0..3");
  TORCH_CHECK(l.kind != 0 || (l.w.dim() == 2 && l.w.size(0) == l.N && l.w.size(1) == l.K), "fused_plan: dense weight shape");
  TORCH_CHECK(l.kind == 0 || (l.w.dim() == 2 && l.w.size(0) == l.N), "fused_plan: weight codes shape");
  TORCH_CHECK((l.bias.empty() || static_cast<int64_t>(l.bias.size()) == l.N) &&
                  (l.smooth.empty() || static_cast<int64_t>(l.smooth.size()) == l.K),
              "fused_plan: bias or smoothing shape");
  return l;
}

// tensors: embed, final norm, cos [max_len, hd], sin, head (5), then per layer: ln1, ln2, kc, vc, and
// q, k, v, o, gate, up, down (5 each: weight, scale, zero, bias, smoothing; empty tensors for none).
// meta: H, nh, nkv, hd, L, max_len, V, I, bf16, then per linear (head first) kind, bits, group, sym,
// abits, share, N, K.  fmeta: rms eps, attention scaling, quantizer eps.
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
  bool any_int = P->head.kind != 0;
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
      any_int = any_int || p->kind != 0;
    }
    const int64_t H = P->H, qd = P->nh * P->hd, kd = P->nkv * P->hd, I = P->I;
    TORCH_CHECK(l.q.K == H && l.q.N == qd && l.k.K == H && l.k.N == kd && l.v.K == H && l.v.N == kd &&
                    l.o.K == qd && l.o.N == H && l.gate.K == H && l.gate.N == I && l.up.K == H && l.up.N == I &&
                    l.down.K == I && l.down.N == H && static_cast<int64_t>(l.ln1.size()) == H &&
                    static_cast<int64_t>(l.ln2.size()) == H,
                "fused_plan: layer shapes");
    P->layers.push_back(std::move(l));
  }
  TORCH_CHECK(ti == ts.size() && mi == meta.size(), "fused_plan: argument count");
  TORCH_CHECK(P->head.K == P->H && P->head.N == P->V && static_cast<int64_t>(P->norm.size()) == P->H &&
                  P->embed.size(1) == P->H && static_cast<int64_t>(P->cos.size()) == P->max_len * P->hd &&
                  static_cast<int64_t>(P->sin.size()) == P->max_len * P->hd,
              "fused_plan: head, norm, embedding or RoPE table shape");
  if (any_int) P->ops = int_ops();
  const int64_t big = std::max({P->H, P->I, P->V, P->nh * P->hd, P->nkv * P->hd});
  for (auto* b : {&P->h, &P->x, &P->xs, &P->q, &P->k, &P->v, &P->a, &P->o, &P->g, &P->u, &P->logits}) b->resize(big);
  P->xb.resize(big);
  P->scores.resize(P->nh * P->max_len);
  std::lock_guard<std::mutex> lock(g_mu);
  g_plans.push_back(std::move(P));
  return static_cast<int64_t>(g_plans.size() - 1);
}

void fused_free(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_plans.size()), "fused_free: no such plan");
  g_plans[id].reset();
}

at::Tensor fused_step(int64_t id, int64_t token, int64_t pos) {
  Plan* pp;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_plans.size()) && g_plans[id], "fused_step: no such plan");
    pp = g_plans[id].get();
  }
  Plan& P = *pp;
  TORCH_CHECK(token >= 0 && token < P.embed.size(0), "fused_step: token id out of range");
  TORCH_CHECK(pos >= 0 && pos < P.max_len, "fused_step: position beyond the cache");
  const int64_t H = P.H;
  if (P.bf16) {
    const uint16_t* e = reinterpret_cast<const uint16_t*>(P.embed.data_ptr()) + token * H;
    for (int64_t i = 0; i < H; ++i) P.h[i] = c10::BFloat16(e[i], c10::BFloat16::from_bits()).operator float();
  } else {
    std::memcpy(P.h.data(), P.embed.data_ptr<float>() + token * H, H * sizeof(float));
  }
  std::vector<float> tmp(P.h.size());  // o_proj and down outputs (H)
  for (Layer& l : P.layers) {
    rms_norm(P, P.h.data(), l.ln1, P.x.data());
    linear(P, l.q, P.x.data(), P.q.data());
    linear(P, l.k, P.x.data(), P.k.data());
    linear(P, l.v, P.x.data(), P.v.data());
    rope(P, P.q.data(), P.nh, pos);
    rope(P, P.k.data(), P.nkv, pos);
    if (P.bf16)
      attend<c10::BFloat16>(P, l, pos);
    else
      attend<float>(P, l, pos);
    linear(P, l.o, P.a.data(), tmp.data());
    for (int64_t i = 0; i < H; ++i) P.h[i] = rnd(P, P.h[i] + tmp[i]);
    rms_norm(P, P.h.data(), l.ln2, P.x.data());
    linear(P, l.gate, P.x.data(), P.g.data());
    linear(P, l.up, P.x.data(), P.u.data());
    for (int64_t i = 0; i < P.I; ++i) {
      const float g = P.g[i];
      P.g[i] = rnd(P, rnd(P, g / (1.f + std::exp(-g))) * P.u[i]);
    }
    linear(P, l.down, P.g.data(), tmp.data());
    for (int64_t i = 0; i < H; ++i) P.h[i] = rnd(P, P.h[i] + tmp[i]);
  }
  rms_norm(P, P.h.data(), P.norm, P.x.data());
  linear(P, P.head, P.x.data(), P.logits.data());
  at::Tensor out = at::empty({1, P.V}, at::TensorOptions().dtype(P.bf16 ? at::kBFloat16 : at::kFloat));
  if (P.bf16) {
    auto* od = reinterpret_cast<uint16_t*>(out.data_ptr());
    for (int64_t n = 0; n < P.V; ++n) od[n] = c10::BFloat16(P.logits[n]).x;
  } else {
    std::memcpy(out.data_ptr<float>(), P.logits.data(), P.V * sizeof(float));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(mmcompress_fused, m) {
  m.def("fused_plan(Tensor[] tensors, int[] meta, float[] fmeta) -> int", &fused_plan);
  m.def("fused_step(int plan, int token, int pos) -> Tensor", &fused_step);
  m.def("fused_free(int plan) -> ()", &fused_free);
}
