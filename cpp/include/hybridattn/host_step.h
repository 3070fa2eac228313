// The host side of one layer's decode step, for every (sequence, KV head) of a
// batch in one call: which host tokens to read, and their attention.
//
// Per unit (sequence b, KV head h):
//   1. candidates, each host id once, found in this order (then rated in ascending order):
//        the query->query lists' proposals: lists[h, near[h, p], :] walked in order, the first
//          `qq_limit[b]` distinct ids among the first `qq_prefix[b]` entries (-1 entries count as entries);
//        the tokens of the chosen blocks blocks[h, :] (full blocks of `block_size`, -1 = none);
//        the ranges `tail` and `recent` [begin, end);
//   2. each candidate rated (unless the threshold is -inf: then all are read):
//      p = mean_g exp(scale * q[g] . k - lse[g]) over the G query heads of the group; it is read
//      when p >= threshold[b]. lse is given (the resident tokens' log-sum-exp and the blocks'
//      estimated mass), or with lse_from_candidates the given resident lse log-sum-exp'd with
//      the candidates' own scores;
//   3. the ids read: those that pass, and every id of the range `forced` (the newest host
//      tokens, which no index covers yet), in ascending order -> ids[b, h, :n_read] (-1 after);
//   4. their gather-attend -> out [G, D], lse_out [G] (as gather_attend on those ids, up to the
//      order of the sum: the rated candidates' scores are reused, so their K rows are read once);
//   5. reads per block: block_reads[b, h, j] = ids read in [j * block_size, (j + 1) * block_size).
//
// Threads: with at least twice as many KV heads as threads, or few candidates, each unit runs
// whole on one thread. With fewer KV heads (a GPU host's many cores at batch 1, a model with one
// or two KV heads), a unit's candidates are rated and attended in chunks of `min_chunk` or more
// (at most as many as gather_attend takes, chunks_per_head: they depend on the threads, Hkv and
// the unit's candidates, not on the batch), each phase over every unit's chunks, so that every
// thread has work. The ids read are the same either way; the attention differs only in the
// order of its sums.
//
// Duplicates are dropped with a bitmap over the host ids (one bit per token), kept per
// thread across calls and cleared word by word within the phase that sets it, so nothing is
// sorted: the ascending order of the candidates and of the ids read comes from walking that
// bitmap between the lowest and the highest id set (one word per 64 host tokens, a few
// microseconds at a million). The scores are
// gather_scores' and the attention gather_attend's own code, so the Python reference (engine.decode.select, which
// calls those kernels) chooses the same ids, up to candidates whose rating lies within a
// rounding error of the threshold.
//
// Every id, list row and block a unit reads is checked before it is used: a bad one
// stops that unit and the call throws std::out_of_range after the parallel phase.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "hybridattn/gather_attend.h"
#include "hybridattn/gather_scores.h"

namespace hybridattn {

// Candidate ranges of a sequence: [begin, end) pairs.
enum HostRange { kTail = 0, kRecent = 1, kForced = 2, kRanges = 3 };

// The fewest candidates a chunk takes by default: a smaller chunk costs more in the phases'
// hand-overs than it saves (the bundled model at 8K, 1,515 candidates per KV head and 2 threads:
// 0.17 ms whole, 0.19 ms in two chunks).
constexpr int64_t kMinHostChunk = 2048;

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
  // [B] each: a sequence's budget of list proposals (its own: with an adaptive budget it grows with its context)
  const int64_t* qq_limit = nullptr;
  const int64_t* qq_prefix = nullptr;
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
  int64_t min_chunk = kMinHostChunk;  // the fewest candidates a chunk of a unit takes
  bool scalar = false;
};

// A thread's scratch, reused across units and calls: the bitmap (all zero between a unit's
// phases) and the attention's tile buffer.
struct HostScratch {
  std::vector<uint64_t> bits;
  std::vector<float> buf;
};

inline HostScratch& host_scratch() {
  static thread_local HostScratch s;
  return s;
}

constexpr int64_t kMaxRateGroup = 64;  // query heads per KV head the rating takes
constexpr float kRateMargin = 1e-3f;    // nats between a bound and the threshold for a decision by bound

// One unit's (sequence, KV head) state between the phases of a call. Its candidates are rated
// and attended in `chunks` pieces, so that a few units still spread over every thread.
struct UnitWork {
  std::vector<int64_t> candidates;  // [C], each host id once
  std::vector<float> scores;        // [G + 1, C]: the scaled scores, then each one's largest log-term
  std::vector<int64_t> kept;        // [C]: each chunk's kept candidates at the front of its range
  std::vector<int64_t> n_kept;      // [chunks]
  std::vector<int64_t> extra;       // the forced ids not kept
  int64_t chunks = 1;
  float lse[kMaxRateGroup];         // the rating's denominators, per query head of the group
  std::string error;
};

// The calling thread's unit states, reused across its calls (the workers only reach them through it).
inline std::vector<UnitWork>& unit_work(int64_t units) {
  static thread_local std::vector<UnitWork> work;
  if (int64_t(work.size()) < units) work.resize(size_t(units));
  return work;
}

// One KV head of a store as a store of one head.
inline StoreView head_view(const StoreView& s, int64_t h) {
  StoreView v = s;
  v.data = static_cast<const char*>(s.data) + h * s.head_stride * elem_bytes(s.type);
  v.n_heads = 1;
  return v;
}

inline void score_rows(const GatherScoresArgs& a, int64_t begin, int64_t end) {
  switch (a.k.type) {
    case StoreType::f32: return score_chunk_f32(a, 0, begin, end);
    case StoreType::f16: return score_chunk_f16(a, 0, begin, end);
    case StoreType::bf16: return score_chunk_bf16(a, 0, begin, end);
  }
}

// The chunks of a unit with C candidates: as many as gather_attend's (which depend on the threads and
// Hkv, not on the batch), of min_chunk candidates or more.
inline int64_t unit_chunks(const HostStepArgs& a, int threads, int64_t C) {
  return std::max<int64_t>(1, std::min(chunks_per_head(threads, a.k[0].n_heads, C), C / a.min_chunk));
}

// The most candidates a unit of sequence b can gather, known before it gathers them.
inline int64_t most_candidates(const HostStepArgs& a, int64_t b) {
  const int64_t N = a.k[b].n_tokens, *r = a.ranges + b * kRanges * 2;
  const int64_t lists = std::min({a.qq_limit[b], a.qq_prefix[b], std::min(a.n_near, N) * std::min(a.list_len, N)});
  const int64_t blocks = std::min(a.n_chosen, N) * std::min(a.block_size, N);
  return std::min(N, std::min(lists, N) + std::min(blocks, N) + (r[2 * kTail + 1] - r[2 * kTail]) +
                         (r[2 * kRecent + 1] - r[2 * kRecent]));
}

// The phases of one unit, in the order a call runs them: gather(), then per chunk score() and,
// once every chunk is scored, resolve_lse() and per chunk keep(); read(); per piece attend();
// combine(). Each phase finishes its use of the thread's bitmap, so phases may run on any thread.
class HostUnit {
 public:
  HostUnit(const HostStepArgs& a, int64_t unit, UnitWork& w)
      : a_(a), unit_(unit), b_(unit / a.k[0].n_heads), h_(unit % a.k[0].n_heads), Hkv_(a.k[b_].n_heads),
        G_(a.n_q_heads / Hkv_), D_(a.k[b_].dim), N_(a.k[b_].n_tokens), w_(w), s_(host_scratch()) {
    const size_t words = size_t((N_ + 63) / 64);  // this thread's bitmap covers the store
    if (s_.bits.size() < words) s_.bits.resize(words, 0);
  }

  // Step 1 and the unit's chunks (one unless `split`; `threads`: the call's); sets w.error on a bad input.
  void gather(int threads, bool split) {
    w_.candidates.clear();
    w_.error = gather_candidates();
    sort_candidates();  // the bitmap is zero again whatever happened
    const int64_t C = int64_t(w_.candidates.size());
    w_.chunks = split ? unit_chunks(a_, threads, C) : 1;
    w_.n_kept.assign(size_t(w_.chunks), 0);
    a_.n_rated[unit_] = reads_all() ? 0 : C;
    if (reads_all()) return;
    if (w_.scores.size() < size_t((G_ + 1) * C)) w_.scores.resize(size_t((G_ + 1) * C));
    if (w_.kept.size() < size_t(C)) w_.kept.resize(size_t(C));
  }

  // Step 2's scores of chunk c, scaled.
  void score(int64_t c) {
    if (reads_all() || failed()) return;
    const auto [begin, end] = chunk(c);
    const int64_t C = n_candidates();
    GatherScoresArgs sc;
    sc.q = queries();
    sc.n_q_heads = G_;
    sc.k = head_view(a_.k[b_], h_);
    sc.ids = w_.candidates.data();
    sc.n_ids = C;
    sc.out = w_.scores.data();
    sc.scalar = a_.scalar;
    score_rows(sc, begin, end);
    for (int64_t g = 0; g < G_; ++g) {
      float* s = w_.scores.data() + g * C;
      for (int64_t j = begin; j < end; ++j) s[j] *= a_.scale;
    }
  }

  // The rating's denominators: the given lse, or with lse_from_candidates that and every candidate's score.
  void resolve_lse() {
    if (reads_all() || failed()) return;
    const int64_t C = n_candidates();
    const float* given = a_.lse + b_ * a_.n_q_heads + h_ * G_;
    for (int64_t g = 0; g < G_; ++g) {
      w_.lse[g] = given[g];
      if (a_.lse_from_candidates) w_.lse[g] = log_add_exp(w_.lse[g], log_sum_exp(w_.scores.data() + g * C, C));
    }
  }

  // Step 2's decision for chunk c: its candidates read move, with their scores, to the front of its range.
  void keep(int64_t c) {
    if (reads_all() || failed()) return;
    const auto [begin, end] = chunk(c);
    const int64_t C = n_candidates();
    const float* lse = w_.lse;
    float* scores = w_.scores.data();
    // The group's mean lies between 1/G of its largest term and that term: a candidate whose largest
    // log-term lies clearly below log(threshold) is dropped, one clearly above log(G * threshold) kept,
    // without exponentials; only those between are summed (kRateMargin keeps rounding out of it).
    // A threshold of +inf has no finite bound: every candidate is summed (a mean that overflows is read).
    const float threshold = a_.threshold[b_];
    const float inf = std::numeric_limits<float>::infinity();
    const float drop_below = threshold == inf ? -inf : std::log(threshold) - kRateMargin;
    const float keep_above = threshold == inf ? inf : std::log(threshold * float(G_)) + kRateMargin;
    float* top = scores + G_ * C;  // each candidate's largest log-term
    for (int64_t j = begin; j < end; ++j) top[j] = scores[j] - lse[0];
    for (int64_t g = 1; g < G_; ++g) {
      const float* s = scores + g * C;
      for (int64_t j = begin; j < end; ++j) top[j] = std::max(top[j], s[j] - lse[g]);
    }
    int64_t n = 0;
    for (int64_t j = begin; j < end; ++j) {
      // written as "read only if at least", so that a NaN score (a NaN key) is not read, as in the Python rule
      if (!(top[j] >= drop_below)) continue;
      if (!(top[j] >= keep_above)) {
        float p = 0.0f;
        for (int64_t g = 0; g < G_; ++g) p += std::exp(scores[g * C + j] - lse[g]);
        if (!(p / float(G_) >= threshold)) continue;
      }
      for (int64_t g = 0; g < G_; ++g) scores[g * C + begin + n] = scores[g * C + j];
      w_.kept[size_t(begin + n++)] = w_.candidates[size_t(j)];
    }
    w_.n_kept[size_t(c)] = n;
  }

  // Steps 3 and 5: the ids read, ascending, and their counts per block; sets w.error past the cap.
  void read() {
    if (failed()) return;
    const int64_t* range = a_.ranges + b_ * kRanges * 2;
    int64_t lo = N_, hi = -1;
    auto mark = [&](int64_t id) {
      set(id);
      lo = std::min(lo, id), hi = std::max(hi, id);
    };
    if (reads_all()) {
      for (int64_t id : w_.candidates) mark(id);
    } else {
      for (int64_t c = 0; c < w_.chunks; ++c)
        for (int64_t i = 0; i < w_.n_kept[size_t(c)]; ++i) mark(w_.kept[size_t(chunk(c).first + i)]);
    }
    w_.extra.clear();  // the forced ids not read already
    for (int64_t t = range[2 * kForced]; t < range[2 * kForced + 1]; ++t) {
      if (!test(t)) w_.extra.push_back(t);
      mark(t);
    }
    int64_t* ids = a_.ids + unit_ * a_.cap;
    int64_t n = 0;
    bool overflow = false;
    drain(lo, hi, [&](int64_t id) {
      if (n < a_.cap) ids[n] = id;
      overflow |= n++ >= a_.cap;
    });
    if (overflow) {
      w_.error = where() + ": " + std::to_string(n) + " ids read exceed cap " + std::to_string(a_.cap);
      return;
    }
    std::fill(ids + n, ids + a_.cap, int64_t(-1));
    a_.n_read[unit_] = n;
    count_blocks(ids, n);
  }

  // The pieces step 4 attends in, each to its own partial state: a rated unit's kept candidates
  // chunk by chunk, with the scores their rating computed (their K rows are not read again), and
  // last the forced ids not kept; a unit read whole, the ids read, in as many pieces, and an empty one.
  int64_t pieces() const { return w_.chunks + 1; }

  void attend(int64_t piece, PartialState st) {
    if (failed()) return;
    s_.buf.resize(size_t(2 * kTile * D_ + G_ * kTile));
    GatherAttendArgs g = attend_args();
    if (reads_all()) {
      const int64_t n = a_.n_read[unit_], len = (n + w_.chunks - 1) / w_.chunks;
      const int64_t begin = std::min(n, piece * len), end = piece < w_.chunks ? std::min(n, begin + len) : begin;
      g.ids = a_.ids + unit_ * a_.cap;
      g.n_ids = n;
      return attend_chunk_any(g, 0, begin, end, st, s_.buf.data());
    }
    if (piece == w_.chunks) {
      g.ids = w_.extra.data();
      g.n_ids = int64_t(w_.extra.size());
      return attend_chunk_any(g, 0, 0, g.n_ids, st, s_.buf.data());
    }
    const int64_t begin = chunk(piece).first;
    g.ids = w_.kept.data() + begin;
    g.n_ids = w_.n_kept[size_t(piece)];
    attend_scored_any(g, 0, w_.scores.data() + begin, n_candidates(), st, s_.buf.data());
  }

  // The pieces' states first .. first + pieces() - 1 merged into the unit's out and lse.
  void combine(ChunkStates& states, int64_t first) {
    if (!failed()) combine_chunks(attend_args(), 0, states, first, pieces());
  }

 private:
  uint64_t* bits() { return s_.bits.data(); }
  bool test(int64_t id) { return (bits()[id >> 6] >> (id & 63)) & 1u; }
  void set(int64_t id) { bits()[id >> 6] |= uint64_t(1) << (id & 63); }
  int64_t n_candidates() const { return int64_t(w_.candidates.size()); }
  const float* queries() const { return a_.q + (b_ * a_.n_q_heads + h_ * G_) * D_; }  // the group's [G, D]
  bool failed() const { return !w_.error.empty(); }  // a bad input or the cap: the unit stops, the call throws

  // [begin, end) of chunk c among the candidates.
  std::pair<int64_t, int64_t> chunk(int64_t c) const {
    const int64_t C = n_candidates(), len = (C + w_.chunks - 1) / w_.chunks, begin = std::min(C, c * len);
    return {begin, std::min(C, begin + len)};
  }

  void add(int64_t id) {
    if (!test(id)) {
      set(id);
      w_.candidates.push_back(id);
    }
  }

  std::string where() const { return "host_step: sequence " + std::to_string(b_) + ", KV head " + std::to_string(h_); }

  std::string gather_candidates() {
    const int64_t rows = a_.n_list_rows[b_], L = a_.list_len;
    const int64_t* near = a_.near + unit_ * a_.n_near;
    const int64_t limit = a_.qq_limit[b_], prefix = a_.qq_prefix[b_];
    int64_t walked = 0, found = 0;
    for (int64_t p = 0; p < a_.n_near && walked < prefix && found < limit; ++p) {
      const int64_t r = near[p];
      if (r < -1 || r >= rows) return where() + ": list row " + std::to_string(r) + " is outside [-1, " + std::to_string(rows) + ")";
      if (r < 0) continue;
      const int32_t* list = a_.lists[b_] + (h_ * rows + r) * L;
      for (int64_t j = 0; j < L && walked < prefix && found < limit; ++j, ++walked) {
        const int64_t id = list[j];
        if (id < -1 || id >= N_) return where() + ": list entry " + std::to_string(id) + " is outside [-1, " + std::to_string(N_) + ")";
        if (id >= 0 && !test(id)) {
          add(id);
          ++found;
        }
      }
    }
    const int64_t* blocks = a_.blocks + unit_ * a_.n_chosen;
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

  // A threshold of -inf reads every candidate without rating it: no scores to reuse.
  bool reads_all() const { return a_.threshold[b_] == -std::numeric_limits<float>::infinity(); }

  // The candidates in ascending order, read off the bitmap (zero again after): rows rated and read
  // in memory order rather than in the order they were found, which scatters the list proposals
  // over the store, cost the CPU fewer misses (docs/results.md, "The blocks' scores through the
  // query-dots kernel, and the candidates rated in memory order").
  void sort_candidates() {
    if (w_.candidates.empty()) return;
    const auto [lo, hi] = std::minmax_element(w_.candidates.begin(), w_.candidates.end());
    int64_t n = 0;
    drain(*lo, *hi, [&](int64_t id) { w_.candidates[size_t(n++)] = id; });
  }

  // emit(id) for every id of [lo, hi] whose bit is set, ascending; the words holding them are cleared.
  template <class Emit>
  void drain(int64_t lo, int64_t hi, Emit emit) {
    for (int64_t w = lo >> 6; hi >= 0 && w <= (hi >> 6); ++w) {
      for (uint64_t word = bits()[w]; word; word &= word - 1) emit(w * 64 + __builtin_ctzll(word));
      bits()[w] = 0;
    }
  }

  void count_blocks(const int64_t* ids, int64_t n) {
    int32_t* counts = a_.block_reads + unit_ * a_.n_count_blocks;
    std::fill(counts, counts + a_.n_count_blocks, 0);
    for (int64_t i = 0; i < n; ++i)
      if (ids[i] / a_.block_size < a_.n_count_blocks) ++counts[ids[i] / a_.block_size];
  }

  // The gather-attend of this unit's group (its ids set by the caller).
  GatherAttendArgs attend_args() const {
    GatherAttendArgs g;
    g.q = queries();
    g.n_q_heads = G_;
    g.k = head_view(a_.k[b_], h_);
    g.v = head_view(a_.v[b_], h_);
    g.scale = a_.scale;
    g.out = a_.out + (b_ * a_.n_q_heads + h_ * G_) * D_;
    g.lse = a_.out_lse + b_ * a_.n_q_heads + h_ * G_;
    g.scalar = a_.scalar;
    return g;
  }

  static float log_sum_exp(const float* s, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      if (std::isnan(s[j])) return s[j];  // std::max would pass over it
      m = std::max(m, s[j]);
    }
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

  const HostStepArgs& a_;
  const int64_t unit_, b_, h_, Hkv_, G_, D_, N_;
  UnitWork& w_;
  HostScratch& s_;
};

// Shapes and ranges, before any work (std::invalid_argument / std::out_of_range).
inline void check_host_step(const HostStepArgs& a) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("host_step: " + m); };
  if (a.n_seqs < 0 || a.n_near < 0 || a.n_chosen < 0 || a.cap < 0 || a.n_count_blocks < 0 || a.list_len < 0)
    fail("negative size");
  if (a.block_size <= 0) fail("block_size must be positive");
  if (a.min_chunk < 1) fail("min_chunk must be >= 1");
  if (a.n_seqs > 0 && a.n_q_heads <= 0) fail("no query heads");  // G = 0 would rate by 0 / 0
  for (int64_t b = 0; b < a.n_seqs; ++b) {
    const std::string seq = "sequence " + std::to_string(b) + ": ";
    const StoreView &k = a.k[b], &v = a.v[b], &k0 = a.k[0];
    check_queries_and_store(k, a.n_q_heads, 0, "host_step: sequence " + std::to_string(b));
    if (k.type != v.type || k.n_heads != v.n_heads || k.n_tokens != v.n_tokens || k.dim != v.dim)
      fail(seq + "K and V stores differ");
    if (k.type != k0.type || k.n_heads != k0.n_heads || k.dim != k0.dim)
      fail(seq + "its stores differ from sequence 0's in dtype, Hkv or D");
    if (a.n_q_heads / k.n_heads > kMaxRateGroup) fail("more than 64 query heads per KV head");
    if (a.n_list_rows[b] < 0) fail(seq + "negative list rows");
    if (a.qq_limit[b] < 0 || a.qq_prefix[b] < 0) fail(seq + "qq_limit and qq_prefix must be >= 0");
    if (a.n_list_rows[b] > 0 && a.lists[b] == nullptr) fail(seq + "no lists");
    const int64_t* r = a.ranges + b * kRanges * 2;
    for (int i = 0; i < kRanges; ++i)
      if (r[2 * i] < 0 || r[2 * i] > r[2 * i + 1] || r[2 * i + 1] > k.n_tokens)
        throw std::out_of_range("host_step: " + seq + "range [" + std::to_string(r[2 * i]) + ", " +
                                std::to_string(r[2 * i + 1]) + ") is not within [0, " + std::to_string(k.n_tokens) +
                                "]");
  }
  if (!std::isfinite(a.scale)) fail("scale must be finite");
  for (int64_t b = 0; b < a.n_seqs; ++b)
    if (std::isnan(a.threshold[b])) fail("threshold of sequence " + std::to_string(b) + " is NaN");
  // a NaN lse fails every comparison of the rating, so each candidate would be kept (the rule reads none)
  for (int64_t i = 0; i < a.n_seqs * a.n_q_heads; ++i)
    if (std::isnan(a.lse[i])) fail("lse contains NaN");
  // q's values are checked here, once the shapes are: a pass over a few KB costs less than the
  // caller's check would
  const int64_t n_q = a.n_seqs ? a.n_seqs * a.n_q_heads * a.k[0].dim : 0;
  for (int64_t i = 0; i < n_q; ++i)
    if (!std::isfinite(a.q[i])) fail("q contains NaN or inf");
}

// Runs body(i) for i in [0, n) over the threads of the enclosing parallel region, and waits for
// all of them. Nothing inside may throw: a throw in a parallel region terminates.
template <class Body>
inline void each(int64_t n, Body body) {
#pragma omp for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// The work items of a phase: every unit's chunks and `more` items each, laid end to end.
struct UnitItems {
  std::vector<int64_t> unit, first;  // each item's unit; each unit's first item

  UnitItems(const std::vector<UnitWork>& work, int64_t units, int64_t more) : first(size_t(units + 1), 0) {
    for (int64_t u = 0; u < units; ++u) first[size_t(u + 1)] = first[size_t(u)] + work[size_t(u)].chunks + more;
    unit.resize(size_t(first[size_t(units)]));
    for (int64_t u = 0; u < units; ++u)
      std::fill(unit.begin() + first[size_t(u)], unit.begin() + first[size_t(u + 1)], u);
  }

  int64_t size() const { return int64_t(unit.size()); }
  int64_t index(int64_t i) const { return i - first[size_t(unit[size_t(i)])]; }  // within its unit
};

inline void throw_first_error(const std::vector<UnitWork>& work, int64_t units) {
  for (int64_t u = 0; u < units; ++u)
    if (!work[size_t(u)].error.empty()) throw std::out_of_range(work[size_t(u)].error);
}

inline void host_step(const HostStepArgs& a) {
  check_host_step(a);
  if (a.n_seqs == 0) return;
  const int64_t Hkv = a.k[0].n_heads, G = a.n_q_heads / Hkv, D = a.k[0].dim, units = a.n_seqs * Hkv;
  const int threads = resolve_threads(a.n_threads);
  std::vector<UnitWork>& work = unit_work(units);
  auto unit = [&](int64_t u) { return HostUnit(a, u, work[size_t(u)]); };
  bool split = false;  // whether some unit may take more than one chunk
  for (int64_t b = 0; b < a.n_seqs; ++b) split |= unit_chunks(a, threads, most_candidates(a, b)) > 1;
  if (!split) {  // each unit whole on one thread: no hand-over between phases
    ChunkStates states(2 * units, G, D);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (units > 1 && threads > 1)
    for (int64_t u = 0; u < units; ++u) {
      HostUnit x = unit(u);
      x.gather(threads, false);
      x.score(0);
      x.resolve_lse();
      x.keep(0);
      x.read();
      x.attend(0, states[2 * u]);
      x.attend(1, states[2 * u + 1]);
      x.combine(states, 2 * u);
    }
    return throw_first_error(work, units);
  }
  // Each phase over every unit's chunks, so that all threads have work; the phases hand over at
  // the barriers of one parallel region.
  std::optional<UnitItems> chunks, pieces;
  std::optional<ChunkStates> states;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    each(units, [&](int64_t u) { unit(u).gather(threads, true); });
#pragma omp single
    {
      chunks.emplace(work, units, 0);
      pieces.emplace(work, units, 1);
      states.emplace(pieces->size(), G, D);
    }
    each(chunks->size(), [&](int64_t i) { unit(chunks->unit[size_t(i)]).score(chunks->index(i)); });
    each(units, [&](int64_t u) { unit(u).resolve_lse(); });
    each(chunks->size(), [&](int64_t i) { unit(chunks->unit[size_t(i)]).keep(chunks->index(i)); });
    each(units, [&](int64_t u) { unit(u).read(); });
    each(pieces->size(), [&](int64_t i) { unit(pieces->unit[size_t(i)]).attend(pieces->index(i), (*states)[i]); });
    each(units, [&](int64_t u) { unit(u).combine(*states, pieces->first[size_t(u)]); });
  }
  throw_first_error(work, units);
}

}  // namespace hybridattn
