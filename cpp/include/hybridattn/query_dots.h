// Dot products of bf16 vectors:
//   out[x, g, n] = round_bf16(q[x, g] . rows[x, n])   (fp32 sums of the exact bf16 products)
// for x < X (sequences x KV heads), g < G, n < N, D a multiple of 32. The query lists' search
// scores each KV head's G query heads against every build query this way (ann.qq): a product
// with 4 rows, where a general bf16 matrix product runs at a fraction of what the cores can do.
// The result is rounded to bf16 (nearest even), as a bf16 product returns it, so the ranking that
// follows is the same up to the order of the sums.
//
// Two paths: the CPU's bf16 dot-product instructions (AVX512-BF16, `has_bf16_dots`), and on any
// other CPU the values widened to fp32 (a bf16 is the top half of an fp32) and summed with fused
// multiply-adds (`query_dots_widened`). The products are exact either way.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

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
  bool widened = false;            // the widened path even where the bf16 instructions serve (tests)
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
}

constexpr int64_t kDotRows = 64;  // rows per unit of work: a thread's share of a KV head

#if HA_HAS_VECTORS
// 8 lanes (vf8), one AVX register: 16-lane accumulators would spill on AVX2.
HA_INLINE float hsum8(vf8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
#endif

// K query heads (q, D apart) against one row, 8 lanes a step, each sum rounded into out (N apart).
template <int K>
HA_INLINE void widened_dots(const float* q, const float* row, int64_t D, uint16_t* out, int64_t N) {
#if HA_HAS_VECTORS
  vf8 s[K] = {};
  for (int64_t c = 0; c < D; c += 8) {
    const vf8 r = load8(row + c);
    for (int k = 0; k < K; ++k) s[k] += load8(q + k * D + c) * r;
  }
  for (int k = 0; k < K; ++k) out[k * N] = float_to_bf16(hsum8(s[k]));
#else
  for (int k = 0; k < K; ++k) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[k * D + d] * row[d];
    out[k * N] = float_to_bf16(s);
  }
#endif
}

// Rows [begin, end) of item x, every query head, widened: the query heads once and each row to fp32 in
// `buf` ((G + 1) * D floats), then four query heads at a time against the row (a load of the row serves
// four fused multiply-adds).
HA_MULTIVERSION inline void query_dots_widened(const QueryDotsArgs& a, int64_t x, int64_t begin, int64_t end,
                                               float* buf) {
  const int64_t G = a.group, N = a.n_rows, D = a.dim;
  float* q = buf;
  float* row = buf + G * D;
  load_row<StoreType::bf16>(a.q, x * G * D, G * D, q);
  uint16_t* out = a.out + x * G * N;
  for (int64_t n = begin; n < end; ++n) {
    load_row<StoreType::bf16>(a.rows, (x * N + n) * D, D, row);
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) widened_dots<4>(q + g * D, row, D, out + g * N + n, N);
    for (; g < G; ++g) widened_dots<1>(q + g * D, row, D, out + g * N + n, N);
  }
}

#if HA_BF16_DOTS
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
  const bool bf16_dots = !a.widened && has_bf16_dots();
  const int64_t per_item = (a.n_rows + kDotRows - 1) / kDotRows, units = a.n_items * per_item;
#ifdef _OPENMP
  const int threads = a.n_threads > 0 ? a.n_threads : omp_get_max_threads();
#endif
#pragma omp parallel num_threads(threads) if (units > 1 && threads > 1)
  {
    std::vector<float> buf(bf16_dots ? 0 : size_t((a.group + 1) * a.dim));  // the widened path's, per thread
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t x = u / per_item, begin = (u % per_item) * kDotRows;
      const int64_t end = begin + kDotRows < a.n_rows ? begin + kDotRows : a.n_rows;
#if HA_BF16_DOTS
      if (bf16_dots) {
        query_dots_rows(a, x, begin, end);
        continue;
      }
#endif
      query_dots_widened(a, x, begin, end, buf.data());
    }
  }
}

}  // namespace hybridattn
