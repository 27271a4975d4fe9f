"""Test set-up shared by every test file.

TRITON_INTERPRET must be in the environment before triton is first imported, so it is set here,
at conftest import, before any test module imports resnet_fused. A GPU run sets
TRITON_INTERPRET=0 itself (benchmarks/gpu_check.sh) so Triton compiles real kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests judge the kernels themselves: with the runtime guard on, a wrong kernel's answer would
# be replaced by the reference's and its test could not fail. tests/test_guard.py turns it on.
os.environ.setdefault("RESNET_FUSED_VERIFY", "off")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and TRITON_INTERPRET unset or 0")


# The GPU run (benchmarks/gpu_check.sh: pytest -m gpu -n 8 --maxfail=50) has a time budget, so
# the tests that tell the most run first: a run cut short has answered the main questions. By
# test function name, with an optional substring of the test id; the first matching rule ranks
# a test, ties keep collection order; unmatched tests run last. Whole models first (few, slow,
# informative), then every op against the reference in fp16/bf16 in both layouts, the training
# units, each Triton config once, the rest.
GPU_ORDER = (
    ("test_converted_resnet50_half_channels_last", ""),  # end-to-end eval, fp16/bf16, triton
    ("test_converted_resnet50_cuda_backend", ""),  # end-to-end eval, cuda (CUTLASS)
    ("test_resnet50_amp_training_steps", ""),  # training steps of a whole model
    ("test_op_matches_reference", "float16"),  # every op vs the reference, fp16 and bf16, NCHW and NHWC
    ("test_unit_matches_fp64", ""),  # training units, fp16/bf16
    ("test_converted_resnet_fp32", ""),
    ("test_op_without_residual", ""),
    ("test_every_config_runs_once", ""),  # autotuning is off in the run: each config once here
    ("test_op_matches_reference", ""),  # fp32
    ("test_unit_fp32_ieee", ""),
)


def gpu_rank(name: str) -> int:
    """Where a test with id ``name`` (``function[params]``) runs in the GPU run, by GPU_ORDER."""
    function, _, params = name.partition("[")
    for rank, (wanted, part) in enumerate(GPU_ORDER):
        if function == wanted and part in params:
            return rank
    return len(GPU_ORDER)


def _selects_gpu_tests(config) -> bool:
    markexpr = config.getoption("markexpr", "") or ""
    return "gpu" in markexpr and "not gpu" not in markexpr


def pytest_collection_modifyitems(session, config, items):
    # Only for a GPU run (-m gpu): the CPU run's order stays the collection order.
    if _selects_gpu_tests(config):
        items.sort(key=lambda item: gpu_rank(item.name))


def pytest_runtest_setup(item):
    # Decided per test at run time, never at import or collection: no GPU query before then.
    if item.get_closest_marker("gpu") is not None:
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("GPU test: run with TRITON_INTERPRET=0 so Triton compiles for the device")
        if not torch.cuda.is_available():
            pytest.skip("GPU test: no CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
