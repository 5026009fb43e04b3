// Causal attention of a step's queries over the keys and values a KV store holds, for a CPU with AVX-512.
//
// A decode step or a verify has a few queries per sequence and hundreds of cached keys. Written
// in torch ops, the attention copies each row's keys out of the store or (compiled) runs as
// scalar reductions; here each query reads its sequence's keys and values in place, one
// vector of head_dim floats at a time, with the causal (and sliding-window) limits taken from
// the query's position instead of a mask tensor. Each query's result depends only on its own
// vector and the keys it sees, summed in key order: not on the batch or the width of the step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t LANES = 16;                  // floats per AVX-512 register
constexpr int64_t MAX_HEAD_DIM = 256;          // a head's accumulators live in registers
constexpr int64_t MAX_VECTORS = MAX_HEAD_DIM / LANES;

// e^x for 16 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; about 1 ulp)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline float dot(const float* a, const float* b, int64_t vectors) {
  __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int64_t i = 1; i < vectors; ++i) {
    sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * LANES), _mm512_loadu_ps(b + i * LANES), sum);
  }
  return _mm512_reduce_add_ps(sum);
}

// softmax(q . keys[first:last] * scale) @ values[first:last] for one query and head -> out [D];
// keys/values point at the head's first position, `stride` floats apart; scores is scratch
void attend(const float* q, const float* keys, const float* values, int64_t stride, int64_t first, int64_t last,
            int64_t vectors, float scale, float* scores, float* out) {
  const int64_t count = last - first;
  if (count <= 0) {
    std::fill(out, out + vectors * LANES, 0.0f);
    return;
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    scores[i] = dot(q, keys + (first + i) * stride, vectors) * scale;
    top = std::max(top, scores[i]);
  }
  const __m512 shift = _mm512_set1_ps(top);
  __m512 total = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + LANES <= count; i += LANES) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + i), shift));
    _mm512_storeu_ps(scores + i, e);
    total = _mm512_add_ps(total, e);
  }
  if (i < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - i)) - 1u);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + i), shift));
    _mm512_mask_storeu_ps(scores + i, tail, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
  }
  const float inverse = 1.0f / _mm512_reduce_add_ps(total);
  __m512 acc[MAX_VECTORS];
  for (int64_t v = 0; v < vectors; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const __m512 weight = _mm512_set1_ps(scores[j]);
    const float* row = values + (first + j) * stride;
    for (int64_t v = 0; v < vectors; ++v) acc[v] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(row + v * LANES), acc[v]);
  }
  const __m512 norm = _mm512_set1_ps(inverse);
  for (int64_t v = 0; v < vectors; ++v) _mm512_storeu_ps(out + v * LANES, _mm512_mul_ps(acc[v], norm));
}

// q [B, T, Hq, D]; keys, values [S, P, Hkv, D] (one layer of the store); slots [B], positions [B, T] long.
// A query at position p sees keys max(0, p - window + 1) (window > 0) .. p: the step's new keys are written first.
// Returns [B, T, Hq, D].
at::Tensor cached_attention(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& slots_in, const at::Tensor& positions_in, int64_t window,
                            double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
              values.scalar_type() == at::kFloat, "cached_attention: float32 tensors");
  TORCH_CHECK(q_in.dim() == 4 && keys.dim() == 4 && keys.sizes() == values.sizes(), "cached_attention: shapes");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "cached_attention: a contiguous store");
  const int64_t B = q_in.size(0), T = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t P = keys.size(1), Hkv = keys.size(2);
  TORCH_CHECK(keys.size(3) == D && D % LANES == 0 && D <= MAX_HEAD_DIM && Hq % Hkv == 0,
              "cached_attention: head_dim a multiple of 16 up to 256, query heads a multiple of key heads");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  const at::Tensor positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == B && positions.numel() == B * T, "cached_attention: slots [B], positions [B, T]");
  at::Tensor out = at::empty_like(q);
  const float* qp = q.const_data_ptr<float>();
  const float* kp = keys.const_data_ptr<float>();
  const float* vp = values.const_data_ptr<float>();
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  const int64_t* pp = positions.const_data_ptr<int64_t>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t groups = Hq / Hkv, stride = Hkv * D, vectors = D / LANES;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(P);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / Hkv, h = unit % Hkv;
      TORCH_CHECK(sp[b] >= 0 && sp[b] < keys.size(0), "cached_attention: slot out of range");
      const int64_t head = (sp[b] * P * Hkv + h) * D;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t position = pp[b * T + t];
        TORCH_CHECK(position >= 0 && position < P, "cached_attention: position outside the store");
        const int64_t last = position + 1;
        const int64_t first = window > 0 ? std::max<int64_t>(0, position - window + 1) : 0;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t at = ((b * T + t) * Hq + h * groups + g) * D;
          attend(qp + at, kp + head, vp + head, stride, first, last, vectors, static_cast<float>(scale),
                 scores.data(), op + at);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specfleet, m) {
  m.def("cached_attention(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor positions, int window, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(specfleet, CPU, m) {
  m.impl("cached_attention", &cached_attention);
}
