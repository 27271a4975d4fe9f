"""The fused ops' pieces, one home each: ``shapes`` (output shape and layout rules every
backend follows), ``fakes`` (the shape-only kernels torch.compile traces with), ``reference``
(the unfused spec), ``aten`` (ATen's convolution, as the C++ and reference training units
use it), ``extension`` (the compiled C++ ops as a backend) and ``triton/`` (the Triton
kernels). Nothing here imports Triton except ``triton/``."""
