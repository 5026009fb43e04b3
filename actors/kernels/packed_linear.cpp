// y = x @ W for a CPU with AVX-512 or AVX2: W stored float16, packed in column tiles; arithmetic in float32.
//
// A decode step or a verify multiplies a few rows by every weight matrix once, so it is
// bound by reading the weights. Packed as [N/32, K, 32] float16 (exact for weights that
// float16 holds), each tile of 32 output columns is read once, sequentially, for up to
// ROW_BLOCK rows at a time, and widened to float32 in registers. A pass over the tile's
// k covers as many of its columns as the registers hold accumulators for: the whole tile
// on AVX-512; on AVX2 (16 registers) the whole tile for one or two rows, whose four
// independent sums per row keep the FMA units busy, and half of it twice for more rows.
// Every output element is summed over k = 0..K-1 in order, whatever the number of rows or
// the pass: a row's result does not depend on the batch it runs in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "simd.h"

namespace {

using simd::LANES;
using simd::Vec;
constexpr int64_t TILE = 32;                       // output columns per packed tile
constexpr int TILE_VECTORS = TILE / LANES;         // 2 on AVX-512, 4 on AVX2
constexpr int FEW_VECTORS = 2;                     // a pass's width where the whole tile's accumulators do not fit
// Weight rows a pass asks the cache for ahead of the one it multiplies (8 KB: two pages on, where the hardware's
// prefetcher, which stops at each page, does not reach): the tiles follow one another in memory, so near a tile's
// end it fetches the next one's. Target-xl's 22 MB of packed weights on an AMD EPYC (AVX2), medians interleaved in
// one process: 1 row 1.16 against 1.62 ms, 5 rows 2.20 against 2.68, 16 rows 5.11 against 5.65.
constexpr int64_t PREFETCH_K = 8192 / (TILE * sizeof(uint16_t));
constexpr int64_t ROW_BLOCK = std::min(8, (simd::REGISTERS - 4) / FEW_VECTORS);  // 8 on AVX-512, 6 on AVX2

// The vectors of columns a pass of ROWS rows covers: the whole tile where its accumulators, weights and x fit
template <int64_t ROWS>
constexpr int pass_vectors() {
  return (ROWS + 1) * TILE_VECTORS + 1 <= simd::REGISTERS ? TILE_VECTORS : FEW_VECTORS;
}

// ROWS rows of x times VECTORS * LANES columns of a tile (`tile` at the pass's first column)
template <int64_t ROWS, int VECTORS>
void multiply_pass(const float* x, int64_t ldx, const uint16_t* tile, int64_t K, float* y, int64_t ldy) {
  Vec acc[ROWS][VECTORS];
  for (int64_t r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = simd::zero();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(tile + (k + PREFETCH_K) * TILE), _MM_HINT_T0);
    Vec w[VECTORS];
    for (int v = 0; v < VECTORS; ++v) w[v] = simd::load_halves(tile + k * TILE + v * LANES);
    for (int64_t r = 0; r < ROWS; ++r) {
      const Vec xk = simd::set1(x[r * ldx + k]);
      for (int v = 0; v < VECTORS; ++v) acc[r][v] = simd::fmadd(xk, w[v], acc[r][v]);
    }
  }
  for (int64_t r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) simd::store(y + r * ldy + v * LANES, acc[r][v]);
}

// ROWS rows of x times one packed tile: y[:ROWS, :TILE], in passes as wide as the registers allow
template <int64_t ROWS>
void multiply_tile(const float* x, const uint16_t* tile, int64_t K, float* y, int64_t N) {
  constexpr int VECTORS = pass_vectors<ROWS>();
  for (int64_t column = 0; column < TILE; column += VECTORS * LANES) {
    multiply_pass<ROWS, VECTORS>(x, K, tile + column, K, y + column, N);
  }
}

template <int64_t... Rows>
void multiply_rows(int64_t rows, const float* x, const uint16_t* tile, int64_t K, float* y, int64_t N,
                   std::integer_sequence<int64_t, Rows...>) {
  ((rows == Rows + 1 ? multiply_tile<Rows + 1>(x, tile, K, y, N) : void()), ...);
}

// rows (at most ROW_BLOCK) of x times one packed tile: y[:rows, :TILE]
void multiply_block(const float* x, int64_t rows, const uint16_t* tile, int64_t K, float* y, int64_t N) {
  multiply_rows(rows, x, tile, K, y, N, std::make_integer_sequence<int64_t, ROW_BLOCK>());
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
