"""`pyalign bench`: microbenchmarks of the fused ops against eager PyTorch, torch.compile, the
floor the hardware allows and (where installed) Liger-Kernel and TRL.

`pyalign bench` and the scripts in benchmarks/ share the cases defined here:

- ``harness``: candidates, timing, peak memory, ratio columns, table/JSON/CSV output;
- ``common``: the pieces cases are built from (one row per available backend, ...);
- ``logprobs``, ``linear_logprobs``, ``kl``, ``preference``, ``kto``, ``policy``, ``weights``: one module
  per op family, each building its ``Case``;
- ``suite``: the cases by name, the shared arguments and the run loop.

Candidates come from the backend table: every backend that can run the op family on the device
is a row, so a new backend shows up without edits here. Each timed call is forward + backward
unless the case says otherwise; inputs are random (logits ~ N(0, 1), labels uniform).

    pyalign bench                       # token_logprobs and linear_token_logprobs at CPU size
    pyalign bench --quick --json out.json
    pyalign bench --cases kl,preference,weights
"""
from pyalign.bench.common import DTYPES
from pyalign.bench.harness import Candidate, Case, Row
from pyalign.bench.kl import kl_case
from pyalign.bench.kto import linear_kto_case
from pyalign.bench.linear_logprobs import linear_logprobs_case
from pyalign.bench.logprobs import logprobs_case
from pyalign.bench.policy import linear_policy_case, policy_case
from pyalign.bench.preference import linear_orpo_case, linear_preference_case, preference_case
from pyalign.bench.suite import (
                                 DEFAULT_CASES,
                                 add_common_arguments,
                                 run_bench,
                                 run_cases,
                                 script_main,
                                 suite_builders,
)
from pyalign.bench.weights import weights_case

__all__ = ["DTYPES", "Candidate", "Case", "Row", "logprobs_case", "linear_logprobs_case", "kl_case",
           "preference_case", "linear_preference_case", "linear_orpo_case", "linear_kto_case",
           "policy_case",
           "linear_policy_case", "weights_case", "DEFAULT_CASES",
           "add_common_arguments", "run_bench", "run_cases", "script_main", "suite_builders"]
