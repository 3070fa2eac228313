// Dot products of bf16 vectors with the CPU's bf16 dot-product instructions (AVX512-BF16):
//   out[x, g, n] = round_bf16(q[x, g] . rows[x, n])   (fp32 sums of the exact bf16 products)
// for x < X (sequences x KV heads), g < G, n < N, D a multiple of 32. The query lists' search
// scores each KV head's G query heads against every build query this way (ann.qq): a product
// with 4 rows, where a general bf16 matrix product runs at a fraction of what these
// instructions do. The result is rounded to bf16 (nearest even), as a bf16 product returns it,
// so the ranking that follows is the same up to the order of the sums.
//
// Only where the CPU has the instructions (`has_bf16_dots`); elsewhere the caller keeps
// torch's product.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "hybridattn/vec_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if HA_HAS_VECTORS && defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 10))
#define HA_BF16_DOTS 1
#include <immintrin.h>
#else
#define HA_BF16_DOTS 0
#endif

namespace hybridattn {

struct QueryDotsArgs {
  const uint16_t* q = nullptr;     // [X, G, D] bf16, contiguous
  const uint16_t* rows = nullptr;  // [X, N, D] bf16, contiguous
  uint16_t* out = nullptr;         // [X, G, N] bf16
  int64_t n_items = 0;             // X
  int64_t group = 0;               // G
  int64_t n_rows = 0;              // N
  int64_t dim = 0;                 // D
  int n_threads = 0;               // 0: the OpenMP default
};

inline bool has_bf16_dots() {
#if HA_BF16_DOTS
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

inline void check_query_dots_args(const QueryDotsArgs& a) {
  if (a.n_items < 0 || a.group < 0 || a.n_rows < 0 || a.dim <= 0)
    throw std::invalid_argument("query_dots: negative sizes or an empty dimension");
  if (a.dim % 32 != 0)
    throw std::invalid_argument("query_dots: the dimension must be a multiple of 32, got " + std::to_string(a.dim));
  if (!has_bf16_dots()) throw std::invalid_argument("query_dots: this CPU has no AVX512-BF16 instructions");
}

#if HA_BF16_DOTS
constexpr int64_t kDotRows = 64;  // rows per unit of work: a thread's share of a KV head

// Rows [begin, end) of item x, every query head, 16 rows at a time: a query head's CH vectors held in
// registers against the tile's rows, the 16 sums reduced together (reduce16) and rounded to bf16 at once.
template <int CH>
__attribute__((target("avx512f,avx512bf16"))) inline void query_dots_tiles(const QueryDotsArgs& a, int64_t x,
                                                                             int64_t begin, int64_t end) {
  const int64_t G = a.group, N = a.n_rows, D = a.dim;
  const uint16_t* q = a.q + x * G * D;
  const uint16_t* rows = a.rows + x * N * D;
  uint16_t* out = a.out + x * G * N;
  for (int64_t n = begin; n < end; n += 16) {
    const int64_t m = end - n < 16 ? end - n : 16;
    for (int64_t g = 0; g < G; ++g) {
      __m512bh qv[CH];
      for (int c = 0; c < CH; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c);
      vf16 acc[16];
      if (m == 16) {  // a whole tile: no test per row, so the 16 rows' sums interleave
        for (int j = 0; j < 16; ++j) {
          const uint16_t* row = rows + (n + j) * D;
          __m512 s = _mm512_setzero_ps();
          for (int c = 0; c < CH; ++c) s = _mm512_dpbf16_ps(s, qv[c], (__m512bh)_mm512_loadu_si512(row + 32 * c));
          acc[bitrev4(j)] = (vf16)s;
        }
      } else {
        for (int j = 0; j < 16; ++j) {
          __m512 s = _mm512_setzero_ps();
          const uint16_t* row = rows + (n + (j < m ? j : 0)) * D;  // rows past the end: not read, 0
          if (j < m)
            for (int c = 0; c < CH; ++c) s = _mm512_dpbf16_ps(s, qv[c], (__m512bh)_mm512_loadu_si512(row + 32 * c));
          acc[bitrev4(j)] = (vf16)s;
        }
      }
      const __m256bh sums = _mm512_cvtneps_pbh((__m512)reduce16(acc));  // nearest even, NaN kept
      alignas(32) uint16_t tile[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tile), (__m256i)sums);
      __builtin_memcpy(out + g * N + n, tile, m * sizeof(uint16_t));
    }
  }
}

// Any D that is a multiple of 32: the sum over its 32-wide chunks in a loop.
__attribute__((target("avx512f,avx512bf16"))) inline void query_dots_any(const QueryDotsArgs& a, int64_t x,
                                                                           int64_t begin, int64_t end) {
  const int64_t G = a.group, N = a.n_rows, D = a.dim;
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t* row = a.rows + (x * N + n) * D;
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* qg = a.q + (x * G + g) * D;
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32)
        s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(qg + c), (__m512bh)_mm512_loadu_si512(row + c));
      const __m256bh one = _mm512_cvtneps_pbh(_mm512_set1_ps(_mm512_reduce_add_ps(s)));
      a.out[(x * G + g) * N + n] = static_cast<uint16_t>(_mm256_extract_epi16((__m256i)one, 0));
    }
  }
}

inline void query_dots_rows(const QueryDotsArgs& a, int64_t x, int64_t begin, int64_t end) {
  if (a.dim == 128) return query_dots_tiles<4>(a, x, begin, end);
  if (a.dim == 64) return query_dots_tiles<2>(a, x, begin, end);
  query_dots_any(a, x, begin, end);
}
#endif

inline void query_dots(const QueryDotsArgs& a) {
  check_query_dots_args(a);
#if HA_BF16_DOTS
  const int64_t per_item = (a.n_rows + kDotRows - 1) / kDotRows, units = a.n_items * per_item;
#ifdef _OPENMP
  const int threads = a.n_threads > 0 ? a.n_threads : omp_get_max_threads();
#else
  const int threads = 1;
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (units > 1 && threads > 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t x = u / per_item, begin = (u % per_item) * kDotRows;
    query_dots_rows(a, x, begin, begin + kDotRows < a.n_rows ? begin + kDotRows : a.n_rows);
  }
#endif
}

}  // namespace hybridattn
