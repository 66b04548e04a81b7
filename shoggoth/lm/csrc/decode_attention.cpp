// One-query attention for decoding on CPU: each row's new query against its cached keys
// and values, with scores, softmax and the weighted sum in fp32 whatever the cache holds.
//
// Why it exists: a decode step's attention reads the whole KV cache once and does little
// arithmetic on it, so it runs at memory speed at best. PyTorch's CPU SDPA (flash) kernel
// reads a bf16 cache 2-3x slower than an fp32 one (batch 16, 4 heads of 64, 304 keys, two
// threads: 1240 vs 472 us), so a bf16 model had to keep an fp32 cache, twice the bytes.
// This loop reads bf16 (or fp32) keys and values straight into fp32 registers.
// shoggoth/kernels.py builds it on first use and falls back to SDPA where it cannot.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: widening is a shift, exact.
  uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// D is a template parameter for the common head widths (0: any), so that the compiler can
// unroll the loops over D. It came in one change with the four-key score loop below:
// together 301 -> 242 us at 304 keys (bf16, batch 16, 4 heads of 64, 2 threads).
template <typename T, int64_t FixedD>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask,
            int64_t mask_stride, float scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), S = k.size(2);
  const int64_t D = FixedD ? FixedD : q.size(2);
  const int64_t group = H / Hkv;
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  // One (row, head) per task: B * H tasks of S * D reads each.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(S);
    std::vector<float> qbuf(D), accbuf(D);
    float* qs = qbuf.data();
    float* acc = accbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, g = (i % H) / group;
      const T* kb = kp + b * ks0 + g * ks1;
      const T* vb = vp + b * vs0 + g * vs1;
      const bool* visible = mask ? mask + b * mask_stride : nullptr;
      for (int64_t d = 0; d < D; ++d) qs[d] = qp[i * D + d] * scale;
      // Scores four keys at a time: four independent sums keep the FMA units busy
      // while each one's horizontal add completes.
      int64_t t = 0;
      for (; t + 4 <= S; t += 4) {
        const T *k0 = kb + t * ks2, *k1 = k0 + ks2, *k2 = k1 + ks2, *k3 = k2 + ks2;
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t d = 0; d < D; ++d) {
          d0 += qs[d] * to_float(k0[d]);
          d1 += qs[d] * to_float(k1[d]);
          d2 += qs[d] * to_float(k2[d]);
          d3 += qs[d] * to_float(k3[d]);
        }
        score[t] = d0, score[t + 1] = d1, score[t + 2] = d2, score[t + 3] = d3;
      }
      for (; t < S; ++t) {
        const T* kr = kb + t * ks2;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qs[d] * to_float(kr[d]);
        score[t] = dot;
      }
      float top = -INFINITY;
      for (t = 0; t < S; ++t) {
        if (visible && !visible[t]) score[t] = -INFINITY;
        top = score[t] > top ? score[t] : top;
      }
      float total = 0.f;
      float* sp = score.data();
#pragma omp simd reduction(+ : total)
      for (t = 0; t < S; ++t) {
        const float e = expf(sp[t] - top);  // a masked key: exp(-inf) = 0
        sp[t] = e;
        total += e;
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (t = 0; t < S; ++t) {
        const float p = sp[t];
        if (p == 0.f) continue;  // masked keys (left padding) add nothing
        const T* vr = vb + t * vs2;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p * to_float(vr[d]);
      }
      for (int64_t d = 0; d < D; ++d) op[i * D + d] = acc[d] / total;
    }
  });
}

template <typename T>
void attend_any(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask,
                int64_t mask_stride, float scale, torch::Tensor& out) {
  switch (q.size(2)) {
    case 64: return attend<T, 64>(q, k, v, mask, mask_stride, scale, out);
    case 128: return attend<T, 128>(q, k, v, mask, mask_stride, scale, out);
    default: return attend<T, 0>(q, k, v, mask, mask_stride, scale, out);
  }
}

// The model's apply_rope, x * cos + rotate_half(x) * sin with sin's first half negated,
// rounded as PyTorch's three ops round it in T: each product, then the sum (bf16 ops
// compute in fp32 and round to bf16). `volatile` keeps the compiler from fusing a
// product and the sum into one FMA, which would round once instead of twice.
inline float rope(float x, float c, float r, float s) {
  volatile float a = x * c, b = r * s;
  return a + b;
}
inline c10::BFloat16 rope(c10::BFloat16 x, c10::BFloat16 c, c10::BFloat16 r, c10::BFloat16 s) {
  const c10::BFloat16 a = float(x) * float(c), b = float(r) * float(s);
  return c10::BFloat16(float(a) + float(b));
}

// RoPE on a row's heads (n of them, D wide, in x), written to out.
template <typename T>
void rope_heads(const T* x, const T* cos, const T* sin, int64_t n, int64_t D, T* out) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < n; ++h, x += D, out += D)
    for (int64_t d = 0; d < D; ++d) out[d] = rope(x[d], cos[d], d < half ? x[d + half] : x[d - half], sin[d]);
}

}  // namespace

// q (B, H, D) fp32; k, v (B, Hkv, S, D) fp32 or bf16 with unit stride along D (a narrowed
// cache is fine); mask (B, S) bool, True where a key is visible, or None. Every row must
// see at least one key. Returns (B, H, D) fp32: softmax(q k^T * scale) v.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const c10::optional<torch::Tensor>& mask, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "decode_attention: q (B, H, D), k and v (B, Hkv, S, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "decode_attention: q must be contiguous fp32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v differ in dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(2) &&
                  k.size(1) > 0 && q.size(1) % k.size(1) == 0, "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v need unit stride along D");
  const bool* mp = nullptr;
  int64_t mask_stride = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == k.size(0) &&
                    mask->size(1) == k.size(2) && mask->stride(1) == 1, "decode_attention: mask (B, S) bool");
    mp = mask->data_ptr<bool>();
    mask_stride = mask->stride(0);
  }
  auto out = torch::empty_like(q);
  if (k.scalar_type() == at::kBFloat16) {
    attend_any<c10::BFloat16>(q, k, v, mp, mask_stride, float(scale), out);
  } else {
    TORCH_CHECK(k.scalar_type() == at::kFloat, "decode_attention: k and v must be fp32 or bf16");
    attend_any<float>(q, k, v, mp, mask_stride, float(scale), out);
  }
  return out;
}

// A decode step's attention, from the fused q/k/v projection to the attention output,
// in one call: the model's RoPE on q and k, k and v written into the caches at column
// `pos`, and the attention of each query over columns 0..pos.
// qkv (B, (H + 2 Hkv) D) in the cache's dtype, row-major; cos, sin (B, D) in that dtype
// with unit stride along D; k_cache, v_cache (B, Hkv, S_max, D) contiguous; mask
// (B, >= pos + 1) bool or None. Returns (B, H * D) fp32. The same numbers as the model's
// ops followed by decode_attention (tests/test_engine.py checks it bit for bit).
template <typename T>
torch::Tensor step(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                   torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t pos, const bool* mask,
                   int64_t mask_stride, int64_t H) {
  const int64_t B = qkv.size(0), Hkv = k_cache.size(1), D = k_cache.size(3), S_max = k_cache.size(2);
  auto q = torch::empty({B, H, D}, qkv.options());
  const T* in = qkv.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t row = (H + 2 * Hkv) * D;
  std::vector<T> k(Hkv * D);  // one row's rotated keys
  for (int64_t b = 0; b < B; ++b) {  // B * (H + 2 Hkv) * D elements: too few to share out
    const T* x = in + b * row;
    const T* c = cos.data_ptr<T>() + b * cos.stride(0);
    const T* s = sin.data_ptr<T>() + b * sin.stride(0);
    rope_heads(x, c, s, H, D, q.data_ptr<T>() + b * H * D);
    rope_heads(x + H * D, c, s, Hkv, D, k.data());
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at = ((b * Hkv + g) * S_max + pos) * D;
      std::copy(k.begin() + g * D, k.begin() + (g + 1) * D, kc + at);
      std::copy(x + (H + Hkv + g) * D, x + (H + Hkv + g + 1) * D, vc + at);
    }
  }
  auto keys = k_cache.narrow(2, 0, pos + 1), values = v_cache.narrow(2, 0, pos + 1);
  auto qf = q.to(at::kFloat);
  auto out = torch::empty({B, H, D}, qf.options());
  attend_any<T>(qf, keys, values, mask, mask_stride, float(1.0 / std::sqrt(double(D))), out);
  return out.view({B, H * D});
}

torch::Tensor decode_step(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor k_cache, torch::Tensor v_cache, int64_t pos,
                          const c10::optional<torch::Tensor>& mask, int64_t n_head) {
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  cos.device().is_cpu() && sin.device().is_cpu(), "decode_step: CPU tensors");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_step: the cache must be fp32 or bf16");
  TORCH_CHECK(qkv.scalar_type() == dtype && cos.scalar_type() == dtype && sin.scalar_type() == dtype &&
                  v_cache.scalar_type() == dtype, "decode_step: qkv, cos, sin and the caches differ in dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(), "decode_step: caches (B, Hkv, S, D), contiguous");
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), D = k_cache.size(3);
  TORCH_CHECK(Hkv > 0 && n_head % Hkv == 0 && D % 2 == 0 && 0 <= pos && pos < k_cache.size(2), "decode_step: bad sizes");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B && qkv.size(1) == (n_head + 2 * Hkv) * D && qkv.is_contiguous(),
              "decode_step: qkv (B, (H + 2 Hkv) D), contiguous");
  TORCH_CHECK(cos.dim() == 2 && sin.dim() == 2 && cos.size(0) == B && sin.size(0) == B && cos.size(1) == D &&
                  sin.size(1) == D && cos.stride(1) == 1 && sin.stride(1) == 1, "decode_step: cos, sin (B, D)");
  const bool* mp = nullptr;
  int64_t mask_stride = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B &&
                    mask->size(1) > pos && mask->stride(1) == 1, "decode_step: mask (B, > pos) bool");
    mp = mask->data_ptr<bool>();
    mask_stride = mask->stride(0);
  }
  if (dtype == at::kBFloat16)
    return step<c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, pos, mp, mask_stride, n_head);
  return step<float>(qkv, cos, sin, k_cache, v_cache, pos, mp, mask_stride, n_head);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL while they run, as torch's own ops: other Python threads (the feedback
  // app's server) go on meanwhile.
  m.def("decode_attention", &decode_attention, "one-query attention over a KV cache (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_step", &decode_step, "RoPE, cache write and one-query attention of a decode step (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
