// The host side of one layer's decode step, for every (sequence, KV head) of a
// batch in one call: which host tokens to read, and their attention.
//
// Per unit (sequence b, KV head h):
//   1. candidates, each host id once, in this order:
//        the query->query lists' proposals: lists[h, near[h, p], :] walked in order, the first
//          `qq_limit` distinct ids among the first `qq_prefix` entries (-1 entries count as entries);
//        the tokens of the chosen blocks blocks[h, :] (full blocks of `block_size`, -1 = none);
//        the ranges `tail` and `recent` [begin, end);
//   2. each candidate rated (unless the threshold is -inf: then all are read): p = mean_g exp(scale * q[g] . k - lse[g]) over the G query heads of
//      the group; it is read when p >= threshold[b]. lse is given (the resident tokens' log-sum-exp
//      and the blocks' estimated mass), or with lse_from_candidates the given resident lse
//      log-sum-exp'd with the candidates' own scores;
//   3. the ids read: those that pass, and every id of the range `forced` (the newest host
//      tokens, which no index covers yet), in ascending order -> ids[b, h, :n_read] (-1 after);
//   4. their gather-attend -> out [G, D], lse_out [G] (as gather_attend on those ids, up to the
//      order of the sum: the rated candidates' scores are reused, so their K rows are read once);
//   5. reads per block: block_reads[b, h, j] = ids read in [j * block_size, (j + 1) * block_size).
//
// Duplicates are dropped with a bitmap over the host ids (one bit per token), kept per
// thread across calls and cleared bit by bit after each unit, so nothing is sorted and a
// unit costs time in its candidates, not in the context's length; the ascending order of
// the ids read comes from walking that bitmap. The scores are gather_scores' and the
// attention gather_attend's own code, so the Python reference (engine.decode.select, which
// calls those kernels) chooses the same ids, up to candidates whose rating lies within a
// rounding error of the threshold.
//
// Every id, list row and block a unit reads is checked before it is used: a bad one
// stops that unit and the call throws std::out_of_range after the parallel region.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "hybridattn/gather_attend.h"
#include "hybridattn/gather_scores.h"

namespace hybridattn {

// Candidate ranges of a sequence: [begin, end) pairs.
enum HostRange { kTail = 0, kRecent = 1, kForced = 2, kRanges = 3 };

struct HostStepArgs {
  int64_t n_seqs = 0;            // B
  int64_t n_q_heads = 0;         // Hq
  const float* q = nullptr;      // [B, Hq, D]
  const StoreView* k = nullptr;  // [B] stores [Hkv, N_b, D]
  const StoreView* v = nullptr;  // [B]
  // query->query lists, per sequence [Hkv, n_list_rows[b], list_len] int32 (-1 = empty slot)
  const int32_t* const* lists = nullptr;  // [B]
  const int64_t* n_list_rows = nullptr;   // [B]
  int64_t list_len = 0;
  const int64_t* near = nullptr;  // [B, Hkv, n_near]: list rows, in order of preference (-1 = none)
  int64_t n_near = 0;
  int64_t qq_limit = 0, qq_prefix = 0;
  const int64_t* blocks = nullptr;  // [B, Hkv, n_chosen] block ids (-1 = none)
  int64_t n_chosen = 0;
  int64_t block_size = 1;
  const int64_t* ranges = nullptr;  // [B, kRanges, 2]
  const float* lse = nullptr;       // [B, Hq]
  bool lse_from_candidates = false;
  const float* threshold = nullptr;  // [B]
  float scale = 1.0f;
  float* out = nullptr;              // [B, Hq, D]
  float* out_lse = nullptr;          // [B, Hq]
  int64_t* ids = nullptr;            // [B, Hkv, cap]
  int64_t cap = 0;
  int64_t* n_read = nullptr;         // [B, Hkv]
  int64_t* n_rated = nullptr;        // [B, Hkv]
  int32_t* block_reads = nullptr;    // [B, Hkv, n_count_blocks]
  int64_t n_count_blocks = 0;
  int n_threads = 0;
  bool scalar = false;
};

// A thread's scratch, reused across units and calls; `bits` is all zero between units.
struct HostScratch {
  std::vector<uint64_t> bits;
  std::vector<int64_t> candidates, kept, extra;
  std::vector<float> scores, buf;
};

inline HostScratch& host_scratch() {
  static thread_local HostScratch s;
  return s;
}

// One KV head of a store as a store of one head.
inline StoreView head_view(const StoreView& s, int64_t h) {
  StoreView v = s;
  v.data = static_cast<const char*>(s.data) + h * s.head_stride * elem_bytes(s.type);
  v.n_heads = 1;
  return v;
}

inline void score_rows(const GatherScoresArgs& a, int64_t n) {
  switch (a.k.type) {
    case StoreType::f32: return score_chunk_f32(a, 0, 0, n);
    case StoreType::f16: return score_chunk_f16(a, 0, 0, n);
    case StoreType::bf16: return score_chunk_bf16(a, 0, 0, n);
  }
}

class HostUnit {
 public:
  HostUnit(const HostStepArgs& a, int64_t b, int64_t h)
      : a_(a), b_(b), h_(h), Hkv_(a.k[b].n_heads), G_(a.n_q_heads / Hkv_), D_(a.k[b].dim), N_(a.k[b].n_tokens),
        s_(host_scratch()) {
    const size_t words = size_t((N_ + 63) / 64);
    if (s_.bits.size() < words) s_.bits.resize(words, 0);
    s_.candidates.clear();
  }

  // Runs the unit; returns an error message ("" when all went well).
  std::string run() {
    std::string err = gather_candidates();
    if (err.empty()) rate();
    clear_candidates();  // the bitmap is zero again whatever happened
    if (!err.empty()) return err;
    return read();
  }

 private:
  uint64_t* bits() { return s_.bits.data(); }
  bool test(int64_t id) { return (bits()[id >> 6] >> (id & 63)) & 1u; }
  void set(int64_t id) { bits()[id >> 6] |= uint64_t(1) << (id & 63); }

  void add(int64_t id) {
    if (!test(id)) {
      set(id);
      s_.candidates.push_back(id);
    }
  }

  std::string where() const { return "host_step: sequence " + std::to_string(b_) + ", KV head " + std::to_string(h_); }

  std::string gather_candidates() {
    const int64_t unit = b_ * Hkv_ + h_;
    const int64_t rows = a_.n_list_rows[b_], L = a_.list_len;
    const int64_t* near = a_.near + unit * a_.n_near;
    int64_t walked = 0, found = 0;
    for (int64_t p = 0; p < a_.n_near && walked < a_.qq_prefix && found < a_.qq_limit; ++p) {
      const int64_t r = near[p];
      if (r < -1 || r >= rows) return where() + ": list row " + std::to_string(r) + " is outside [-1, " + std::to_string(rows) + ")";
      if (r < 0) continue;
      const int32_t* list = a_.lists[b_] + (h_ * rows + r) * L;
      for (int64_t j = 0; j < L && walked < a_.qq_prefix && found < a_.qq_limit; ++j, ++walked) {
        const int64_t id = list[j];
        if (id < -1 || id >= N_) return where() + ": list entry " + std::to_string(id) + " is outside [-1, " + std::to_string(N_) + ")";
        if (id >= 0 && !test(id)) {
          add(id);
          ++found;
        }
      }
    }
    const int64_t* blocks = a_.blocks + unit * a_.n_chosen;
    const int64_t B = a_.block_size;
    for (int64_t j = 0; j < a_.n_chosen; ++j) {
      const int64_t blk = blocks[j];
      if (blk < -1 || blk >= N_ / B)  // the full blocks are [0, N / B): no product to overflow
        return where() + ": block " + std::to_string(blk) + " is not a full block of the store";
      for (int64_t t = blk * B; blk >= 0 && t < (blk + 1) * B; ++t) add(t);
    }
    const int64_t* range = a_.ranges + b_ * kRanges * 2;
    for (int r : {kTail, kRecent})
      for (int64_t t = range[2 * r]; t < range[2 * r + 1]; ++t) add(t);
    return "";
  }

  // Rates the candidates and keeps those read in the scratch's `kept` (the forced range is added in read()).
  // A threshold of -inf reads every candidate without rating it.
  void rate() {
    const int64_t C = int64_t(s_.candidates.size());
    s_.kept.clear();
    a_.n_rated[b_ * Hkv_ + h_] = 0;
    if (reads_all()) {
      s_.kept = s_.candidates;
      return;
    }
    s_.scores.resize(size_t((G_ + 1) * C));  // G rows of scores, and the largest log-terms
    GatherScoresArgs sc;
    sc.q = a_.q + (b_ * a_.n_q_heads + h_ * G_) * D_;
    sc.n_q_heads = G_;
    sc.k = head_view(a_.k[b_], h_);
    sc.ids = s_.candidates.data();
    sc.n_ids = C;
    sc.out = s_.scores.data();
    sc.scalar = a_.scalar;
    score_rows(sc, C);
    float lse[kMaxRateGroup];
    const float* given = a_.lse + b_ * a_.n_q_heads + h_ * G_;
    for (int64_t g = 0; g < G_; ++g) {
      float* s = s_.scores.data() + g * C;
      for (int64_t j = 0; j < C; ++j) s[j] *= a_.scale;
      lse[g] = given[g];
      if (a_.lse_from_candidates) lse[g] = log_add_exp(lse[g], log_sum_exp(s, C));
    }
    // The group's mean lies between 1/G of its largest term and that term: a candidate whose largest
    // log-term lies clearly below log(threshold) is dropped, one clearly above log(G * threshold) kept,
    // without exponentials; only those between are summed (kRateMargin keeps rounding out of it).
    // A threshold of +inf has no finite bound: every candidate is summed (a mean that overflows is read).
    const float threshold = a_.threshold[b_];
    const float inf = std::numeric_limits<float>::infinity();
    const float drop_below = threshold == inf ? -inf : std::log(threshold) - kRateMargin;
    const float keep_above = threshold == inf ? inf : std::log(threshold * float(G_)) + kRateMargin;
    float* top = s_.scores.data() + G_ * C;  // each candidate's largest log-term
    const float* s0 = s_.scores.data();
    for (int64_t j = 0; j < C; ++j) top[j] = s0[j] - lse[0];
    for (int64_t g = 1; g < G_; ++g) {
      const float* s = s_.scores.data() + g * C;
      for (int64_t j = 0; j < C; ++j) top[j] = std::max(top[j], s[j] - lse[g]);
    }
    for (int64_t j = 0; j < C; ++j) {
      if (top[j] < drop_below) continue;
      if (top[j] < keep_above) {
        float p = 0.0f;
        for (int64_t g = 0; g < G_; ++g) p += std::exp(s_.scores[size_t(g * C + j)] - lse[g]);
        if (p / float(G_) < threshold) continue;
      }
      // the kept candidates' scores move to the front of their rows (the attend reuses them)
      for (int64_t g = 0; g < G_; ++g) s_.scores[size_t(g * C) + s_.kept.size()] = s_.scores[size_t(g * C + j)];
      s_.kept.push_back(s_.candidates[size_t(j)]);
    }
    a_.n_rated[b_ * Hkv_ + h_] = C;
  }

  // A threshold of -inf reads every candidate unrated: no scores to reuse.
  bool reads_all() const { return a_.threshold[b_] == -std::numeric_limits<float>::infinity(); }

  void clear_candidates() {
    for (int64_t id : s_.candidates) bits()[id >> 6] = 0;  // whole words: every bit set is a candidate's
  }

  std::string read() {
    const int64_t unit = b_ * Hkv_ + h_;
    const int64_t* range = a_.ranges + b_ * kRanges * 2;
    int64_t lo = N_, hi = -1;
    for (int64_t id : s_.kept) {
      set(id);
      lo = std::min(lo, id), hi = std::max(hi, id);
    }
    s_.extra.clear();  // the forced ids not kept already
    for (int64_t t = range[2 * kForced]; t < range[2 * kForced + 1]; ++t) {
      if (!test(t)) s_.extra.push_back(t);
      set(t);
      lo = std::min(lo, t), hi = std::max(hi, t);
    }
    int64_t* ids = a_.ids + unit * a_.cap;
    int64_t n = 0;
    bool overflow = false;
    for (int64_t w = lo >> 6; hi >= 0 && w <= (hi >> 6); ++w) {
      for (uint64_t word = bits()[w]; word; word &= word - 1) {
        if (n < a_.cap) ids[n] = w * 64 + __builtin_ctzll(word);
        overflow |= n++ >= a_.cap;
      }
      bits()[w] = 0;
    }
    if (overflow) return where() + ": " + std::to_string(n) + " ids read exceed cap " + std::to_string(a_.cap);
    std::fill(ids + n, ids + a_.cap, int64_t(-1));
    a_.n_read[unit] = n;
    count_blocks(ids, n);
    if (reads_all())
      attend(ids, n);
    else
      attend_rated();
    return "";
  }

  void count_blocks(const int64_t* ids, int64_t n) {
    int32_t* counts = a_.block_reads + (b_ * Hkv_ + h_) * a_.n_count_blocks;
    std::fill(counts, counts + a_.n_count_blocks, 0);
    for (int64_t i = 0; i < n; ++i)
      if (ids[i] / a_.block_size < a_.n_count_blocks) ++counts[ids[i] / a_.block_size];
  }

  // The gather-attend of this unit's group over ids[0..n).
  GatherAttendArgs attend_args(const int64_t* ids, int64_t n) {
    GatherAttendArgs g;
    g.q = a_.q + (b_ * a_.n_q_heads + h_ * G_) * D_;
    g.n_q_heads = G_;
    g.k = head_view(a_.k[b_], h_);
    g.v = head_view(a_.v[b_], h_);
    g.ids = ids;
    g.n_ids = n;
    g.scale = a_.scale;
    g.out = a_.out + (b_ * a_.n_q_heads + h_ * G_) * D_;
    g.lse = a_.out_lse + b_ * a_.n_q_heads + h_ * G_;
    g.scalar = a_.scalar;
    s_.buf.resize(size_t(2 * kTile * D_ + G_ * kTile));
    return g;
  }

  void attend(const int64_t* ids, int64_t n) {
    const GatherAttendArgs g = attend_args(ids, n);
    ChunkStates state(1, G_, D_);
    attend_chunk_any(g, 0, 0, n, state[0], s_.buf.data());
    combine_chunks(g, 0, state, 0, 1);
  }

  // The kept candidates with the scores their rating computed (their K rows are not read again),
  // and the forced range's other ids scored here; the two merged. The same attention as attend()
  // on the ids read, summed in another order.
  void attend_rated() {
    const int64_t kept = int64_t(s_.kept.size()), extra = int64_t(s_.extra.size());
    const GatherAttendArgs g = attend_args(s_.kept.data(), kept);
    GatherAttendArgs forced = g;
    forced.ids = s_.extra.data();
    forced.n_ids = extra;
    ChunkStates state(2, G_, D_);
    attend_scored_any(g, 0, s_.scores.data(), int64_t(s_.candidates.size()), state[0], s_.buf.data());
    attend_chunk_any(forced, 0, 0, extra, state[1], s_.buf.data());
    combine_chunks(g, 0, state, 0, 2);
  }

  static float log_sum_exp(const float* s, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    if (!std::isfinite(m)) return m;
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += std::exp(s[j] - m);
    return m + std::log(sum);
  }

  static float log_add_exp(float x, float y) {
    const float m = std::max(x, y);
    if (m == -std::numeric_limits<float>::infinity()) return m;
    return m + std::log1p(std::exp(-std::fabs(x - y)));
  }

 public:
  static constexpr int64_t kMaxRateGroup = 64;  // query heads per KV head the rating takes
  static constexpr float kRateMargin = 1e-3f;    // nats between a bound and the threshold for a decision by bound

 private:
  const HostStepArgs& a_;
  const int64_t b_, h_, Hkv_, G_, D_, N_;
  HostScratch& s_;
};

// Shapes and ranges, before any work (std::invalid_argument / std::out_of_range).
inline void check_host_step(const HostStepArgs& a) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("host_step: " + m); };
  if (a.n_seqs < 0 || a.n_near < 0 || a.n_chosen < 0 || a.cap < 0 || a.n_count_blocks < 0 || a.list_len < 0)
    fail("negative size");
  if (a.block_size <= 0) fail("block_size must be positive");
  if (a.qq_limit < 0 || a.qq_prefix < 0) fail("qq_limit and qq_prefix must be >= 0");
  for (int64_t b = 0; b < a.n_seqs; ++b) {
    const std::string seq = "sequence " + std::to_string(b) + ": ";
    const StoreView &k = a.k[b], &v = a.v[b], &k0 = a.k[0];
    check_queries_and_store(k, a.n_q_heads, 0, "host_step: " + seq);
    if (k.type != v.type || k.n_heads != v.n_heads || k.n_tokens != v.n_tokens || k.dim != v.dim)
      fail(seq + "K and V stores differ");
    if (k.type != k0.type || k.n_heads != k0.n_heads || k.dim != k0.dim)
      fail(seq + "its stores differ from sequence 0's in dtype, Hkv or D");
    if (a.n_q_heads / k.n_heads > HostUnit::kMaxRateGroup) fail("more than 64 query heads per KV head");
    if (a.n_list_rows[b] < 0) fail(seq + "negative list rows");
    if (a.n_list_rows[b] > 0 && a.lists[b] == nullptr) fail(seq + "no lists");
    const int64_t* r = a.ranges + b * kRanges * 2;
    for (int i = 0; i < kRanges; ++i)
      if (r[2 * i] < 0 || r[2 * i] > r[2 * i + 1] || r[2 * i + 1] > k.n_tokens)
        throw std::out_of_range("host_step: " + seq + "range [" + std::to_string(r[2 * i]) + ", " +
                                std::to_string(r[2 * i + 1]) + ") is not within [0, " + std::to_string(k.n_tokens) +
                                "]");
  }
}

inline void host_step(const HostStepArgs& a) {
  check_host_step(a);
  if (a.n_seqs == 0) return;
  const int64_t Hkv = a.k[0].n_heads, units = a.n_seqs * Hkv;
  const int threads = resolve_threads(a.n_threads);
  std::vector<std::string> errors(static_cast<size_t>(units));  // a throw inside the parallel region would terminate
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (units > 1 && threads > 1)
  for (int64_t unit = 0; unit < units; ++unit) errors[size_t(unit)] = HostUnit(a, unit / Hkv, unit % Hkv).run();
  for (const std::string& e : errors)
    if (!e.empty()) throw std::out_of_range(e);
}

}  // namespace hybridattn
