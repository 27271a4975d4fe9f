"""The degradation demo's smoke path: ``python examples/degradation.py --quick``."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

# The demo is an example script, not part of the package: loaded from its file. scikit-learn and
# matplotlib are test dependencies: no importorskip, a missing one fails the test.
_SPEC = importlib.util.spec_from_file_location(
    "degradation", Path(__file__).resolve().parents[2] / "examples" / "degradation.py")
degradation = importlib.util.module_from_spec(_SPEC)
sys.modules["degradation"] = degradation  # dataclasses look their module up there
_SPEC.loader.exec_module(degradation)


def test_quick_run_trains_every_net_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "degradation.png"
    results = degradation.main(["--quick", "--out", str(out), "--no-progress"])
    assert list(results) == [label for label, *_ in degradation.RUNS]
    for h in results.values():
        assert h.losses and all(math.isfinite(v) for v in h.losses), h.label
        assert 0.0 <= h.train_error <= 1.0 and 0.0 <= h.test_error <= 1.0, h.label
        assert len(h.epoch_errors) == degradation.QUICK.epochs
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Fused and unfused ResNet-20: same weights, same batches, the same loss curve.
    assert degradation.max_loss_difference(results) < 1e-4
    printed = capsys.readouterr().out
    assert "ResNet-56" in printed and "fused vs unfused" in printed
