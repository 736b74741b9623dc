"""The eager backend: plain PyTorch implementations of every op family.

Each public module here is an op family (``pyalign.backends.families()``): its reference
implementation, whose module-level functions are the family's primitives (``PRIMITIVES``) and
whose docstring states the family's contract, which the Triton (pyalign/kernels/) and C++ (csrc/)
kernels implement too. It is the backend that is always available: the fallback when no kernel
backend can run, the one that takes float64 (gradcheck) and empty inputs, and the structure the
kernels are checked against. The independent float64 test oracle lives in the tests
(tests/support.py). All math runs in fp32 whatever the input dtype (fp64 for fp64 inputs). The
backend table imports a family's module on first use; private modules (``_rows``) are helpers.
"""
