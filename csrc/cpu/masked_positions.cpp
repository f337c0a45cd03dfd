// masked_positions on the CPU: a two-pass parallel compaction. Each thread
// counts the kept labels of its contiguous chunk, an exclusive scan over the
// chunk counts gives every chunk its output offset, then each thread writes
// its positions in increasing order. Positions past the capacity are dropped
// and the tail of the index buffer is zeroed; the count is the true count.
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/masking.h"

namespace fastmlm {

void masked_positions_cpu(const MaskedPositionsArgs& a) {
  int num_chunks = 1;
#ifdef _OPENMP
  // Below this one pass (~1 ns per label) beats waking the thread team.
  if (a.numel >= (1 << 20)) num_chunks = omp_get_max_threads();
#endif
  const int64_t chunk = (a.numel + num_chunks - 1) / num_chunks;
  std::vector<int64_t> chunk_offset(num_chunks + 1, 0);

  // Chunks, not threads, are the unit of work, so the result is the same
  // whatever number of threads OpenMP actually grants.
#pragma omp parallel for schedule(static) if (num_chunks > 1)
  for (int c = 0; c < num_chunks; ++c) {
    const int64_t begin = std::min<int64_t>(a.numel, c * chunk);
    const int64_t end = std::min<int64_t>(a.numel, begin + chunk);
    int64_t kept = 0;
    for (int64_t i = begin; i < end; ++i) kept += is_kept_label(a, i) ? 1 : 0;
    chunk_offset[c + 1] = kept;
  }
  for (int c = 0; c < num_chunks; ++c) chunk_offset[c + 1] += chunk_offset[c];

#pragma omp parallel for schedule(static) if (num_chunks > 1)
  for (int c = 0; c < num_chunks; ++c) {
    const int64_t begin = std::min<int64_t>(a.numel, c * chunk);
    const int64_t end = std::min<int64_t>(a.numel, begin + chunk);
    int64_t out = chunk_offset[c];
    for (int64_t i = begin; i < end && out < a.capacity; ++i) {
      if (is_kept_label(a, i)) a.index[out++] = i;
    }
  }

  const int64_t total = chunk_offset[num_chunks];
  *a.count = total;
  std::fill(a.index + std::min(total, a.capacity), a.index + a.capacity, int64_t{0});
}

}  // namespace fastmlm
