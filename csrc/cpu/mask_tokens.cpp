// mask_tokens on the CPU (docs/ops.md): OpenMP over rows. Every decision is a
// pure function of (seed, row, column), so rows are independent and the
// result does not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/masking.h"

namespace fastmlm {

namespace {

// Bernoulli budget: a position is selected when eligible and its select hash
// falls under the threshold; no cross-position state.
void mask_row_bernoulli(const MaskTokensArgs& a, uint32_t select_key, uint32_t action_key,
                        uint32_t token_key, int64_t row) {
  for (int64_t col = 0; col < a.length; ++col) {
    bool selected = false;
    if (is_eligible(a, row, col)) {
      const uint32_t h = hash_counter(select_key, static_cast<uint32_t>(row), static_cast<uint32_t>(col));
      selected = hash_below(h, a.select_threshold);
    }
    write_masked(a, action_key, token_key, row, col, selected);
  }
}

// Exact budget: the k eligible positions with the smallest (hash, column)
// keys. nth_element partitions them in O(length); the key is unique because
// the column is part of it, so the selected set is unambiguous.
void mask_row_exact(const MaskTokensArgs& a, uint32_t select_key, uint32_t action_key,
                    uint32_t token_key, int64_t row, std::vector<std::pair<uint32_t, int64_t>>& keys,
                    std::vector<uint8_t>& selected) {
  keys.clear();
  for (int64_t col = 0; col < a.length; ++col) {
    if (is_eligible(a, row, col)) {
      keys.emplace_back(hash_counter(select_key, static_cast<uint32_t>(row), static_cast<uint32_t>(col)), col);
    }
  }
  const int64_t n_eligible = static_cast<int64_t>(keys.size());
  const int64_t k = exact_budget(a.mlm_probability, n_eligible);
  std::fill(selected.begin(), selected.end(), 0);
  if (k > 0) {
    if (k < n_eligible) std::nth_element(keys.begin(), keys.begin() + k, keys.end());
    for (int64_t i = 0; i < k; ++i) selected[keys[i].second] = 1;
  }
  for (int64_t col = 0; col < a.length; ++col) {
    write_masked(a, action_key, token_key, row, col, selected[col] != 0);
  }
}

}  // namespace

void mask_tokens_cpu(const MaskTokensArgs& a) {
  const uint32_t select_key = hash_key(a.seed_lo, a.seed_hi, kStreamSelect);
  const uint32_t action_key = hash_key(a.seed_lo, a.seed_hi, kStreamAction);
  const uint32_t token_key = hash_key(a.seed_lo, a.seed_hi, kStreamToken);
  // One thread masks a 32 x 512 batch in ~0.1-0.2 ms; waking a thread team
  // costs tens of microseconds (milliseconds on a busy machine), so threads
  // only pay off for much larger inputs.
  const bool parallel = a.batch > 1 && a.batch * a.length >= (1 << 18);
#pragma omp parallel if (parallel)
  {
    std::vector<std::pair<uint32_t, int64_t>> keys;
    std::vector<uint8_t> selected;
    if (a.exact) {
      keys.reserve(a.length);
      selected.resize(a.length);
    }
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a.batch; ++row) {
      if (a.exact) {
        mask_row_exact(a, select_key, action_key, token_key, row, keys, selected);
      } else {
        mask_row_bernoulli(a, select_key, action_key, token_key, row);
      }
    }
  }
}

}  // namespace fastmlm
