// y = x @ W for a CPU with AVX-512: W stored float16, packed in column tiles; arithmetic in float32.
//
// A decode step or a verify multiplies a few rows by every weight matrix once, so it is
// bound by reading the weights. Packed as [N/32, K, 32] float16 (exact for weights that
// float16 holds), each tile of 32 output columns is read once, sequentially, for up to
// ROW_BLOCK rows at a time, and widened to float32 in registers. Every output element is
// summed over k = 0..K-1 in order, whatever the number of rows: a row's result does not
// depend on the batch it runs in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t TILE = 32;      // output columns per packed tile: two 16-float registers
constexpr int64_t ROW_BLOCK = 8;  // rows whose accumulators stay in registers (2 x 8 of 32)

template <int64_t ROWS>
void multiply_tile(const float* x, int64_t ldx, const uint16_t* tile, int64_t K, float* y, int64_t ldy) {
  __m512 low[ROWS], high[ROWS];
  for (int64_t r = 0; r < ROWS; ++r) {
    low[r] = _mm512_setzero_ps();
    high[r] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w_low = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + k * TILE)));
    const __m512 w_high = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + k * TILE + 16)));
    for (int64_t r = 0; r < ROWS; ++r) {
      const __m512 xk = _mm512_set1_ps(x[r * ldx + k]);
      low[r] = _mm512_fmadd_ps(xk, w_low, low[r]);
      high[r] = _mm512_fmadd_ps(xk, w_high, high[r]);
    }
  }
  for (int64_t r = 0; r < ROWS; ++r) {
    _mm512_storeu_ps(y + r * ldy, low[r]);
    _mm512_storeu_ps(y + r * ldy + 16, high[r]);
  }
}

// rows (at most ROW_BLOCK) of x times one packed tile: y[:rows, :TILE]
void multiply_block(const float* x, int64_t rows, const uint16_t* tile, int64_t K, float* y, int64_t N) {
  switch (rows) {
    case 1: return multiply_tile<1>(x, K, tile, K, y, N);
    case 2: return multiply_tile<2>(x, K, tile, K, y, N);
    case 3: return multiply_tile<3>(x, K, tile, K, y, N);
    case 4: return multiply_tile<4>(x, K, tile, K, y, N);
    case 5: return multiply_tile<5>(x, K, tile, K, y, N);
    case 6: return multiply_tile<6>(x, K, tile, K, y, N);
    case 7: return multiply_tile<7>(x, K, tile, K, y, N);
    default: return multiply_tile<ROW_BLOCK>(x, K, tile, K, y, N);
  }
}

// x [..., K] float32, packed [N/32, K, 32] float16 -> [..., N] float32
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kHalf, "packed_linear: float32 x, float16 packed");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == TILE && packed.size(1) == x.size(-1), "packed_linear: shapes");
  const int64_t K = x.size(-1), N = packed.size(0) * TILE;
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = rows.const_data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::Half>());
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {  // a tile is read from memory once, then from cache for each row block
      for (int64_t m = 0; m < M; m += ROW_BLOCK) {
        multiply_block(xp + m * K, std::min(ROW_BLOCK, M - m), wp + t * K * TILE, K, yp + m * N + t * TILE, N);
      }
    }
  });
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(specfleet, m) {
  m.def("packed_linear(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(specfleet, CPU, m) {
  m.impl("packed_linear", &packed_linear);
}
