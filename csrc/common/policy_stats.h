// The per-row reduction pieces the policy kernels write, in the order of
// pyalign.losses.POLICY_ROW_STATS. The extension exports the count (pyalign_C::policy_num_stats),
// which pyalign/_cpp_backend.py checks against len(POLICY_ROW_STATS) when it loads the ops.
#pragma once

namespace pyalign {

constexpr int kPolicyNumStats = 12;

}  // namespace pyalign
