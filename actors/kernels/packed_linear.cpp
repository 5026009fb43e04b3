// y = x @ W for a CPU with AVX-512 or AVX2: W stored packed in column tiles, as float16 or as int8 with a scale per
// column; arithmetic in float32.
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
//
// An int8 tile ([N/32, 4 + K, 32] int8) starts with its 32 columns' float32 scales (the first 4 rows of 32
// bytes), then K rows of 32 int8 values: half the bytes of float16, for a drafter's weights (actors.packed_linear).
// Its sums are over the int8 values, scaled once at the end.
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
// How far ahead of the weight row it multiplies a pass asks the cache for weights (8 KB: two pages on, where the hardware's
// prefetcher, which stops at each page, does not reach): the tiles follow one another in memory, so near a tile's
// end it fetches the next one's. Target-xl's 22 MB of packed weights on an AMD EPYC (AVX2), medians interleaved in
// one process: 1 row 1.16 against 1.62 ms, 5 rows 2.20 against 2.68, 16 rows 5.11 against 5.65.
constexpr int64_t PREFETCH_BYTES = 8192;
constexpr int64_t SCALE_ROWS = sizeof(float);  // an int8 tile's leading rows of 32 bytes: its 32 float32 scales
constexpr int64_t ROW_BLOCK = std::min(8, (simd::REGISTERS - 4) / FEW_VECTORS);  // 8 on AVX-512, 6 on AVX2

// The vectors of columns a pass of ROWS rows covers: the whole tile where its accumulators, weights and x fit
template <int64_t ROWS>
constexpr int pass_vectors() {
  return (ROWS + 1) * TILE_VECTORS + 1 <= simd::REGISTERS ? TILE_VECTORS : FEW_VECTORS;
}

// LANES weights of type W from p, widened to float32
inline simd::Vec load_weights(const uint16_t* p) { return simd::load_halves(p); }
inline simd::Vec load_weights(const int8_t* p) { return simd::load_bytes(p); }

// ROWS rows of x times VECTORS * LANES columns of a tile (`tile` at the pass's first column, `scales` its columns'
// scales or null)
template <int64_t ROWS, int VECTORS, typename W>
void multiply_pass(const float* x, int64_t ldx, const W* tile, int64_t K, const float* scales, float* y, int64_t ldy) {
  constexpr int64_t prefetch_k = PREFETCH_BYTES / (TILE * sizeof(W));
  Vec acc[ROWS][VECTORS];
  for (int64_t r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = simd::zero();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(tile + (k + prefetch_k) * TILE), _MM_HINT_T0);
    Vec w[VECTORS];
    for (int v = 0; v < VECTORS; ++v) w[v] = load_weights(tile + k * TILE + v * LANES);
    for (int64_t r = 0; r < ROWS; ++r) {
      const Vec xk = simd::set1(x[r * ldx + k]);
      for (int v = 0; v < VECTORS; ++v) acc[r][v] = simd::fmadd(xk, w[v], acc[r][v]);
    }
  }
  for (int64_t r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) {
      const Vec out = scales ? simd::mul(acc[r][v], simd::load(scales + v * LANES)) : acc[r][v];
      simd::store(y + r * ldy + v * LANES, out);
    }
}

// ROWS rows of x times one packed tile: y[:ROWS, :TILE], in passes as wide as the registers allow
template <int64_t ROWS, typename W>
void multiply_tile(const float* x, const W* tile, int64_t K, const float* scales, float* y, int64_t N) {
  constexpr int VECTORS = pass_vectors<ROWS>();
  for (int64_t column = 0; column < TILE; column += VECTORS * LANES) {
    multiply_pass<ROWS, VECTORS>(x, K, tile + column, K, scales ? scales + column : nullptr, y + column, N);
  }
}

template <typename W, int64_t... Rows>
void multiply_rows(int64_t rows, const float* x, const W* tile, int64_t K, const float* scales, float* y, int64_t N,
                   std::integer_sequence<int64_t, Rows...>) {
  ((rows == Rows + 1 ? multiply_tile<Rows + 1>(x, tile, K, scales, y, N) : void()), ...);
}

// rows (at most ROW_BLOCK) of x times one packed tile: y[:rows, :TILE]
template <typename W>
void multiply_block(const float* x, int64_t rows, const W* tile, int64_t K, const float* scales, float* y, int64_t N) {
  multiply_rows(rows, x, tile, K, scales, y, N, std::make_integer_sequence<int64_t, ROW_BLOCK>());
}

// M rows of x [M, K] times every tile: y [M, N]. A tile of `tile_elements` W starts with `scale_rows` rows of
// float32 scales (none: float16), then its K rows of weights.
template <typename W>
void multiply(const float* xp, int64_t M, int64_t K, const W* wp, int64_t tiles, int64_t scale_rows, float* yp) {
  const int64_t N = tiles * TILE, tile_elements = (scale_rows + K) * TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {  // a tile is read from memory once, then from cache for each row block
      const W* tile = wp + t * tile_elements;
      const float* scales = scale_rows ? reinterpret_cast<const float*>(tile) : nullptr;
      for (int64_t m = 0; m < M; m += ROW_BLOCK) {
        multiply_block(xp + m * K, std::min(ROW_BLOCK, M - m), tile + scale_rows * TILE, K, scales,
                       yp + m * N + t * TILE, N);
      }
    }
  });
}

// x [..., K] float32, packed [N/32, K, 32] float16 or [N/32, 4 + K, 32] int8 -> [..., N] float32
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed) {
  const bool int8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(x.scalar_type() == at::kFloat && (int8 || packed.scalar_type() == at::kHalf),
              "packed_linear: float32 x, float16 or int8 packed");
  const int64_t scale_rows = int8 ? SCALE_ROWS : 0, K = x.size(-1);
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == TILE && packed.size(1) == scale_rows + K && packed.is_contiguous(),
              "packed_linear: shapes");
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0), tiles = packed.size(0);
  at::Tensor y = at::empty({M, tiles * TILE}, x.options());
  const float* xp = rows.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  if (int8) {
    multiply(xp, M, K, packed.const_data_ptr<int8_t>(), tiles, scale_rows, yp);
  } else {
    multiply(xp, M, K, reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::Half>()), tiles, scale_rows, yp);
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = tiles * TILE;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(specfleet, m) {
  m.def("packed_linear(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(specfleet, CPU, m) {
  m.impl("packed_linear", &packed_linear);
}
