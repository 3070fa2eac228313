// Exact scores of listed host rows: for every KV head h and listed id ids[h, j],
//   out[h * G + g, j] = q[h * G + g] . k[h, ids[h, j]]   (fp32; -inf where the id is -1)
// for the G = Hq / Hkv query heads of the group. An adaptive budget rates its
// candidates with these before it decides which to read: one pass over the
// listed K rows, sixteen at a time through a small fp32 tile, instead of a
// gathered fp32 copy and a batched product.
#pragma once

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "hybridattn/gather_attend.h"

namespace hybridattn {

struct GatherScoresArgs {
  const float* q = nullptr;  // [Hq, D], contiguous
  int64_t n_q_heads = 0;
  StoreView k;
  const int64_t* ids = nullptr;  // [Hkv, M], contiguous, -1 = padding
  int64_t n_ids = 0;             // M
  float* out = nullptr;          // [Hq, M]
  int n_threads = 0;             // 0: the OpenMP default
  bool scalar = false;           // the scalar reference even where the vector path applies
};

constexpr int64_t kScoreAhead = 8;  // rows prefetched ahead of the one being scored

template <StoreType T>
HA_INLINE float element(const void* base, int64_t i) {
  if constexpr (T == StoreType::f32) return static_cast<const float*>(base)[i];
  const uint16_t x = static_cast<const uint16_t*>(base)[i];
  return T == StoreType::bf16 ? bf16_to_float(x) : f16_to_float(x);
}

#if HA_HAS_VECTORS
// Ids [begin, end) of KV head h, kTile rows at a time: each tile's K rows converted once, then
// every query head's kTile dot products reduced together (tile_dots, as the gather-attend scores).
template <StoreType T, int kB>
HA_INLINE void score_tiles(const GatherScoresArgs& a, int64_t h, int64_t begin, int64_t end) {
  const int64_t D = a.k.dim, G = a.n_q_heads / a.k.n_heads, M = a.n_ids, row_bytes = D * elem_bytes(T);
  const char* base = static_cast<const char*>(a.k.data) + h * a.k.head_stride * elem_bytes(T);
  const int64_t* ids = a.ids + h * M;
  const float* q = a.q + h * G * D;
  float* out = a.out + h * G * M;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  alignas(64) float krows[kTile * kMaxVecDim];
  prefetch_rows(base, ids, begin, std::min(end, begin + kTile), row_bytes);
  for (int64_t j = begin; j < end; j += kTile) {
    const int64_t n = std::min(kTile, end - j);
    prefetch_rows(base, ids, j + kTile, std::min(end, j + 2 * kTile), row_bytes);
    load_tile<T, kB>(base, ids + j, n, krows, D);
    for (int64_t g = 0; g < G; ++g) {
      const vf16 s = tile_dots<kB>(q + g * D, krows, D);
      for (int64_t r = 0; r < n; ++r) out[g * M + j + r] = ids[j + r] < 0 ? neg_inf : s[r];
    }
  }
}
#endif

// Ids [begin, end) of KV head h.
template <StoreType T>
HA_INLINE void score_chunk(const GatherScoresArgs& a, int64_t h, int64_t begin, int64_t end) {
  const int64_t D = a.k.dim, G = a.n_q_heads / a.k.n_heads, M = a.n_ids;
#if HA_HAS_VECTORS
  if (!a.scalar && D % 16 == 0 && D <= kMaxVecDim && G <= kMaxGroup) {
    if (D == 128) return score_tiles<T, 8>(a, h, begin, end);
    if (D == 64) return score_tiles<T, 4>(a, h, begin, end);
    return score_tiles<T, 0>(a, h, begin, end);
  }
#endif
  const char* base = static_cast<const char*>(a.k.data) + h * a.k.head_stride * elem_bytes(T);
  const int64_t row_bytes = D * elem_bytes(T);
  const int64_t* ids = a.ids + h * M;
  const float* q = a.q + h * G * D;
  float* out = a.out + h * G * M;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = begin; j < end; ++j) {
    const int64_t ahead = j + kScoreAhead;
    if (ahead < end && ids[ahead] >= 0)
      for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(base + ids[ahead] * row_bytes + off, 0, 2);
    const int64_t id = ids[j];
    if (id < 0) {
      for (int64_t g = 0; g < G; ++g) out[g * M + j] = neg_inf;
      continue;
    }
    const char* row = base + id * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * element<T>(row, d);
      out[g * M + j] = s;
    }
  }
}

HA_MULTIVERSION inline void score_chunk_f32(const GatherScoresArgs& a, int64_t h, int64_t b, int64_t e) {
  score_chunk<StoreType::f32>(a, h, b, e);
}
HA_MULTIVERSION inline void score_chunk_f16(const GatherScoresArgs& a, int64_t h, int64_t b, int64_t e) {
  score_chunk<StoreType::f16>(a, h, b, e);
}
HA_MULTIVERSION inline void score_chunk_bf16(const GatherScoresArgs& a, int64_t h, int64_t b, int64_t e) {
  score_chunk<StoreType::bf16>(a, h, b, e);
}

// Shapes (std::invalid_argument); the ids are checked against the store before any work.
inline void check_scores_args(const GatherScoresArgs& a) {
  check_queries_and_store(a.k, a.n_q_heads, a.n_ids, "gather_scores");
}

inline void gather_scores(const GatherScoresArgs& a) {
  check_scores_args(a);
  check_id_rows(a.ids, a.k.n_heads, a.n_ids, a.k.n_tokens, "gather_scores");
  const int64_t Hkv = a.k.n_heads, M = a.n_ids;
  const int threads = resolve_threads(a.n_threads);
  const int64_t chunks = chunks_per_head(threads, Hkv, M);
  const int64_t chunk_len = (M + chunks - 1) / chunks;
  const int64_t items = Hkv * chunks;
#pragma omp parallel for num_threads(threads) schedule(static) if (items > 1 && threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t h = item / chunks, begin = std::min(M, (item % chunks) * chunk_len);
    const int64_t end = std::min(M, begin + chunk_len);
    switch (a.k.type) {
      case StoreType::f32: score_chunk_f32(a, h, begin, end); break;
      case StoreType::f16: score_chunk_f16(a, h, begin, end); break;
      case StoreType::bf16: score_chunk_bf16(a, h, begin, end); break;
    }
  }
}

}  // namespace hybridattn
