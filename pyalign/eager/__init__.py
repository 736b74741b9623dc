"""The eager backend: plain PyTorch implementations of every op family.

It is the backend that is always available: the fallback when no kernel backend can run, the one
that takes float64 (gradcheck) and empty inputs, and the structure the Triton and C++ kernels are
checked against. The independent float64 test oracle lives in the tests (tests/support.py).

One module per op family, each the implementation object of its family (module-level functions
named by the primitive contract in pyalign/backends.py), like the Triton modules in pyalign/kernels/:
``logprobs``, ``linear_logprobs`` (also the chunked linear path of the cpu backend), ``kl``,
``preference`` and ``weights``. All math runs in fp32 whatever the input dtype (fp64 for fp64
inputs). The backend table imports a family's module on first use.
"""
