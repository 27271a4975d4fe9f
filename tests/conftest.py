"""Test set-up shared by every test file, and the ``backend`` parametrization.

TRITON_INTERPRET must be in the environment before triton is first imported, so it is set here,
at conftest import, before any test module imports resnet_fused. A GPU run sets
TRITON_INTERPRET=0 itself (benchmarks/gpu_check.sh) so Triton compiles real kernels.

A test that takes a ``backend`` argument runs once per record of resnet_fused.backends.REGISTRY
that can run CPU tensors here: ``triton`` under the interpreter, ``cpu`` when the extension is
built; the ``reference`` (the oracle) only when asked. A test that also takes ``device`` runs
on CUDA tensors too, for each fused backend whose record accepts them in this build; those
cases are marked ``gpu``. Whether a record runs somewhere is its own ``runs_on``, which reads
the environment and the build, never the GPU: no device is queried at collection.

Per test, ``@pytest.mark.backends("cpu", "reference")`` narrows the backends to those named
(``reference=True`` adds the reference to the default set, ``devices=("cuda",)`` keeps only the
GPU cases of a test that takes ``device``), and
``@pytest.mark.grid(argnames, rows)`` adds a grid from cases.py whose rows depend on the backend
and device: ``rows(backend, device)`` returns ``(id, values)`` pairs.
"""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests judge the kernels themselves: with the runtime guard on, a wrong kernel's answer would
# be replaced by the reference's and its test could not fail. tests/test_guard.py turns it on.
os.environ.setdefault("RESNET_FUSED_VERIFY", "off")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and TRITON_INTERPRET unset or 0")
    config.addinivalue_line("markers", "backends(*names, reference=False, devices=None): what a `backend` test runs on")
    config.addinivalue_line("markers", "grid(argnames, rows): per-backend grid rows, rows(backend, device)")


# The GPU run (benchmarks/gpu_check.sh: pytest -m gpu -n 8 --maxfail=50) has a time budget, so
# the tests that tell the most run first: a run cut short has answered the main questions. By
# test function name, with an optional regular expression searched in the test id's parameters;
# the first matching rule ranks a test, ties keep collection order; unmatched tests run last.
# Whole models first (few, slow, informative), then every op against the reference in fp16/bf16
# in both layouts, the training units, each Triton config once, the rest.
GPU_ORDER = (
    ("test_converted_resnet50_half_channels_last", ""),  # end-to-end eval, fp16/bf16, triton
    ("test_converted_resnet50_cuda_backend", ""),  # end-to-end eval, cuda (CUTLASS)
    ("test_resnet50_amp_training_steps", ""),  # training steps of a whole model
    # every op vs the reference, fp16 and bf16, NCHW and NHWC, with and without residual
    ("test_matches_reference", "-(fp16|bf16)-"),
    ("test_unit_matches_fp64", ""),  # training units, fp16/bf16
    ("test_converted_resnet_fp32", ""),
    ("test_every_config_runs_once", ""),  # autotuning is off in the run: each config once here
    ("test_every_cutlass_tile_runs_and_matches", ""),  # each CUTLASS kernel once
    ("test_matches_reference", ""),  # fp32
    ("test_unit_fp32_ieee", ""),
)


def gpu_rank(name: str) -> int:
    """Where a test with id ``name`` (``function[params]``) runs in the GPU run, by GPU_ORDER."""
    function, _, params = name.partition("[")
    for rank, (wanted, part) in enumerate(GPU_ORDER):
        if function == wanted and re.search(part, params):
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


@pytest.fixture(autouse=True)
def _ieee_fp32(request):
    """On the GPU, fp32 references must not silently use TF32; tests that want TF32 turn it on."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def backend_targets(names=(), reference=False, devices=("cpu",)):
    """``(backend, device)`` pairs from the registry, in its order (fastest first)."""
    from resnet_fused.backends import REGISTRY

    targets = []
    for name, record in REGISTRY.items():
        if names and name not in names:
            continue
        if record.is_reference and not (reference or name in names):
            continue
        for device in devices:
            if device == "cuda" and record.is_reference:
                continue  # the oracle is checked on the CPU
            if record.runs_on(torch.device(device)):
                targets.append((name, device))
    return targets


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0]
        if "backend" in ([n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else argnames):
            return  # parametrized by hand
    chosen = metafunc.definition.get_closest_marker("backends")
    names = chosen.args if chosen else ()
    reference = chosen.kwargs.get("reference", False) if chosen else False
    with_device = "device" in metafunc.fixturenames
    devices = ("cpu", "cuda") if with_device else ("cpu",)
    if chosen and "devices" in chosen.kwargs:
        devices = tuple(d for d in chosen.kwargs["devices"] if with_device or d == "cpu")
    grid = metafunc.definition.get_closest_marker("grid")
    grid_names, rows = grid.args if grid else ((), None)
    if isinstance(grid_names, str):
        grid_names = tuple(name.strip() for name in grid_names.split(","))

    params = []
    for name, device in backend_targets(names, reference, devices):
        target_id = name if device == "cpu" else f"{name}-gpu"
        marks = (pytest.mark.gpu,) if device == "cuda" else ()
        head = (name, device) if with_device else (name,)
        if rows is None:
            params.append(pytest.param(*head, id=target_id, marks=marks))
        else:
            for row_id, values in rows(name, device):
                params.append(pytest.param(*head, *values, id=f"{target_id}-{row_id}", marks=marks))
    argnames = ("backend", "device")[: 2 if with_device else 1] + tuple(grid_names)
    metafunc.parametrize(argnames, params)
