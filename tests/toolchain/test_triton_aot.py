"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), for every
configuration its launch wrappers can pick, with zero register spills; the log-probs forward
kernel reads the logits with vector loads."""
import importlib

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from pyalign import compile_check  # noqa: E402


@pytest.fixture(scope="module")
def table():
    # one subprocess (without TRITON_INTERPRET), compilations in parallel, Triton's cache reused
    return compile_check.compile_table(ccs=(80, 90))


def test_every_configuration_compiles_for_both_targets(table):
    failed = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['error']}" for r in table
              if r["error"] is not None]
    assert not failed, "\n".join(failed)
    expected = sum(len(importlib.import_module(name).compile_configs())
                   for name in compile_check.KERNEL_MODULES)
    assert len(table) == 2 * expected
    targets = {}
    for row in table:
        targets.setdefault((row["kernel"], row["config"]), set()).add(row["target"])
    assert all(t == {"sm_80", "sm_90a"} for t in targets.values()), targets
    kernels = {row["kernel"] for row in table}
    assert {"logprobs_forward", "logprobs_backward", "kl_forward", "kl_backward",
            "preference_forward", "preference_backward", "sequence_preference_forward",
            "sequence_preference_backward", "linear_logprobs_forward",
            "linear_logprobs_backward", "policy_forward", "policy_backward"} <= kernels


def test_no_register_spills(table):
    spilled = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['spill_bytes']} bytes"
               for r in table if r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)
    assert all(r["registers"] and 0 < r["registers"] <= 255 for r in table)


def test_logprobs_forward_uses_vector_loads(table):
    rows = [r for r in table if r["kernel"] == "logprobs_forward"]
    assert rows
    scalar = [f"{r['config']} {r['target']}" for r in rows if r["vector_load_width"] < 2]
    assert not scalar, f"scalar global loads in logprobs_forward: {scalar}"


def test_print_compile_table_reports_every_row(table, capsys):
    compile_check._print_rows(table, None)
    out = capsys.readouterr().out
    assert f"{len(table)} compilations, 0 failed, 0 with spills" in out
