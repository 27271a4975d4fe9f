"""The model-zoo check: ``convert`` against the original on torchvision and timm architectures.

App code (nothing in the library imports it; torchvision and timm are imported inside the
functions). ``check_model(name)`` builds one architecture with random weights and random
BatchNorm statistics, converts it and returns a row: eval outputs at two input sizes, the
state_dict, exceptions, how many BatchNorm computations stay unfused and why, and one training
step against a float64 copy. ``ZOO_SUBSET`` is the part CI runs (tests/zoo/test_zoo.py);
``full_sweep()`` lists every family. ``resnet-fused zoo [--full] [NAME ...]`` writes the rows
as CSV.

Names are ``torchvision:<builder>`` or ``timm:<architecture>``.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections import Counter

import torch
from torch import nn

from ..convert import convert
from ..nn import FOLDED
from ..norm_act import FusedBatchNormAct2d
from . import pieces

# Eval outputs are judged against a float64 copy of the original: the fused model's relative
# error (max |a - e| / max |e|) may be TRAIN_FACTOR x that of an fp32 original, and always
# EVAL_TOLERANCE. A deep network with random BatchNorm statistics can be chaotic in fp32: the
# original repvgg_d2se lands 0.9 from its own float64 copy at 32 px, so fp32 against fp32 said
# "wrong" where the fused model was exactly as good. "An fp32 original" is the worse of two:
# the original on the input, and on the input with one rounding error per element (x(1 + eps r));
# in maxvit_rmlp_base at 224 px those two land 5.6e-5 and 3.6e-4 from float64 on one draw, so
# either alone understates how far an equally good fp32 computation falls. The median over
# EVAL_DRAWS inputs at the first size (SECOND_SIZE_DRAWS at the second) decides: one draw can
# flip a ReLU mask.
EVAL_TOLERANCE = 1e-4
EVAL_DRAWS = 3
SECOND_SIZE_DRAWS = 2
EVAL_DRAW_CAP = 10.0  # no single draw may exceed this ratio (inf and NaN mismatches included)
CHAOTIC = 1e-2  # an fp32 original this far from float64 bounds nothing: judged in float64 instead
# A fused training step may be this many times further from float64 than the original's, on
# average over its tensors (loss, gradients, buffers), and no one tensor TRAIN_TENSOR_CAP times.
TRAIN_FACTOR = 2.0
TRAIN_TENSOR_CAP = 20.0
# Input sides tried in turn until the original model accepts one (the second size checked is
# the first accepted plus SECOND_SIZE_STEP).
SIZES = (32, 64, 96, 128, 224, 256, 299)
SECOND_SIZE_STEP = 16
# The training step: the fp32 original and the fp32 converted model, each against a float64
# copy of the original that takes the pieces the fp32 run took (bench/pieces.py: ReLU masks and
# max pool picks; without them a deep network's fp32 runs each flip a few masks against float64,
# at different places, and the ratio of their errors swung from 0.01 to 10000 between inputs),
# over TRAIN_INPUTS inputs, at the first accepted size but at least TRAIN_MIN_SIZE. At 32x32 a
# stride-32 stage has 1x1 maps and its training-mode BatchNorms normalise 8 values per channel,
# ill-conditioned enough that fp32 rounding anywhere moves the step; batch 8 at 64x64 gives those
# stages 32 values. Models that need 128 pixels or more train with batch 2 (a stride-32 stage
# then has at least 4x4 maps). A training-mode BatchNorm that sees fewer than MIN_BN_VALUES
# values per channel is too ill-conditioned to compare float32 with float64 (with 2 values the
# fp32 original itself is off by ~0.4): such a step is not compared.
TRAIN_MIN_SIZE = 64
TRAIN_BATCH = 8
TRAIN_BATCH_LARGE = 2
TRAIN_INPUTS = 3
MIN_BN_VALUES = 8

# 25 architectures that cover the families convert treats differently, chosen from the full
# sweep: eval at two sizes and a training step take ~155 s of one core (tests/zoo runs them
# single-threaded: on a shared 2-core machine OpenMP threads waiting for each other cost 10x).
ZOO_SUBSET = [
    # torchvision: known blocks (BasicBlock, grouped Bottleneck), chains in Sequential
    # subclasses (Conv2dNormActivation), generic residual blocks, concatenating and densely
    # connected networks, train-only auxiliary heads, a segmentation and a detection model.
    "torchvision:resnet18", "torchvision:resnext50_32x4d", "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x0_5", "torchvision:regnet_x_400mf",
    "torchvision:densenet121", "torchvision:googlenet", "torchvision:efficientnet_b0",
    "torchvision:lraspp_mobilenet_v3_large", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
    # timm: blocks with optional arguments (DLA), multi-branch residuals (HRNet, Res2Net,
    # ResNeSt), timm's ResNet variants (tiered stem, blur pool, avg-down shortcut), SE and
    # selective-kernel blocks, GhostNet modules, BatchNormAct2d with ReLU/SiLU/Hardswish, BatchNorm1d heads.
    "timm:dla34", "timm:hrnet_w18_small", "timm:res2next50", "timm:resnest14d", "timm:resnet10t",
    "timm:resnetblur18", "timm:resnet18d", "timm:seresnet18", "timm:skresnet18", "timm:repghostnet_050",
    "timm:ghostnet_050", "timm:cs3darknet_focus_s", "timm:rexnet_100", "timm:levit_conv_128s",
]


def is_batch_norm(module: nn.Module) -> bool:
    """BatchNorm of any kind: torch's, subclasses (timm's BatchNormAct2d), frozen variants."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__


def randomize_batch_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-default running stats and affine parameters, so a fused path
    that ignored any of them could not pass (the 0/1 defaults hide a skipped normalisation)."""
    with torch.no_grad():
        for module in model.modules():
            if not is_batch_norm(module):
                continue
            mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
            # Frozen norms (torchvision's, timm's) have no num_features.
            n = mean.shape[0] if isinstance(mean, torch.Tensor) else module.num_features
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                mean.copy_(torch.randn(n, generator=generator) * 0.3)
                var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, torch.Tensor):
                weight.copy_(torch.rand(n, generator=generator) + 0.5)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(n, generator=generator) * 0.3)
    return model


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| in float64; inf for a shape mismatch or a NaN the other lacks."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("inf")
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def tensors(output) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensors, tuples, lists, dicts, namedtuples), in order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else [output.double()]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in tensors(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors(item)]
    return []


def _output_error(actual, expected) -> float:
    a, e = tensors(actual), tensors(expected)
    if len(a) != len(e):
        return float("inf")
    return max((max_rel_error(x, y) for x, y in zip(a, e)), default=0.0)


def problems(row: dict) -> list[str]:
    """Why a row is not an agreement (empty when it is): what the zoo test asserts and the CLI counts."""
    found = [row["error"]] if row["error"] else []
    if not row["equal_eval"]:
        found.append(f"eval output: {row['eval_ratio']} x the allowed error against float64 "
                     f"(relative error {row['rel_error']} against the fp32 original)")
    if row["equal_second_size"] is False:
        found.append(f"eval output at the second size beyond the allowed error against float64 "
                     f"(relative error {row['rel_error_second']} against the fp32 original)")
    if not row["state_dict_unchanged"]:
        found.append("state_dict changed")
    if row["equal_train"] is False:
        found.append(f"training step: {row['train_ratio']} x the allowed error against float64")
    return found


# --- the architectures ---------------------------------------------------------------------------

def _torchvision_kind(builder: str) -> str:
    import torchvision

    for kind in ("detection", "segmentation"):
        if builder in torchvision.models.list_models(module=getattr(torchvision.models, kind)):
            return kind
    return "classification"


def build(name: str, device: str | None = None) -> tuple[nn.Module, str]:
    """(model with random weights, its kind: classification/segmentation/detection)."""
    source, _, arch = name.partition(":")
    if source == "timm":
        import timm

        with torch.device(device) if device else contextlib.nullcontext():
            # No dropout or drop-path: timm applies some functionally (F.dropout(x,
            # training=self.training)), where no module can be put in eval mode, and the
            # training check compares three models that would draw their own masks.
            for kwargs in ({"drop_rate": 0.0, "drop_path_rate": 0.0}, {"drop_rate": 0.0}, {}):
                try:
                    return timm.create_model(arch, pretrained=False, **kwargs), "classification"
                except TypeError:  # an architecture without these arguments
                    if not kwargs:
                        raise
    if source == "torchvision":
        import torchvision

        kind = _torchvision_kind(arch)
        kwargs = {"weights": None}
        if kind != "classification":
            kwargs["weights_backbone"] = None  # the default downloads ImageNet weights
        if kind == "detection" and not arch.startswith("ssd"):
            kwargs.update(min_size=128, max_size=128)  # the transform resizes every image to this
        with torch.device(device) if device else contextlib.nullcontext():
            return torchvision.models.get_model(arch, **kwargs), kind
    raise ValueError(f"model names are 'torchvision:<builder>' or 'timm:<architecture>', got {name!r}")


def _input(kind: str, batch: int, size: int, generator: torch.Generator):
    x = torch.randn(batch, 3, size, size, generator=generator)
    return list(x) if kind == "detection" else x  # detectors take a list of images


def _run(model: nn.Module, x):
    """The model's output, or the exception it raised."""
    try:
        return model(x), None
    except Exception as error:  # noqa: BLE001  (any exception is a result here)
        return None, error


def _text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


# --- the check -----------------------------------------------------------------------------------

def check_model(name: str, backend: str = "cpu", train: bool = True, seed: int = 0,
                train_backend: str | None = None) -> dict:
    """One row: does ``convert(model, backend)`` compute what the model computes? The training
    step runs on ``train_backend`` (default: ``backend``); ``"reference"``, whose training unit
    computes what eager PyTorch computes, judges the rewrite alone.

    Keys: model, equal_eval, eval_ratio (the median over EVAL_DRAWS inputs of the fused error
    against float64 over the allowed error: at most 1 agrees), rel_error (the first draw against
    the fp32 original, for reading), eval_note (how a chaotic model was judged), size, equal_second_size, rel_error_second, state_dict_unchanged,
    error (what the converted model raised that the original did not, or a failure of the check
    itself), bn_total / bn_unfused (BatchNorm module calls in one eval forward of the original /
    of the converted model, folded ones not counted), fused_fraction, reasons (the report's
    reasons for what stayed unfused), equal_train, train_ratio, train_note, seconds, cpu_seconds.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    row = {"model": name, "equal_eval": False, "eval_ratio": None, "eval_note": None, "rel_error": None, "size": None, "equal_second_size": None,
           "rel_error_second": None, "state_dict_unchanged": False, "error": None, "bn_total": 0, "bn_unfused": 0,
           "fused_fraction": None, "reasons": {}, "equal_train": None, "train_ratio": None, "train_note": None}
    try:
        _check(name, backend, train, seed, train_backend or backend, row)
    except Exception as error:  # noqa: BLE001  (a row says what went wrong; the sweep goes on)
        row["error"] = row["error"] or f"check failed: {_text(error)}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["cpu_seconds"] = round(time.process_time() - cpu_start, 2)  # wall time on a shared machine misleads
    return row


def _check(name: str, backend: str, train: bool, seed: int, train_backend: str, row: dict) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model, kind = build(name)
    model = randomize_batch_norms(model, generator).eval()
    size = row["size"] = _first_size(model, kind)
    try:
        converted, report = convert(model, backend=backend, report=True)
    except Exception as error:  # noqa: BLE001
        row["error"] = f"convert: {_text(error)}"
        return
    row["state_dict_unchanged"] = _same_state(model, converted)
    leaked = _proxies_left(converted)
    if leaked:
        row["error"] = f"convert left torch.fx Proxies in {', '.join(leaked[:3])}"
        return
    row["reasons"] = dict(Counter(reason for _, reason in report.unfused).most_common())

    exact_model = _float64_copy(model)
    inputs = [_input(kind, 1, size, torch.Generator().manual_seed(seed + 1 + 10 * i)) for i in range(EVAL_DRAWS)]
    with torch.no_grad():
        with _counting_batch_norms(model, ()) as total:
            _run(model, inputs[0])
        with _counting_batch_norms(converted, (*FOLDED, FusedBatchNormAct2d)) as unfused:
            _run(converted, inputs[0])
    row["bn_total"], row["bn_unfused"] = total[0], unfused[0]
    row["fused_fraction"] = round(1 - unfused[0] / total[0], 4) if total[0] else None
    row["eval_ratio"], row["rel_error"], error, row["eval_note"] = _eval_ratio(model, converted, exact_model, inputs)
    if error is not None:
        row["error"] = f"eval: {_text(error)}"
        return
    row["equal_eval"] = row["eval_ratio"] <= 1.0

    # A second size: a forward whose code depends on shapes must still agree (or fail alike).
    # It runs on a deep copy, which regenerates the rewritten forwards (as a load does).
    second = size + SECOND_SIZE_STEP
    inputs = [_input(kind, 2, second, torch.Generator().manual_seed(seed + 2 + 20 * i)) for i in range(SECOND_SIZE_DRAWS)]
    with torch.no_grad():
        _, original_error = _run(model, inputs[0])
    if original_error is None:
        ratio, row["rel_error_second"], error, note = _eval_ratio(model, copy.deepcopy(converted), exact_model, inputs)
        row["eval_note"] = row["eval_note"] or note
        if error is not None:
            row["error"] = f"eval at {second}: {_text(error)}"
        else:
            row["equal_second_size"] = ratio <= 1.0
    row["state_dict_unchanged"] = row["state_dict_unchanged"] and _same_state(model, converted)

    if train:
        _check_training(model, converted if train_backend == backend else None, kind, size, train_backend, seed, row)


def _float64_copy(model: nn.Module) -> nn.Module | None:
    """The original in float64 (the exact answer's stand-in), or None if it cannot run there."""
    try:
        return copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001  (a model that cannot be copied or cast is judged without it)
        return None


def _double(x):
    return [t.double() for t in x] if isinstance(x, list) else x.double()


def _one_rounding(x):
    """``x`` with one fp32 rounding error per element, x(1 + eps r), r standard normal (seeded)."""
    if isinstance(x, list):
        return [_one_rounding(t) for t in x]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel()))
    return x * (1 + torch.finfo(torch.float32).eps * noise)


def _eval_ratio(model: nn.Module, converted: nn.Module, exact_model: nn.Module | None,
                inputs: list) -> tuple[float, float, BaseException | None, str | None]:
    """(the verdict's ratio, at most 1 agrees; the converted model's relative error against the
    fp32 original on the first input, for reading; the converted model's exception if it
    raised; a note on how it was judged).

    Per input, the converted model's error against float64 over what the rule allows
    (EVAL_TOLERANCE's comment); the ratio is their median, or inf if any input's exceeds
    EVAL_DRAW_CAP (a mask flip moves one draw, it does not make it wrong). Where the fp32
    original is further than CHAOTIC from float64, fp32 bounds nothing: the converted model runs
    in float64 (its fused modules then run the unfused ops: the rewrite alone) and must match
    the float64 original to EVAL_TOLERANCE. Where the float64 copy does not run, or the fp32
    original does not even match its structure (a detector keeping other boxes), the
    converted model is held to EVAL_TOLERANCE against the fp32 original."""
    ratios, first, note, rewrite = [], None, None, None
    for x in inputs:
        with torch.no_grad():
            expected, _ = _run(model, x)
            out, error = _run(converted, x)
            if error is not None:
                return float("inf"), float("inf"), error, None
            exact, exact_error = _run(exact_model, _double(x)) if exact_model is not None else (None, True)
            rounded, _ = _run(model, _one_rounding(x))
        against_original = _output_error(out, expected)
        first = against_original if first is None else first
        original_error = _output_error(expected, exact) if exact_error is None else float("inf")
        if original_error == float("inf"):
            ratios.append(against_original / EVAL_TOLERANCE)
            continue
        original_error = max(original_error, _output_error(rounded, exact))
        if original_error > CHAOTIC:
            note = f"chaotic in fp32 (the original {original_error:.2g} from float64): judged in float64"
            rewrite = rewrite or copy.deepcopy(converted).double()
            with torch.no_grad():
                out64, error = _run(rewrite, _double(x))
            if error is not None:
                return float("inf"), first, error, note
            ratios.append(_output_error(out64, exact) / EVAL_TOLERANCE)
            continue
        ratios.append(_output_error(out, exact) / max(TRAIN_FACTOR * original_error, EVAL_TOLERANCE))
    if max(ratios) > EVAL_DRAW_CAP:
        return float("inf"), first, None, note
    return round(statistics.median(ratios), 4), first, None, note


def _first_size(model: nn.Module, kind: str) -> int:
    """The smallest of SIZES the original accepts (some need 224: fixed position tables), else
    the side its timm configuration declares (timm's test_* models take exactly 160)."""
    error, declared = None, getattr(model, "pretrained_cfg", None) or {}
    sizes = SIZES + tuple(declared.get("input_size", ())[-1:])
    for size in sizes:
        with torch.no_grad():
            _, error = _run(model, _input(kind, 1, size, torch.Generator().manual_seed(0)))
        if error is None:
            return size
    raise RuntimeError(f"the original model accepts none of the sizes {sizes}: {_text(error)}")


def _proxies_left(model: nn.Module) -> list[str]:
    """Modules holding an fx Proxy (directly or in a dict/list/tuple/set attribute): what a
    trace wrote into module state; such a model fails to deepcopy or pickle."""
    from torch import fx

    def holds(value, depth=0) -> bool:
        if isinstance(value, (fx.Proxy, fx.Node)):
            return True
        if depth < 3 and isinstance(value, dict):
            return any(holds(k, depth + 1) or holds(v, depth + 1) for k, v in value.items())
        if depth < 3 and isinstance(value, (list, tuple, set)):
            return any(holds(v, depth + 1) for v in value)
        return False

    return [name or "the model" for name, m in model.named_modules()
            if any(holds(v) for k, v in vars(m).items() if k not in ("_modules", "_parameters", "_buffers"))]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@contextlib.contextmanager
def _counting_batch_norms(model: nn.Module, skip: tuple[type, ...]):
    """Counts (in the yielded one-element list) the calls of the model's BatchNorm modules that
    are not of the ``skip`` types, while the block runs; the hooks are removed afterwards."""
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for m in model.modules() if is_batch_norm(m) and not isinstance(m, skip)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# --- one training step against float64 ----------------------------------------------------------

def _without_randomness(model: nn.Module) -> nn.Module:
    """Dropout, drop-path and stochastic-depth modules in eval mode: each of the three models
    compared would draw its own masks."""
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, nn.modules.dropout._DropoutNd) or "Drop" in name or "StochasticDepth" in name:
            module.eval()
    return model


def _bn_on_few_values(model: nn.Module, x) -> bool:
    """Whether a training-mode BatchNorm normalises fewer than MIN_BN_VALUES values per channel
    (1x1 maps, an SE block's pooled vector, at a small batch)."""
    found = []

    def hook(module, args, output):
        t = args[0]
        if module.training and t.dim() >= 2 and t.numel() // t.shape[1] < MIN_BN_VALUES:
            found.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_batch_norm(m)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return bool(found)


def _train_step(model: nn.Module, x: torch.Tensor, weights: list[torch.Tensor] | None, choices=None):
    """((loss, gradients and BatchNorm buffers after one step) of ``sum(w * output)``, w, and the
    pieces its piecewise functions took); with ``choices``, the forward takes those pieces."""
    model.zero_grad(set_to_none=True)
    with pieces.imposing(choices) if choices is not None else pieces.recording() as chosen:
        outputs = tensors(model(x))
    if weights is None:
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + i), dtype=torch.float64)
                   for i, o in enumerate(outputs)]
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights))
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [loss.detach(), *grads, *buffers], weights, chosen


def _check_training(model: nn.Module, converted: nn.Module | None, kind: str, size: int, backend: str, seed: int,
                    row: dict) -> None:
    """``converted``: ``model`` converted for ``backend``, or None to convert it here."""
    if kind == "detection":
        row["train_note"] = "not compared: a detector's training forward needs targets"
        return
    if converted is None:
        try:
            converted = convert(model, backend=backend)
        except Exception as error:  # noqa: BLE001
            row["error"] = f"convert for {backend}: {_text(error)}"
            return
    original = _without_randomness(copy.deepcopy(model).train())
    fused = _without_randomness(copy.deepcopy(converted).train())
    g = torch.Generator().manual_seed(seed + 3)
    size = max(size, TRAIN_MIN_SIZE)
    batch = TRAIN_BATCH if size < 128 else TRAIN_BATCH_LARGE
    inputs = [_input(kind, batch, size, g) for _ in range(TRAIN_INPUTS)]
    with torch.no_grad():
        first, again = tensors(copy.deepcopy(original)(inputs[0])), tensors(copy.deepcopy(original)(inputs[0]))
    if len(first) != len(again) or not all(torch.equal(a, b) for a, b in zip(first, again)):
        row["train_note"] = "not compared: the training forward is random (functional dropout?)"
        return
    if _bn_on_few_values(copy.deepcopy(original), inputs[0]):
        row["train_note"] = f"not compared: a training-mode BatchNorm sees fewer than {MIN_BN_VALUES} values per channel"
        return
    try:
        row["train_ratio"] = round(statistics.median(step_ratio(original, fused, x) for x in inputs), 3)
    except Exception as error:  # noqa: BLE001
        row["error"] = f"train: {_text(error)}"
        return
    row["equal_train"] = row["train_ratio"] <= 1.0


def step_ratio(original: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    """One training step (loss ``sum(w * output)``, w fixed random) of the fused model judged
    by the project's rule: its errors against float64 over the loss, gradients and buffers
    against TRAIN_FACTOR x the fp32 original's (``_step_verdict``: at most 1 passes).
    Each fp32 model's float64 reference is a float64 copy of ``original`` that takes the pieces
    (ReLU masks, max pool picks: bench/pieces.py) the fp32 model took, so the errors are its
    rounding, not a mask flipped by it. Each model steps from a copy of its state, so nothing is
    changed; the fused model's exceptions propagate."""
    original_result, weights, original_pieces = _train_step(copy.deepcopy(original), x, None)
    fused_result, _, fused_pieces = _train_step(copy.deepcopy(fused), x, weights)
    exact = copy.deepcopy(original).double()
    exact_for_original, _, _ = _train_step(copy.deepcopy(exact), x.double(), weights, original_pieces)
    exact_for_fused, _, _ = _train_step(exact, x.double(), weights, fused_pieces)
    if len(fused_result) != len(exact_for_fused):
        raise ValueError("the converted model has other parameters or buffers")
    return _step_verdict(fused_result, exact_for_fused, original_result, exact_for_original)


def _step_verdict(fused: list[torch.Tensor], exact_for_fused: list[torch.Tensor], original: list[torch.Tensor],
                 exact_for_original: list[torch.Tensor]) -> float:
    """The verdict on one step, at most 1 passes. Per tensor (the loss, each gradient and
    buffer), the relative error max|a - e| / max|e| against its float64 reference, at least one
    float32 ulp; the fused model's mean over the tensors may be TRAIN_FACTOR x the original's,
    and no tensor's more than TRAIN_TENSOR_CAP x. A max over hundreds of per-tensor ratios would
    fail an equally good model on noise: a scalar's rounding error is one draw, and fastvit_t8's
    last-stage gradients (1e-10) land 11x apart on one input and 0.3x on the next."""
    eps = torch.finfo(torch.float32).eps
    fused_errors, original_errors = [], []
    for f, ef, o, eo in zip(fused, exact_for_fused, original, exact_for_original):
        if f.shape != ef.shape or not torch.isfinite(f).all():
            return float("inf")
        if not ef.numel():
            continue
        for judged, exact, errors in ((f, ef, fused_errors), (o, eo, original_errors)):
            error = (judged.detach().double() - exact.detach().double()).abs().max().item()
            scale = exact.detach().abs().max().item()
            errors.append(max(error / scale, eps) if scale > 0 else (eps if error == 0 else float("inf")))
    if not fused_errors:
        return 0.0
    worst = max(f / o for f, o in zip(fused_errors, original_errors))
    return max(sum(fused_errors) / sum(original_errors) / TRAIN_FACTOR, worst / TRAIN_TENSOR_CAP)


# --- which architectures -------------------------------------------------------------------------

def full_sweep(timm_models: bool = True, torchvision_models: bool = True) -> list[str]:
    """Every torchvision classification/detection/segmentation builder and timm architecture
    with a BatchNorm, one per family: architectures built of the same module classes (on the
    meta device: no weights are made) are a family, and its smallest member stands for it.
    Listing timm builds ~1400 architectures on the meta device: minutes."""
    names = []
    if torchvision_models:
        import torchvision

        for module in (torchvision.models, torchvision.models.detection, torchvision.models.segmentation):
            names += [f"torchvision:{b}" for b in torchvision.models.list_models(module=module)]
    if timm_models:
        import timm

        names += [f"timm:{a}" for a in timm.list_models()]
    families: dict[tuple, tuple[int, str]] = {}
    for name in names:
        try:
            model, _ = build(name, device="meta")
        except Exception:  # noqa: BLE001  (an architecture that cannot be built is not swept)
            continue
        classes = {type(m) for m in model.modules()}
        if not any(is_batch_norm(m) for m in model.modules()):
            continue
        key = (name.partition(":")[0], type(model).__module__, frozenset(f"{c.__module__}.{c.__qualname__}" for c in classes))
        size = sum(p.numel() for p in model.parameters())
        if key not in families or (size, name) < families[key]:
            families[key] = (size, name)
    return sorted(name for _, name in families.values())
