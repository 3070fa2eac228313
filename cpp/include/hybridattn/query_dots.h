// Products of a few bf16 query vectors with many bf16 rows, two ways round:
//   query_dots:     out[x, g, m] = round_bf16(q[x, g] . row(x, m))            -> [X, G, M]
//   weighted_rows:  out[x, g, :] = round_bf16(sum_m w[x, g, m] * row(x, m))    -> [X, G, D]
// (fp32 sums of the exact bf16 products) for x < X (sequences x KV heads), g < G, m < M. The rows
// (`RowSet`) are item x's first M rows, or the rows ids[x, m] names, read where they lie, with no
// copy. The query lists' search scores each KV head's G query heads against every build query
// this way (ann.qq), the blocks' scores their landmarks, and the estimate sums the unread blocks'
// mean values by their weights (engine.decode.estimate): products with 4 rows, where a general
// bf16 matrix product runs at a fraction of what the cores can do. The results are rounded to bf16
// (nearest even), as a bf16 product returns them, so what follows is the same up to the order of
// the sums.
//
// Two paths: the CPU's bf16 dot-product instructions (AVX512-BF16, `has_bf16_dots`), and on any
// other CPU the values widened to fp32 (a bf16 is the top half of an fp32) and summed with fused
// multiply-adds (`query_dots_widened`). The products are exact either way, but for subnormal values
// (below 1.2e-38), which the bf16 instructions read and write as 0 and the widened path keeps: a
// query or key that small weighs nothing beside the others either way. weighted_rows always
// widens (its sums run along the rows, which the dot-product instructions do not serve).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "hybridattn/threads.h"
#include "hybridattn/vec_math.h"

#if HA_HAS_VECTORS && defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 10))
#define HA_BF16_DOTS 1
#include <immintrin.h>
#else
#define HA_BF16_DOTS 0
#endif

namespace hybridattn {

// The rows a product reads: item x's n_rows rows of dim bf16 values start `stride` rows after item
// x - 1's (stride >= n_rows: a buffer with spare rows is read in place). With ids [X, n_taken] the
// product's m-th row is ids[x, m] (-1 reads row 0, as padding), else row m (n_taken = n_rows).
struct RowSet {
  const uint16_t* base = nullptr;
  const int64_t* ids = nullptr;
  int64_t n_rows = 0;
  int64_t n_taken = 0;
  int64_t stride = 0;
  int64_t dim = 0;

  HA_INLINE const uint16_t* row(int64_t x, int64_t m) const {
    const int64_t r = ids == nullptr ? m : std::max<int64_t>(ids[x * n_taken + m], 0);
    return base + (x * stride + r) * dim;
  }
};

// What both products take besides their left operand: the rows, the output, the sizes and the threads.
struct RowProductArgs {
  RowSet rows;              // M rows per item
  uint16_t* out = nullptr;  // bf16: [X, G, M] (query_dots) or [X, G, D] (weighted_rows)
  int64_t n_items = 0;      // X
  int64_t group = 0;        // G
  int n_threads = 0;        // 0: the OpenMP default
};

struct QueryDotsArgs : RowProductArgs {
  const uint16_t* q = nullptr;  // [X, G, D] bf16, contiguous
  bool widened = false;         // the widened path even where the bf16 instructions serve (tests)
};

struct WeightedRowsArgs : RowProductArgs {
  const uint16_t* w = nullptr;  // [X, G, M] bf16, contiguous
};

inline bool has_bf16_dots() {
#if HA_BF16_DOTS
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Sizes, and every id within [-1, n_rows) (std::invalid_argument / std::out_of_range), before any work.
inline void check_row_set(const RowSet& r, int64_t n_items, const char* op) {
  const std::string name(op);
  if (n_items < 0 || r.n_rows < 0 || r.n_taken < 0 || r.dim <= 0)
    throw std::invalid_argument(name + ": negative sizes or an empty dimension");
  if (n_items > 1 && r.stride < r.n_rows)
    throw std::invalid_argument(name + ": items overlap (stride " + std::to_string(r.stride) + " < " +
                                std::to_string(r.n_rows) + " rows)");
  if (r.ids == nullptr) {
    if (r.n_taken != r.n_rows) throw std::invalid_argument(name + ": without ids every row is taken");
    return;
  }
  for (int64_t i = 0; i < n_items * r.n_taken; ++i) {
    const int64_t id = r.ids[i];
    if (id < -1 || id >= r.n_rows || (id == -1 && r.n_rows == 0))
      throw std::out_of_range(name + ": ids[" + std::to_string(i / r.n_taken) + ", " + std::to_string(i % r.n_taken) +
                              "] = " + std::to_string(id) + " is outside [-1, " + std::to_string(r.n_rows) + ")");
  }
}

// A product's sizes and ids, and a dimension that its vector loops take whole (a multiple of `lanes`).
inline void check_row_product(const RowProductArgs& a, const char* op, int64_t lanes) {
  const std::string name(op);
  if (a.group < 0) throw std::invalid_argument(name + ": negative sizes or an empty dimension");
  check_row_set(a.rows, a.n_items, op);
  if (a.rows.dim % lanes != 0)
    throw std::invalid_argument(name + ": the dimension must be a multiple of " + std::to_string(lanes) + ", got " +
                                std::to_string(a.rows.dim));
}

inline void check_query_dots_args(const QueryDotsArgs& a) { check_row_product(a, "query_dots", 32); }

inline void check_weighted_rows_args(const WeightedRowsArgs& a) { check_row_product(a, "weighted_rows", 8); }

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
  const int64_t G = a.group, N = a.rows.n_taken, D = a.rows.dim;
  float* q = buf;
  float* row = buf + G * D;
  load_row<StoreType::bf16>(a.q, x * G * D, G * D, q);
  uint16_t* out = a.out + x * G * N;
  for (int64_t n = begin; n < end; ++n) {
    load_row<StoreType::bf16>(a.rows.row(x, n), 0, D, row);
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
  const int64_t G = a.group, N = a.rows.n_taken, D = a.rows.dim;
  const uint16_t* q = a.q + x * G * D;
  uint16_t* out = a.out + x * G * N;
  for (int64_t n = begin; n < end; n += 16) {
    const int64_t m = end - n < 16 ? end - n : 16;
    for (int64_t g = 0; g < G; ++g) {
      __m512bh qv[CH];
      for (int c = 0; c < CH; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c);
      vf16 acc[16];
      if (m == 16) {  // a whole tile: no test per row, so the 16 rows' sums interleave
        for (int j = 0; j < 16; ++j) {
          const uint16_t* row = a.rows.row(x, n + j);
          __m512 s = _mm512_setzero_ps();
          for (int c = 0; c < CH; ++c) s = _mm512_dpbf16_ps(s, qv[c], (__m512bh)_mm512_loadu_si512(row + 32 * c));
          acc[bitrev4(j)] = (vf16)s;
        }
      } else {
        for (int j = 0; j < 16; ++j) {
          __m512 s = _mm512_setzero_ps();
          const uint16_t* row = a.rows.row(x, n + (j < m ? j : 0));  // rows past the end: not read, 0
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
  const int64_t G = a.group, N = a.rows.n_taken, D = a.rows.dim;
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t* row = a.rows.row(x, n);
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
  if (a.rows.dim == 128) return query_dots_tiles<4>(a, x, begin, end);
  if (a.rows.dim == 64) return query_dots_tiles<2>(a, x, begin, end);
  query_dots_any(a, x, begin, end);
}
#endif

inline void query_dots(const QueryDotsArgs& a) {
  check_query_dots_args(a);
  const bool bf16_dots = !a.widened && has_bf16_dots();
  const int64_t N = a.rows.n_taken, per_item = (N + kDotRows - 1) / kDotRows, units = a.n_items * per_item;
  const int threads = resolve_threads(a.n_threads);
#pragma omp parallel num_threads(threads) if (units > 1 && threads > 1)
  {
    std::vector<float> buf(bf16_dots ? 0 : size_t((a.group + 1) * a.rows.dim));  // the widened path's, per thread
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t x = u / per_item, begin = (u % per_item) * kDotRows;
      const int64_t end = begin + kDotRows < N ? begin + kDotRows : N;
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

// Item x of weighted_rows: each row widened once into `row`, added to the G sums (fp32, in `acc`) by its weights.
HA_MULTIVERSION inline void weighted_rows_item(const WeightedRowsArgs& a, int64_t x, float* acc, float* row) {
  const int64_t G = a.group, M = a.rows.n_taken, D = a.rows.dim;
  const uint16_t* w = a.w + x * G * M;
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    load_row<StoreType::bf16>(a.rows.row(x, m), 0, D, row);
    for (int64_t g = 0; g < G; ++g) {
      const float wg = bf16_to_float(w[g * M + m]);
      float* sum = acc + g * D;
#if HA_HAS_VECTORS
      for (int64_t d = 0; d < D; d += 8) store8(sum + d, load8(sum + d) + wg * load8(row + d));
#else
      for (int64_t d = 0; d < D; ++d) sum[d] += wg * row[d];
#endif
    }
  }
  uint16_t* out = a.out + x * G * D;
  for (int64_t i = 0; i < G * D; ++i) out[i] = float_to_bf16(acc[i]);
}

inline void weighted_rows(const WeightedRowsArgs& a) {
  check_weighted_rows_args(a);
  const int threads = resolve_threads(a.n_threads);
#pragma omp parallel num_threads(threads) if (a.n_items > 1 && threads > 1)
  {
    std::vector<float> buf(size_t((a.group + 1) * a.rows.dim));  // the sums and the widened row, per thread
#pragma omp for schedule(static)
    for (int64_t x = 0; x < a.n_items; ++x) weighted_rows_item(a, x, buf.data(), buf.data() + a.group * a.rows.dim);
  }
}

}  // namespace hybridattn
