// Exact log-sum-exp merge of two partial attention states.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace hybridattn {

// States (o [H, D], lse [H]) over two disjoint key sets merge into the state over their union:
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

}  // namespace hybridattn
