// Fused gather-attend over a host KV store, and the log-sum-exp merge of
// partial attention states. Framework-free: raw pointers, sizes and strides.
//
// For every KV head h, the kernel gathers the K/V rows named by ids[h, :]
// once, scores them against the G = Hq / Hkv query heads of that group, and
// keeps an online softmax in fp32, so the result is
//   out[g] = sum_i softmax(scale * q[g] . k[i]) v[i],   lse[g] = log sum_i exp(scale * q[g] . k[i])
// over the listed ids (-1 entries are padding and skipped; a repeated id is
// attended as often as it is listed). An id list with no valid entry gives
// out = 0 and lse = -inf, which merges exactly as "nothing to add".
//
// The loops are plain C++ that the compiler vectorises; on x86-64 with GCC or
// clang each hot function is also compiled for AVX2/FMA and AVX-512 and the
// best version is picked at load time, so the default build runs on any
// x86-64 and uses the wider units where the CPU has them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HYBRIDATTN_NO_MULTIVERSION)
#define HA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HA_MULTIVERSION
#endif

#if defined(__GNUC__)
#define HA_INLINE inline __attribute__((always_inline))
#else
#define HA_INLINE inline
#endif

namespace hybridattn {

enum class StoreType { f32, f16, bf16 };

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
};

// ---------------------------------------------------------------- conversions

HA_INLINE float bf16_to_float(uint16_t x) {
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Exact for normal, subnormal, infinite and NaN halves, and branch-free so it vectorises:
// the exponent is rebased by a multiply with 2^112, infinities/NaNs get an all-ones exponent.
HA_INLINE float f16_to_float(uint16_t h) {
  uint32_t magnitude = uint32_t(h & 0x7fffu) << 13;
  float f;
  std::memcpy(&f, &magnitude, 4);
  f *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits |= ((h & 0x7c00u) == 0x7c00u) ? 0x7f800000u : 0u;
  bits |= uint32_t(h & 0x8000u) << 16;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <StoreType T>
HA_INLINE void load_row(const void* base, int64_t offset, int64_t dim, float* dst) {
  if constexpr (T == StoreType::f32) {
    std::memcpy(dst, static_cast<const float*>(base) + offset, size_t(dim) * 4);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d)
      dst[d] = (T == StoreType::bf16) ? bf16_to_float(src[d]) : f16_to_float(src[d]);
  }
}

// ------------------------------------------------------- one chunk of one head

// Partial softmax state of G query heads: running max m, sum l, unnormalised acc [G, D].
struct PartialState {
  float* m;
  float* l;
  float* acc;
};

constexpr int64_t kTile = 16;  // ids scored together before their V rows are read

template <StoreType T>
HA_INLINE void attend_chunk(const GatherAttendArgs& a, int64_t head, int64_t begin, int64_t end,
                            PartialState st, float* kbuf /*[kTile, D]*/, float* pbuf /*[G, kTile]*/) {
  const int64_t D = a.k.dim, G = a.n_q_heads / a.k.n_heads;
  const float* q = a.q + head * G * D;
  const int64_t* ids = a.ids + head * a.n_ids;
  const int64_t k_base = head * a.k.head_stride, v_base = head * a.v.head_stride;
  for (int64_t g = 0; g < G; ++g) {
    st.m[g] = -std::numeric_limits<float>::infinity();
    st.l[g] = 0.0f;
  }
  std::fill(st.acc, st.acc + G * D, 0.0f);

  int64_t tile_ids[kTile];
  for (int64_t i = begin; i < end;) {
    int64_t n = 0;
    for (; i < end && n < kTile; ++i)
      if (ids[i] >= 0) tile_ids[n++] = ids[i];
    if (n == 0) continue;
    for (int64_t j = 0; j < n; ++j) load_row<T>(a.k.data, k_base + tile_ids[j] * D, D, kbuf + j * D);
    for (int64_t g = 0; g < G; ++g) {
      float* p = pbuf + g * kTile;
      float tile_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const float* kr = kbuf + j * D;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * kr[d];
        p[j] = s * a.scale;
        tile_max = std::max(tile_max, p[j]);
      }
      const float m_new = std::max(st.m[g], tile_max);
      if (m_new > st.m[g]) {  // rescale what was accumulated under the old max
        const float alpha = std::exp(st.m[g] - m_new);
        st.l[g] *= alpha;
        float* acc = st.acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
        st.m[g] = m_new;
      }
      for (int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - m_new);
        st.l[g] += p[j];
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      float* vr = kbuf;  // K rows of this tile are no longer needed
      load_row<T>(a.v.data, v_base + tile_ids[j] * D, D, vr);
      for (int64_t g = 0; g < G; ++g) {
        const float p = pbuf[g * kTile + j];
        float* acc = st.acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p * vr[d];
      }
    }
  }
}

HA_MULTIVERSION inline void attend_chunk_f32(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e,
                                             PartialState st, float* kbuf, float* pbuf) {
  attend_chunk<StoreType::f32>(a, h, b, e, st, kbuf, pbuf);
}
HA_MULTIVERSION inline void attend_chunk_f16(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e,
                                             PartialState st, float* kbuf, float* pbuf) {
  attend_chunk<StoreType::f16>(a, h, b, e, st, kbuf, pbuf);
}
HA_MULTIVERSION inline void attend_chunk_bf16(const GatherAttendArgs& a, int64_t h, int64_t b, int64_t e,
                                              PartialState st, float* kbuf, float* pbuf) {
  attend_chunk<StoreType::bf16>(a, h, b, e, st, kbuf, pbuf);
}

// ---------------------------------------------------------------- validation

// Index of the first id outside [-1, n_tokens), or -1 when all are valid.
inline int64_t first_bad_id(const int64_t* ids, int64_t count, int64_t n_tokens) {
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] < -1 || ids[i] >= n_tokens) return i;
  return -1;
}

inline void check_args(const GatherAttendArgs& a) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument(msg); };
  if (a.k.n_heads <= 0 || a.k.dim <= 0) fail("gather_attend: empty K store");
  if (a.k.n_heads != a.v.n_heads || a.k.n_tokens != a.v.n_tokens || a.k.dim != a.v.dim)
    fail("gather_attend: K and V stores differ in shape");
  if (a.k.type != a.v.type) fail("gather_attend: K and V stores differ in dtype");
  if (a.n_q_heads % a.k.n_heads != 0)
    fail("gather_attend: Hq = " + std::to_string(a.n_q_heads) + " is not a multiple of Hkv = " +
         std::to_string(a.k.n_heads));
  if (a.n_ids < 0) fail("gather_attend: negative id count");
}

// ------------------------------------------------------------------- merging

// Exact merge of two partial states (o, lse) of the same query heads:
// lse = logaddexp(lse_a, lse_b), o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b.
// A side with lse = -inf contributes nothing; both empty gives o = 0, lse = -inf.
inline void merge_states(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                         int64_t n_heads, int64_t dim, float* o, float* lse) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t h = 0; h < n_heads; ++h) {
    const float la = lse_a[h], lb = lse_b[h];
    const float mx = std::max(la, lb);
    float wa = 0.0f, wb = 0.0f, l = neg_inf;
    if (mx != neg_inf) {
      const float ea = std::exp(la - mx), eb = std::exp(lb - mx);
      l = mx + std::log(ea + eb);
      wa = ea / (ea + eb);
      wb = eb / (ea + eb);
    }
    for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = wa * o_a[h * dim + d] + wb * o_b[h * dim + d];
    lse[h] = l;
  }
}

// --------------------------------------------------------------- the kernel

inline void gather_attend(const GatherAttendArgs& a) {
  check_args(a);
  const int64_t Hkv = a.k.n_heads, D = a.k.dim, G = a.n_q_heads / Hkv, M = a.n_ids;
  const int64_t bad = first_bad_id(a.ids, Hkv * M, a.k.n_tokens);
  if (bad >= 0)
    throw std::out_of_range("gather_attend: ids[" + std::to_string(bad / std::max<int64_t>(M, 1)) + ", " +
                            std::to_string(bad % std::max<int64_t>(M, 1)) + "] = " + std::to_string(a.ids[bad]) +
                            " is outside [-1, " + std::to_string(a.k.n_tokens) + ")");

#ifdef _OPENMP
  const int threads = a.n_threads > 0 ? a.n_threads : omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Split each head's id list into chunks so that all threads have work even
  // when Hkv is small; each chunk keeps its own softmax state, merged below.
  constexpr int64_t kMinChunk = 128;
  const int64_t max_chunks = std::max<int64_t>(1, (M + kMinChunk - 1) / kMinChunk);
  const int64_t chunks = std::min(max_chunks, std::max<int64_t>(1, (2 * threads + Hkv - 1) / Hkv));
  const int64_t chunk_len = (M + chunks - 1) / std::max<int64_t>(chunks, 1);
  const int64_t items = Hkv * chunks, state_size = G * (D + 2);
  std::vector<float> states(size_t(items * state_size));
  auto state_of = [&](int64_t item) {
    float* base = states.data() + item * state_size;
    return PartialState{base, base + G, base + 2 * G};
  };

  auto run_item = [&](int64_t item, float* kbuf, float* pbuf) {
    const int64_t h = item / chunks, c = item % chunks;
    const int64_t begin = std::min(M, c * chunk_len), end = std::min(M, begin + chunk_len);
    switch (a.k.type) {
      case StoreType::f32: attend_chunk_f32(a, h, begin, end, state_of(item), kbuf, pbuf); break;
      case StoreType::f16: attend_chunk_f16(a, h, begin, end, state_of(item), kbuf, pbuf); break;
      case StoreType::bf16: attend_chunk_bf16(a, h, begin, end, state_of(item), kbuf, pbuf); break;
    }
  };

#pragma omp parallel num_threads(threads) if (items > 1)
  {
    std::vector<float> kbuf(size_t(kTile * D)), pbuf(size_t(G * kTile));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) run_item(item, kbuf.data(), pbuf.data());
  }

  // Combine the chunks of each head, then normalise.
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, state_of(h * chunks + c).m[g]);
      float* o = a.out + (h * G + g) * D;
      std::fill(o, o + D, 0.0f);
      if (m == -std::numeric_limits<float>::infinity()) {
        a.lse[h * G + g] = m;
        continue;
      }
      float l = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const PartialState st = state_of(h * chunks + c);
        if (st.l[g] == 0.0f) continue;
        const float w = std::exp(st.m[g] - m);
        l += w * st.l[g];
        for (int64_t d = 0; d < D; ++d) o[d] += w * st.acc[g * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= l;
      a.lse[h * G + g] = m + std::log(l);
    }
  }
}

}  // namespace hybridattn
