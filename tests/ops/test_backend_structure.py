"""How the package is wired to its backends: only pyalign/backends.py chooses an implementation
(a scan of the package's source), and a new op family plugs in the way CONTRIBUTING.md's "add an
op family" checklist says, one registration per backend: its example family ``toy`` (x -> 2x + 1)
written as temporary modules dispatches on every backend that registers it."""
import ast
import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign import _triton_backend, backends
from support import DEVICE, ON_CPU

PACKAGE = Path(pyalign.__file__).resolve().parent

# Comparisons with a backend or device name that choose no op implementation: (file, the
# comparison as ast.unparse writes it) -> why it is not a backend choice. A file of pyalign/bench/
# is allowed whole: benchmarks pick which candidates to time, label and synchronise them, and name
# the backend each candidate runs; they never choose one for an op.
ALLOWED = {
    ("_build.py", "kind == 'cuda'"): "which extension to build (nvcc), not which one runs",
    ("_workspace.py", "device.type != 'cpu'"): "only CPU buffers are cached (CUDA has its "
                                               "caching allocator): memory, not an implementation",
    ("_workspace.py", "flat.device.type != 'cpu'"): "the same cache rule when a buffer comes back",
    ("cli/train.py", "dist_ctx.device.type == 'cpu'"): "the training run's device placement",
    ("integrations/callbacks.py", "p.device.type == 'cuda'"): "which GPUs a model occupies",
    ("study/point.py", "trainer.dist.device.type == 'cpu'"): "the thread rule of a study point's "
                                                              "device",
    ("integrations/packing.py", "implementation == 'eager'"): "transformers' attention "
                                                              "implementation, not pyalign's",
    ("trainers/checkpoint.py", "'cuda' in state"): "whether a checkpoint holds CUDA RNG state",
    ("trainers/distributed.py", "os.environ.get('PYALIGN_DEVICE', '') != 'cpu'"): "the device a "
                                                                                  "rank trains on",
    ("trainers/distributed.py", "dist_ctx.device.type == 'cuda'"): "DDP's device_ids",
}
ALLOWED_FOLDERS = ("bench/",)
NAMES = set(backends.CHOICES)


def _strings(node) -> set:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(element) for element in node.elts)) if node.elts else set()
    return set()


def backend_choices(path: Path) -> list[str]:
    """The comparisons with a backend or device name (and the ``.is_cuda`` reads) of a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(
                _strings(operand) & NAMES for operand in (node.left, *node.comparators)):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and node.attr == "is_cuda":
            found.append(ast.unparse(node))
    return found


def test_only_backends_py_chooses_an_implementation():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "backends.py" or relative.startswith(ALLOWED_FOLDERS):
            continue
        offending += [f"pyalign/{relative}: {found}" for found in backend_choices(path)
                      if (relative, found) not in ALLOWED]
    assert not offending, ("backend choices outside pyalign/backends.py (ask backends: "
                           "resolved_name / implementation / a capability hook):\n"
                           + "\n".join(offending))


def test_the_scan_sees_a_backend_choice(tmp_path):
    source = tmp_path / "guess.py"
    source.write_text("def f(backend, x):\n    fused = backend == 'triton' or x.is_cuda\n"
                      "    return backend in ('auto', 'eager') or x.device.type == 'cuda'\n")
    assert backend_choices(source) == ["backend == 'triton'", "x.is_cuda",
                                       "backend in ('auto', 'eager')", "x.device.type == 'cuda'"]


# ------------------------------------------------------------------- the checklist's example
# The modules CONTRIBUTING.md shows for a family "toy": the eager reference (the family itself),
# a Triton kernel module, and a C++ backend's adapter factory.
EAGER_TOY = '''
"""Eager toy: the reference implementation of the ``toy`` family.

forward(x) -> 2x + 1, in x's dtype.
"""
PRIMITIVES = ("forward",)
RAN = []


def forward(x):
    RAN.append("eager")
    return x * 2 + 1
'''
TRITON_TOY = '''
"""Triton toy: out = 2x + 1, one read and one write of x; grid (cdiv(n, BLOCK),)."""
import torch
import triton
import triton.language as tl

BLOCK = 128
RAN = []


@triton.jit
def toy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, x * 2 + 1, mask=offs < n)


def forward(x):
    RAN.append("triton")
    flat = x.contiguous().reshape(-1)
    out = torch.empty_like(flat)
    toy_kernel[(triton.cdiv(flat.numel(), BLOCK),)](flat, out, flat.numel(), BLOCK=BLOCK)
    return out.view(x.shape)


def compile_configs():
    return [dict(name="toy", kernel=toy_kernel, signature={"x_ptr": "*fp32", "out_ptr": "*fp32",
                                                           "n": "i32"},
                 constexprs={"BLOCK": BLOCK}, aligned=("x_ptr", "out_ptr"), num_warps=4,
                 label="fp32")]
'''
CPP_TOY = '''
from types import SimpleNamespace

from pyalign._cpp_backend import implements

RAN = []


@implements("cpu", "toy")
def _make_toy(ops):
    def forward(x):  # a real adapter calls its ops.toy_forward here
        RAN.append("cpu")
        return x * 2 + 1
    return SimpleNamespace(forward=forward)
'''


@pytest.fixture
def toy_family(tmp_path, monkeypatch, restored_table):
    """The toy family's modules on the package paths, registered as importing pyalign does;
    the backend table and the modules are restored afterwards."""
    monkeypatch.delenv("PYALIGN_BACKEND", raising=False)
    for folder, source in (("eager", EAGER_TOY), ("kernels", TRITON_TOY), ("adapters", CPP_TOY)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / ("toy_cpp.py" if folder == "adapters" else "toy.py")).write_text(
            textwrap.dedent(source))
    monkeypatch.setattr(importlib.import_module("pyalign.eager"), "__path__",
                        [*importlib.import_module("pyalign.eager").__path__, str(tmp_path / "eager")])
    monkeypatch.setattr(importlib.import_module("pyalign.kernels"), "__path__",
                        [*importlib.import_module("pyalign.kernels").__path__, str(tmp_path / "kernels")])
    monkeypatch.syspath_prepend(str(tmp_path / "adapters"))
    _triton_backend.register_kernels()  # what importing pyalign._triton_backend does
    importlib.import_module("toy_cpp")  # the adapter module, as pyalign/_cpp_backend.py
    yield
    for name in ("pyalign.eager.toy", "pyalign.kernels.toy", "toy_cpp"):
        sys.modules.pop(name, None)


def _runs(backend: str) -> bool:
    """Whether ``backend`` runs a family on the test device (its logprobs kernels as witness)."""
    return backends.status("logprobs", backend, DEVICE.type)[0]


def test_an_op_family_added_as_the_checklist_says_dispatches_everywhere(toy_family):
    assert "toy" in backends.families()
    assert backends.primitives("toy") == ("forward",)
    expected = {"eager"} | {name for name in ("triton", "cpu") if _runs(name)}
    assert set(backends.available("toy", DEVICE.type)) == expected
    x = torch.randn(300)
    for name in sorted(expected):
        torch.testing.assert_close(backends.implementation("toy", name, x).forward(x), x * 2 + 1)
    ran = (sys.modules["pyalign.eager.toy"].RAN + sys.modules["toy_cpp"].RAN
           + getattr(sys.modules.get("pyalign.kernels.toy"), "RAN", []))
    assert sorted(ran) == sorted(expected), ran
    first = next(name for name in backends.AUTO_ORDER[DEVICE.type] if name in expected)
    assert backends.resolved_name("toy", "auto", x) == first
    assert backends.resolved_name("toy", "auto", x.double()) == "eager"
    if ON_CPU:
        assert "pyalign.kernels.toy" in _triton_backend.kernel_modules().values()


# ------------------------------------------------------------- the ops ask, they do not guess
FIRST = backends.AUTO_ORDER[DEVICE.type][0]


def _recording_head(keeps: bool, seen: list):
    """The eager head, recording the keep_rows each forward is given, keeping logits or not."""
    from types import SimpleNamespace

    eager = importlib.import_module("pyalign.eager.linear_logprobs")

    def forward(*args):
        seen.append(args[-1])
        return eager.forward(*args)
    return SimpleNamespace(forward=forward, backward=eager.backward, KEEPS_LOGITS=keeps)


@pytest.mark.parametrize("forced", [None, "eager"])
def test_memory_budget_goes_to_the_head_that_runs_if_it_keeps_logits(forced, monkeypatch,
                                                                     restored_table):
    """linear_token_logprobs keeps logits only for the head the table resolves, and only if it
    keeps them (KEEPS_LOGITS): the first backend of the device's order keeping none gets 0 rows;
    forced to eager (PYALIGN_BACKEND), eager's head gets the budget's rows."""
    if forced:
        monkeypatch.setenv("PYALIGN_BACKEND", forced)
    else:
        monkeypatch.delenv("PYALIGN_BACKEND", raising=False)
    first_seen, eager_seen = [], []
    backends.register("linear_logprobs", FIRST, lambda: _recording_head(False, first_seen))
    backends.register("linear_logprobs", "eager", lambda: _recording_head(True, eager_seen))
    hidden = torch.randn(6, 8, requires_grad=True)
    weight, labels = torch.randn(30, 8), torch.randint(0, 30, (6,))
    pyalign.linear_token_logprobs(hidden, weight, labels, memory_budget=1 << 20).sum().backward()
    assert (first_seen, eager_seen) == (([], [6]) if forced else ([0], []))
