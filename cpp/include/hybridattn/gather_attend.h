// Fused gather-attend over a host KV store. Framework-free: raw pointers, sizes and strides.
//
// For every KV head h, the kernel gathers the K/V rows named by ids[h, :]
// once, scores them against the G = Hq / Hkv query heads of that group, and
// keeps an online softmax in fp32, so the result is
//   out[g] = sum_i softmax(scale * q[g] . k[i]) v[i],   lse[g] = log sum_i exp(scale * q[g] . k[i])
// over the listed ids (-1 entries are padding and skipped; a repeated id is
// attended as often as it is listed). An id list with no valid entry gives
// out = 0 and lse = -inf, which merges exactly as "nothing to add".
//
// `gather_attend_batch` does the same for B sequences of one layer in one call,
// each with its own stores and ids: the parallel work items are (sequence, KV
// head, chunk of ids) across the whole batch, and a single-sequence call runs
// the same code with B = 1.
//
// Two implementations of one chunk of ids: a plain scalar reference, and a
// vector version (head dims that are multiples of 16) that scores 16 gathered
// rows at a time, in 8-lane vectors where a loop holds many accumulators. On
// x86-64 with GCC/clang both are compiled for x86-64, AVX2 and AVX-512 and the
// best version is picked at load time, so the default build runs on any x86-64 CPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "hybridattn/convert.h"
#include "hybridattn/merge.h"
#include "hybridattn/threads.h"
#include "hybridattn/vec_math.h"

namespace hybridattn {

// A [n_heads, n_tokens, dim] store whose rows are contiguous; heads may be
// spaced further apart than n_tokens * dim (a store with spare capacity).
struct StoreView {
  const void* data = nullptr;
  StoreType type = StoreType::f32;
  int64_t n_heads = 0, n_tokens = 0, dim = 0;
  int64_t head_stride = 0;  // in elements
};

struct GatherAttendArgs {
  const float* q = nullptr;  // [Hq, D], contiguous
  int64_t n_q_heads = 0;
  StoreView k, v;
  const int64_t* ids = nullptr;  // [Hkv, M], contiguous, -1 = padding
  int64_t n_ids = 0;             // M
  float scale = 1.0f;
  float* out = nullptr;  // [Hq, D]
  float* lse = nullptr;  // [Hq]
  int n_threads = 0;     // 0: the OpenMP default
  bool scalar = false;   // run the scalar reference even where the vector path applies
};

// Partial softmax state of the G query heads of one chunk: running max m [G],
// sum l [G], unnormalised output acc [G, D].
struct PartialState {
  float* m;
  float* l;
  float* acc;
};

constexpr int64_t kTile = 16;  // ids scored together before their V rows are read

// Prefetches the rows ids[from..to) of a store's head at `base` (-1 ids skipped).
HA_INLINE void prefetch_rows(const char* base, const int64_t* ids, int64_t from, int64_t to, int64_t row_bytes) {
  for (int64_t i = from; i < to; ++i) {
    if (ids[i] < 0) continue;
    const char* row = base + ids[i] * row_bytes;
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 2);  // into L2: measured 2x faster than L1
  }
}

// The ids of one chunk, `kTile` valid ones at a time, with their rows
// prefetched ahead: gathered rows are scattered, so their misses must overlap.
class TileWalker {
 public:
  TileWalker(const GatherAttendArgs& a, int64_t head, int64_t begin, int64_t end, int64_t elem_bytes)
      : ids_(a.ids + head * a.n_ids), i_(begin), end_(end), row_bytes_(a.k.dim * elem_bytes),
        k_(static_cast<const char*>(a.k.data) + head * a.k.head_stride * elem_bytes),
        v_(static_cast<const char*>(a.v.data) + head * a.v.head_stride * elem_bytes) {
    prefetch_rows(k_, ids_, begin, std::min(end, begin + kTile), row_bytes_);
  }

  // Fills ids[0..n) with the next valid ids; returns n (0 at the end).
  int64_t next(int64_t* ids) {
    int64_t n = 0;
    const int64_t from = i_;
    for (; n == 0 && i_ < end_;)
      for (; i_ < end_ && n < kTile; ++i_)
        if (ids_[i_] >= 0) ids[n++] = ids_[i_];
    prefetch_rows(v_, ids_, from, i_, row_bytes_);                          // this tile's V rows
    prefetch_rows(k_, ids_, i_, std::min(end_, i_ + kTile), row_bytes_);    // the next tile's K rows
    return n;
  }

 private:
  const int64_t* ids_;
  int64_t i_, end_, row_bytes_;
  const char *k_, *v_;
};

HA_INLINE void reset(PartialState st, int64_t G, int64_t D) {
  std::fill(st.m, st.m + G, -std::numeric_limits<float>::infinity());
  std::fill(st.l, st.l + G, 0.0f);
  std::fill(st.acc, st.acc + G * D, 0.0f);
}

// Raises head g's running max to m_new, rescaling what was accumulated under the old one.
HA_INLINE void raise_max(PartialState st, int64_t g, int64_t D, float m_new) {
  if (!(m_new > st.m[g])) return;
  const float alpha = std::exp(st.m[g] - m_new);
  st.l[g] *= alpha;
  for (int64_t d = 0; d < D; ++d) st.acc[g * D + d] *= alpha;
  st.m[g] = m_new;
}

// A running max to subtract from the scores: while every row so far is at -inf, 0 (their weights are then
// exp(-inf) = 0, where exp(-inf - -inf) would be NaN). A select, not a branch: it runs per tile and head.
HA_INLINE float finite_max(float m) { return m == -std::numeric_limits<float>::infinity() ? 0.0f : m; }

constexpr int64_t elem_bytes(StoreType T) { return T == StoreType::f32 ? 4 : 2; }

// ------------------------------------------------------- scalar reference

// Query head g's online softmax takes one tile's n scaled scores p[0..n), which become their weights.
HA_INLINE void take_scores_scalar(PartialState st, int64_t g, int64_t D, float* p, int64_t n) {
  float tile_max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) tile_max = std::max(tile_max, p[j]);
  raise_max(st, g, D, tile_max);
  const float m = finite_max(st.m[g]);
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    st.l[g] += p[j];
  }
}

// The V rows of one tile's n ids, weighted by p [G, kTile], added to every query head's output.
template <StoreType T>
HA_INLINE void add_values_scalar(const StoreView& v, int64_t v_base, const int64_t* ids, int64_t n, const float* p,
                                 PartialState st, int64_t G, float* rows /*[kTile, D]*/) {
  const int64_t D = v.dim;
  for (int64_t j = 0; j < n; ++j) load_row<T>(v.data, v_base + ids[j] * D, D, rows + j * D);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) st.acc[g * D + d] += p[g * kTile + j] * rows[j * D + d];
}

template <StoreType T>
HA_INLINE void attend_chunk_scalar(const GatherAttendArgs& a, int64_t head, int64_t begin, int64_t end,
                                   PartialState st, float* buf /*[kTile * D + G * kTile]*/) {
  const int64_t D = a.k.dim, G = a.n_q_heads / a.k.n_heads;
  const float* q = a.q + head * G * D;
  const int64_t k_base = head * a.k.head_stride, v_base = head * a.v.head_stride;
  float* rows = buf;             // [kTile, D]
  float* p = buf + kTile * D;    // [G, kTile]
  reset(st, G, D);
  TileWalker walk(a, head, begin, end, elem_bytes(T));
  int64_t ids[kTile];
  for (int64_t n; (n = walk.next(ids)) > 0;) {
    for (int64_t j = 0; j < n; ++j) load_row<T>(a.k.data, k_base + ids[j] * D, D, rows + j * D);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t j = 0; j < n; ++j) {
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * rows[j * D + d];
        p[g * kTile + j] = s * a.scale;
      }
      take_scores_scalar(st, g, D, p + g * kTile, n);
    }
    add_values_scalar<T>(a.v, v_base, ids, n, p, st, G, rows);
  }
}

// ------------------------------------------------------------ vector path

#if HA_HAS_VECTORS
constexpr int64_t kMaxVecDim = 512;
constexpr int64_t kMaxGroup = 16;  // query heads per KV head on the vector path

// The K rows of a tile's n ids (-1: a row of zeros), converted to fp32 into krows [kTile, D];
// the rows from n on are zeroed, so every lane of a tile's dot products is defined.
// 8 lanes at a time: 16-lane conversions went through the stack on AVX2.
template <StoreType T, int kB>
HA_INLINE void load_tile(const char* kbase, const int64_t* ids, int64_t n, float* krows, int64_t D) {
  const int64_t B = 2 * (kB > 0 ? kB : D / 16), row_bytes = D * elem_bytes(T);
  for (int64_t j = 0; j < kTile; ++j)
    for (int64_t b = 0; b < B; ++b)
      store8(krows + j * D + 8 * b, j < n && ids[j] >= 0
                                        ? load8_as_float<T>(kbase + ids[j] * row_bytes + 8 * b * elem_bytes(T))
                                        : vf8{});
}

// The dot products of the query row qg [D] with a tile's rows krows [kTile, D]: lane j = qg . krows[j].
// Eight rows side by side, their 8-lane partial sums reduced together (reduce8): eight accumulators
// and the query's block fit AVX2's sixteen registers (16-lane ones spilled there).
template <int kB>
HA_INLINE vf16 tile_dots(const float* qg, const float* krows, int64_t D) {
  const int64_t dim = kB > 0 ? 16 * kB : D;
  alignas(64) float dots[kTile];
  for (int j = 0; j < kTile; j += 8) {
    vf8 s[8] = {};
    for (int64_t d = 0; d < dim; d += 8) {
      const vf8 qd = load8(qg + d);
      for (int r = 0; r < 8; ++r) s[r] += qd * load8(krows + (j + r) * D + d);
    }
    vf8 part[8];
    for (int r = 0; r < 8; ++r) part[bitrev3(r)] = s[r];
    store8(dots + j, reduce8(part));
  }
  return load16(dots);
}

// Query head g's online softmax takes one tile's scaled scores (lanes n.. are ignored);
// p[0..16) gets their weights (0 in the unused lanes).
HA_INLINE void take_scores(PartialState st, int64_t g, int64_t D, vf16 scores, int64_t n, float* p) {
  vf16 lane = {};
  for (int i = 0; i < 16; ++i) lane[i] = float(i);
  scores = lane < float(n) ? scores : vf16{} - std::numeric_limits<float>::infinity();
  raise_max(st, g, D, hmax(scores));
  const vf16 pv = exp16(scores - finite_max(st.m[g]));
  st.l[g] += hsum(pv);
  store16(p, pv);
}

// The V rows of one tile's n ids, weighted by p [kG, kTile], added to kG query heads' outputs acc [kG, D]:
// 16 dims at a time, their 2 * kG accumulators held in registers while the rows stream past, each
// row's block converted once for every head. 8-lane vectors: with 16-lane ones GCC spills the
// accumulators on AVX2, which made this loop five times slower there.
template <StoreType T, int kG>
HA_INLINE void add_values_heads(const char* vbase, const int64_t* ids, int64_t n, const float* p, float* acc,
                                int64_t D) {
  const int64_t row_bytes = D * elem_bytes(T);
  for (int64_t b = 0; b < D; b += 16) {
    vf8 lo[kG], hi[kG];
    for (int g = 0; g < kG; ++g) {
      lo[g] = load8(acc + g * D + b);
      hi[g] = load8(acc + g * D + b + 8);
    }
    for (int64_t j = 0; j < n; ++j) {
      const char* row = vbase + ids[j] * row_bytes + b * elem_bytes(T);
      const vf8 v_lo = load8_as_float<T>(row), v_hi = load8_as_float<T>(row + 8 * elem_bytes(T));
      for (int g = 0; g < kG; ++g) {
        lo[g] += p[g * kTile + j] * v_lo;
        hi[g] += p[g * kTile + j] * v_hi;
      }
    }
    for (int g = 0; g < kG; ++g) {
      store8(acc + g * D + b, lo[g]);
      store8(acc + g * D + b + 8, hi[g]);
    }
  }
}

// The V rows of one tile's n ids, weighted by p [G, kTile], added to every query head's output,
// four query heads at a time.
template <StoreType T>
HA_INLINE void add_values(const char* vbase, const int64_t* ids, int64_t n, const float* p, PartialState st,
                          int64_t G, int64_t D) {
  for (int64_t g = 0; g < G; g += 4) {
    const float* pg = p + g * kTile;
    float* acc = st.acc + g * D;
    switch (std::min<int64_t>(4, G - g)) {
      case 4: add_values_heads<T, 4>(vbase, ids, n, pg, acc, D); break;
      case 3: add_values_heads<T, 3>(vbase, ids, n, pg, acc, D); break;
      case 2: add_values_heads<T, 2>(vbase, ids, n, pg, acc, D); break;
      default: add_values_heads<T, 1>(vbase, ids, n, pg, acc, D); break;
    }
  }
}

// 16 rows at a time: their K rows are scored against each query head with
// 8-lane FMAs, eight dot products reduced together (reduce8), the softmax
// update done on 16 lanes, and the V rows accumulated four query heads at a
// time. Every inner loop keeps several independent accumulators so FMA latency
// overlaps.
template <StoreType T, int kB>
HA_INLINE void attend_chunk_vec(const GatherAttendArgs& a, int64_t head, int64_t begin, int64_t end,
                                PartialState st, float* buf /*[2 * kTile * D + G * kTile]*/) {
  const int64_t D = a.k.dim, G = a.n_q_heads / a.k.n_heads;
  const float* q = a.q + head * G * D;
  const char* kbase = static_cast<const char*>(a.k.data) + head * a.k.head_stride * elem_bytes(T);
  const char* vbase = static_cast<const char*>(a.v.data) + head * a.v.head_stride * elem_bytes(T);
  float* krows = buf;              // [kTile, D]
  float* p = buf + 2 * kTile * D;  // [G, kTile]
  reset(st, G, D);
  TileWalker walk(a, head, begin, end, elem_bytes(T));
  int64_t ids[kTile];
  for (int64_t n; (n = walk.next(ids)) > 0;) {
    load_tile<T, kB>(kbase, ids, n, krows, D);
    for (int64_t g = 0; g < G; ++g)
      take_scores(st, g, D, tile_dots<kB>(q + g * D, krows, D) * a.scale, n, p + g * kTile);
    add_values<T>(vbase, ids, n, p, st, G, D);
  }
}
#endif

template <StoreType T>
HA_INLINE void attend_chunk(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e, PartialState st,
                            float* buf) {
#if HA_HAS_VECTORS
  if (!a.scalar && a.k.dim % 16 == 0 && a.k.dim <= kMaxVecDim && a.n_q_heads / a.k.n_heads <= kMaxGroup) {
    if (a.k.dim == 64) return attend_chunk_vec<T, 4>(a, h, b, e, st, buf);
    if (a.k.dim == 128) return attend_chunk_vec<T, 8>(a, h, b, e, st, buf);
    return attend_chunk_vec<T, 0>(a, h, b, e, st, buf);
  }
#endif
  attend_chunk_scalar<T>(a, h, b, e, st, buf);
}

HA_MULTIVERSION inline void attend_chunk_f32(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e,
                                             PartialState st, float* buf) {
  attend_chunk<StoreType::f32>(a, h, b, e, st, buf);
}
HA_MULTIVERSION inline void attend_chunk_f16(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e,
                                             PartialState st, float* buf) {
  attend_chunk<StoreType::f16>(a, h, b, e, st, buf);
}
HA_MULTIVERSION inline void attend_chunk_bf16(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e,
                                              PartialState st, float* buf) {
  attend_chunk<StoreType::bf16>(a, h, b, e, st, buf);
}

HA_INLINE void attend_chunk_any(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e, PartialState st,
                                float* buf) {
  switch (a.k.type) {
    case StoreType::f32: return attend_chunk_f32(a, h, b, e, st, buf);
    case StoreType::f16: return attend_chunk_f16(a, h, b, e, st, buf);
    case StoreType::bf16: return attend_chunk_bf16(a, h, b, e, st, buf);
  }
}

// ---------------------------------------------------------- given scores

// Attention of KV head h over its n_ids ids (all valid) whose scaled scores are known already,
// scores[g * stride + i] for query head g of the group and id i: only their V rows are read.
// The host step attends so to the candidates its rating has scored.
template <StoreType T>
HA_INLINE void attend_scored(const GatherAttendArgs& a, int64_t head, const float* scores, int64_t stride,
                             PartialState st, float* buf /*[kTile * D + G * kTile]*/) {
  const int64_t D = a.k.dim, G = a.n_q_heads / a.k.n_heads, M = a.n_ids, row_bytes = D * elem_bytes(T);
  const int64_t* ids = a.ids + head * M;
  const char* vbase = static_cast<const char*>(a.v.data) + head * a.v.head_stride * elem_bytes(T);
  float* p = buf + kTile * D;  // [G, kTile]
  reset(st, G, D);
#if HA_HAS_VECTORS
  const bool vec = !a.scalar && D % 16 == 0 && D <= kMaxVecDim && G <= kMaxGroup;
#else
  [[maybe_unused]] const bool vec = false;
#endif
  prefetch_rows(vbase, ids, 0, std::min(M, kTile), row_bytes);
  for (int64_t i = 0; i < M; i += kTile) {
    const int64_t n = std::min(kTile, M - i);
    prefetch_rows(vbase, ids, i + kTile, std::min(M, i + 2 * kTile), row_bytes);
    for (int64_t g = 0; g < G; ++g) {
      float* pg = p + g * kTile;
      std::copy(scores + g * stride + i, scores + g * stride + i + n, pg);
#if HA_HAS_VECTORS
      if (vec) {
        take_scores(st, g, D, load16(pg), n, pg);  // lanes n.. hold stale values, masked there
        continue;
      }
#endif
      take_scores_scalar(st, g, D, pg, n);
    }
#if HA_HAS_VECTORS
    if (vec) {
      add_values<T>(vbase, ids + i, n, p, st, G, D);
      continue;
    }
#endif
    add_values_scalar<T>(a.v, head * a.v.head_stride, ids + i, n, p, st, G, buf);
  }
}

HA_MULTIVERSION inline void attend_scored_any(const GatherAttendArgs& a, int64_t head, const float* scores,
                                              int64_t stride, PartialState st, float* buf) {
  switch (a.k.type) {
    case StoreType::f32: return attend_scored<StoreType::f32>(a, head, scores, stride, st, buf);
    case StoreType::f16: return attend_scored<StoreType::f16>(a, head, scores, stride, st, buf);
    case StoreType::bf16: return attend_scored<StoreType::bf16>(a, head, scores, stride, st, buf);
  }
}

// ---------------------------------------------------------------- batched calls

// B sequences of one layer in one call. Each sequence has its own K/V stores
// (N may differ between sequences; the dtype, Hkv and D are shared) and its
// own ids, which index that sequence's stores.
struct GatherAttendBatchArgs {
  const float* q = nullptr;  // [B, Hq, D], contiguous
  int64_t n_seqs = 0;        // B
  int64_t n_q_heads = 0;     // Hq
  const StoreView* k = nullptr;  // [B]
  const StoreView* v = nullptr;  // [B]
  const int64_t* ids = nullptr;  // [B, Hkv, M], contiguous, -1 = padding
  int64_t n_ids = 0;             // M
  float scale = 1.0f;
  float* out = nullptr;  // [B, Hq, D]
  float* lse = nullptr;  // [B, Hq]
  int n_threads = 0;
  bool scalar = false;
};

// Sequence b of a batched call, as a single-sequence call.
inline GatherAttendArgs sequence_args(const GatherAttendBatchArgs& a, int64_t b) {
  GatherAttendArgs s;
  s.k = a.k[b];
  s.v = a.v[b];
  const int64_t Hq = a.n_q_heads, D = s.k.dim;
  s.q = a.q + b * Hq * D;
  s.n_q_heads = Hq;
  s.ids = a.ids + b * s.k.n_heads * a.n_ids;
  s.n_ids = a.n_ids;
  s.scale = a.scale;
  s.out = a.out + b * Hq * D;
  s.lse = a.lse + b * Hq;
  s.n_threads = a.n_threads;
  s.scalar = a.scalar;
  return s;
}

// ---------------------------------------------------------------- validation

// Index of the first id outside [-1, n_tokens), or -1 when all are valid.
inline int64_t first_bad_id(const int64_t* ids, int64_t count, int64_t n_tokens) {
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] < -1 || ids[i] >= n_tokens) return i;
  return -1;
}

// The K store against the query heads and the id count, for any kernel reading it.
inline void check_queries_and_store(const StoreView& k, int64_t n_q_heads, int64_t n_ids,
                                    const std::string& where) {
  auto fail = [&](const std::string& msg) { throw std::invalid_argument(where + ": " + msg); };
  if (k.n_heads <= 0 || k.dim <= 0) fail("empty K store");
  if (n_q_heads % k.n_heads != 0)
    fail("Hq = " + std::to_string(n_q_heads) + " is not a multiple of Hkv = " + std::to_string(k.n_heads));
  if (n_ids < 0) fail("negative id count");
}

// Shapes of one sequence's call; `where` starts the messages.
inline void check_args(const GatherAttendArgs& a, const std::string& where = "gather_attend") {
  check_queries_and_store(a.k, a.n_q_heads, a.n_ids, where);
  auto fail = [&](const std::string& msg) { throw std::invalid_argument(where + ": " + msg); };
  if (a.k.n_heads != a.v.n_heads || a.k.n_tokens != a.v.n_tokens || a.k.dim != a.v.dim)
    fail("K and V stores differ in shape");
  if (a.k.type != a.v.type) fail("K and V stores differ in dtype");
  if (!std::isfinite(a.scale)) fail("scale must be finite");
}

// Throws std::out_of_range naming the first of ids [rows, M] outside [-1, n_tokens);
// `lead` prefixes its index (the sequence in a batched call).
inline void check_id_rows(const int64_t* ids, int64_t rows, int64_t M, int64_t n_tokens, const std::string& where,
                          const std::string& lead = "") {
  const int64_t bad = first_bad_id(ids, rows * M, n_tokens);
  if (bad >= 0)
    throw std::out_of_range(where + ": ids[" + lead + std::to_string(bad / M) + ", " + std::to_string(bad % M) +
                            "] = " + std::to_string(ids[bad]) + " is outside [-1, " + std::to_string(n_tokens) + ")");
}

inline void check_ids(const GatherAttendArgs& a, const std::string& where, const std::string& lead = "") {
  check_id_rows(a.ids, a.k.n_heads, a.n_ids, a.k.n_tokens, where, lead);
}

inline std::string batch_where(int64_t b) { return "gather_attend_batch: sequence " + std::to_string(b); }

// Shapes of a batched call: every sequence's, and one dtype, Hkv and D for all.
inline void check_batch_args(const GatherAttendBatchArgs& a) {
  if (a.n_seqs < 0) throw std::invalid_argument("gather_attend_batch: negative sequence count");
  for (int64_t b = 0; b < a.n_seqs; ++b) {
    const StoreView &k = a.k[b], &k0 = a.k[0];
    if (k.type != k0.type || k.n_heads != k0.n_heads || k.dim != k0.dim)
      throw std::invalid_argument(batch_where(b) + ": its stores differ from sequence 0's in dtype, Hkv or D");
    check_args(sequence_args(a, b), batch_where(b));
  }
}

// --------------------------------------------------------------- the kernel

// Chunks per (sequence, KV head) id list, so that all threads have work even
// when Hkv is small. It depends on the threads, Hkv and M only, not on the
// batch: a sequence's result has the same bits alone or in any batch.
inline int64_t chunks_per_head(int threads, int64_t Hkv, int64_t M) {
  constexpr int64_t kMinChunk = 128;
  const int64_t max_chunks = std::max<int64_t>(1, (M + kMinChunk - 1) / kMinChunk);
  return std::min(max_chunks, std::max<int64_t>(1, (2 * threads + Hkv - 1) / Hkv));
}

// The partial states of all work items, G * (D + 2) floats each.
class ChunkStates {
 public:
  ChunkStates(int64_t items, int64_t G, int64_t D) : G_(G), size_(G * (D + 2)), data_(size_t(items * size_)) {}

  PartialState operator[](int64_t item) {
    float* base = data_.data() + item * size_;
    return PartialState{base, base + G_, base + 2 * G_};
  }

 private:
  int64_t G_, size_;
  std::vector<float> data_;
};

// Combines the chunks first .. first + chunks - 1 of KV head h of one sequence
// into its G query heads' normalised out and lse.
inline void combine_chunks(const GatherAttendArgs& a, int64_t h, ChunkStates& states, int64_t first,
                           int64_t chunks) {
  const int64_t D = a.k.dim, G = a.n_q_heads / a.k.n_heads;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    float m = neg_inf;
    for (int64_t c = 0; c < chunks; ++c) m = std::max(m, states[first + c].m[g]);
    float* o = a.out + (h * G + g) * D;
    std::fill(o, o + D, 0.0f);
    a.lse[h * G + g] = m;
    if (m == neg_inf) {
      // rows scored NaN leave the max at -inf and their weights NaN: the head is NaN, not empty
      bool nan = false;
      for (int64_t c = 0; c < chunks; ++c) nan |= std::isnan(states[first + c].l[g]);
      if (nan) {
        const float not_a_number = std::numeric_limits<float>::quiet_NaN();
        std::fill(o, o + D, not_a_number);
        a.lse[h * G + g] = not_a_number;
      }
      continue;
    }
    float l = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      const PartialState st = states[first + c];
      if (st.l[g] == 0.0f) continue;
      const float w = std::exp(st.m[g] - m);
      l += w * st.l[g];
      for (int64_t d = 0; d < D; ++d) o[d] += w * st.acc[g * D + d];
    }
    for (int64_t d = 0; d < D; ++d) o[d] /= l;
    a.lse[h * G + g] = m + std::log(l);
  }
}

// Runs validated sequences that share the store type, Hkv, G, D, M and settings.
// The parallel work items are (sequence, KV head, chunk of ids) over all of them;
// each chunk keeps its own softmax state, merged per head afterwards.
inline void run_sequences(const GatherAttendArgs* seqs, int64_t n_seqs) {
  if (n_seqs == 0) return;
  const GatherAttendArgs& a = seqs[0];
  const int64_t Hkv = a.k.n_heads, D = a.k.dim, G = a.n_q_heads / Hkv, M = a.n_ids;
  const int threads = resolve_threads(a.n_threads);
  const int64_t chunks = chunks_per_head(threads, Hkv, M);
  const int64_t chunk_len = (M + chunks - 1) / chunks;
  const int64_t units = n_seqs * Hkv, items = units * chunks;
  ChunkStates states(items, G, D);
  // Scratch rows of every thread, allocated here: a throw inside the parallel region would terminate.
  const int64_t buf_size = 2 * kTile * D + G * kTile;
  std::vector<float> bufs(size_t(threads * buf_size));

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (items > 1 && threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t unit = item / chunks, c = item % chunks;
    const int64_t begin = std::min(M, c * chunk_len), end = std::min(M, begin + chunk_len);
    attend_chunk_any(seqs[unit / Hkv], unit % Hkv, begin, end, states[item], bufs.data() + thread_index() * buf_size);
  }
  for (int64_t unit = 0; unit < units; ++unit)
    combine_chunks(seqs[unit / Hkv], unit % Hkv, states, unit * chunks, chunks);
}

inline void gather_attend(const GatherAttendArgs& a) {
  check_args(a);
  check_ids(a, "gather_attend");
  run_sequences(&a, 1);
}

// All sequences of a batched call are validated (shapes, then every id against
// its own sequence's store) before any work starts.
inline void gather_attend_batch(const GatherAttendBatchArgs& a) {
  check_batch_args(a);
  std::vector<GatherAttendArgs> seqs;
  for (int64_t b = 0; b < a.n_seqs; ++b) {
    seqs.push_back(sequence_args(a, b));
    check_ids(seqs.back(), batch_where(b), std::to_string(b) + ", ");
  }
  run_sequences(seqs.data(), a.n_seqs);
}

}  // namespace hybridattn
