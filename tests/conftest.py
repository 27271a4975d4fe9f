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
