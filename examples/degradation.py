"""The degradation problem of He et al. 2015 (Fig. 1 and 6), in small, on a 2-core CPU.

Trains plain-20, plain-56, ResNet-20 and ResNet-56 (the CIFAR nets of ``resnet_fused.models``,
option-A shortcuts, fused with ``resnet_fused.convert(model, backend="cpu")``) on scikit-learn's
handwritten digits (1797 8x8 grayscale images, shipped with scikit-learn: nothing is downloaded;
a fixed stratified 75/25 split), prints the final training and test error of each and saves a
PNG of the training-error curves. The deeper plain net trains worse than the shallower one; the
deeper ResNet does not.

Training follows Sec. 4.2 scaled down: SGD, momentum 0.9, weight decay 1e-4, batch 64, lr 0.05
(the paper's 0.1 at batch 128, scaled linearly to batch 64) divided by 10 at 50% and 75% of the
iterations, after one warm-up epoch at a tenth of it (the paper's ResNet-110 warm-up, here for
every net). No data augmentation. Measured on digits: without the warm-up neither 56-layer net
trains in a few hundred steps; at lr 0.1 after the warm-up ResNet-56 can diverge (one seed went
from 30% back to 88% training error) while at 0.05 it reached 0.2-0.3% for three seeds.

The same run trains ResNet-20 unfused (the original modules, the same initial weights and
batches) and prints the largest difference between its loss curve and the fused one's. SGD
amplifies rounding differences, so the curves part at the 1e-2 level within some steps whatever
the cause; a third run, unfused with every initial weight moved by one ulp, measures that noise
as a yardstick.

    python examples/degradation.py --out benchmarks/results/degradation.png   # a few minutes
    python examples/degradation.py --quick --out /tmp/quick.png               # smoke test, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from resnet_fused import convert
from resnet_fused.models import cifar_plain, cifar_resnet


@dataclasses.dataclass
class Config:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05           # the paper's 0.1 for batch 128, scaled to batch 64; /10 at 50% and 75%
    warmup_epochs: float = 1.0  # lr / 10 first, as the paper warms up ResNet-110
    momentum: float = 0.9
    weight_decay: float = 1e-4
    width: int = 16            # filters of the first stage (the paper's 16; then 32, 64)
    size: int = 8              # digits are 8x8; another size upsamples them (bilinear)
    train_limit: int | None = None  # use only the first n training images
    seed: int = 0


QUICK = Config(epochs=1, batch_size=32, width=4, size=8, train_limit=96)

# (label, depth, residual, fused, initial weights moved by one ulp)
RUNS = [
    ("plain-20", 20, False, True, False),
    ("plain-56", 56, False, True, False),
    ("ResNet-20", 20, True, True, False),
    ("ResNet-56", 56, True, True, False),
    ("ResNet-20 unfused", 20, True, False, False),
    # The yardstick for "the same curve": unfused again, every initial weight one ulp off.
    ("ResNet-20 unfused ulp-off", 20, True, False, True),
]


@dataclasses.dataclass
class History:
    label: str
    depth: int
    residual: bool
    fused: bool
    params: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)        # per iteration
    errors: list[float] = dataclasses.field(default_factory=list)        # per iteration, the batch's error
    epoch_errors: list[float] = dataclasses.field(default_factory=list)  # running training error of each epoch
    train_error: float = math.nan  # final weights, eval mode, whole training set
    test_error: float = math.nan
    seconds: float = 0.0


def load_data(cfg: Config):
    """Digits as (N, 1, size, size) floats in [0, 1] and labels; a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    # Stratified: a quarter of each class (a fixed permutation of it) is the test set.
    split = torch.Generator().manual_seed(1234)
    train_idx, test_idx = [], []
    for c in range(10):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=split)]
        n_test = round(len(members) * 0.25)
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    train_idx = torch.cat(train_idx)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=split)][: cfg.train_limit]
    test_idx = torch.cat(test_idx).sort().values
    if cfg.size != 8:
        x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return x[train_idx].contiguous(), y[train_idx], x[test_idx].contiguous(), y[test_idx]


def build(depth: int, residual: bool, cfg: Config, nudge: bool = False) -> nn.Module:
    """The CIFAR net for 1-channel digits, initialised from cfg.seed; with ``nudge`` every
    parameter is moved one ulp up or down (a seeded coin flip each)."""
    torch.manual_seed(cfg.seed)
    factory = cifar_resnet if residual else cifar_plain
    model = factory(depth, num_classes=10, width=cfg.width, in_channels=1)
    if nudge:
        coin = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                up = torch.rand(p.shape, generator=coin) < 0.5
                p.copy_(torch.where(up, p.nextafter(torch.tensor(math.inf)), p.nextafter(torch.tensor(-math.inf))))
    return model


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    wrong = sum((model(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    return wrong / len(y)


def steps_per_epoch_of(n_train: int, cfg: Config) -> int:
    return max(1, n_train // cfg.batch_size)


def lr_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """1/10 during the warm-up, then 1, 1/10 from 50% and 1/100 from 75% of the iterations."""
    total = cfg.epochs * steps_per_epoch
    if step < cfg.warmup_epochs * steps_per_epoch:
        return 0.1
    return 1.0 if step < total // 2 else 0.1 if step < (3 * total) // 4 else 0.01


def train(model: nn.Module, history: History, data, cfg: Config, advance=lambda loss: None) -> History:
    """SGD with momentum; the same batch order for every model (a generator seeded by cfg.seed)."""
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = steps_per_epoch_of(len(y_train), cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
    order = torch.Generator().manual_seed(cfg.seed)
    history.params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        wrong = seen = 0
        # Full batches only: a last batch of a few images would give BatchNorm noisy statistics.
        for idx in torch.randperm(len(y_train), generator=order).split(cfg.batch_size)[:steps_per_epoch]:
            out = model(x_train[idx])
            loss = F.cross_entropy(out, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            batch_wrong = (out.argmax(1) != y_train[idx]).sum().item()
            wrong += batch_wrong
            seen += len(idx)
            history.losses.append(loss.item())
            history.errors.append(batch_wrong / len(idx))
            advance(history.losses[-1])
        history.epoch_errors.append(wrong / seen)
    history.train_error = error_rate(model, x_train, y_train)
    history.test_error = error_rate(model, x_test, y_test)
    history.seconds = time.perf_counter() - start
    return history


def run(cfg: Config, out: str | Path | None = None, progress: bool = True) -> dict[str, History]:
    """Train every net of ``RUNS``; save the plot to ``out`` (if given); the histories by label."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    data = load_data(cfg)
    steps = cfg.epochs * steps_per_epoch_of(len(data[1]), cfg)
    results: dict[str, History] = {}
    columns = (TextColumn("{task.description:<25}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        tasks = {label: bar.add_task(label, total=steps, loss=math.nan, start=False) for label, *_ in RUNS}
        for label, depth, residual, fused, nudge in RUNS:
            task = tasks[label]
            bar.start_task(task)
            model = build(depth, residual, cfg, nudge)
            if fused:
                model = convert(model, backend="cpu")
            results[label] = train(model, History(label, depth, residual, fused), data, cfg,
                                   lambda loss, task=task: bar.update(task, advance=1, loss=loss))
    if out is not None:
        plot(results, cfg, out)
    return results


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: dict[str, History], cfg: Config, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    styles = {20: dict(color="tab:orange"), 56: dict(color="tab:red")}
    for ax, residual, title in ((axes[0], False, "plain"), (axes[1], True, "ResNet (option A)")):
        for label, h in results.items():
            if h.residual != residual or label.endswith("ulp-off"):
                continue
            n = len(h.errors)
            steps_per_epoch = max(1, n // max(1, cfg.epochs))
            window = max(1, steps_per_epoch // 2)
            epochs = [(i + 1) / steps_per_epoch for i in range(n)]
            style = dict(styles[h.depth], linestyle="-" if h.fused else "--", linewidth=1.4 if h.fused else 1.0)
            name = f"{h.label}{' (fused)' if h.fused and residual and h.depth == 20 else ''}"
            ax.plot(epochs, [100 * e for e in smooth(h.errors, window)], label=f"{name}: {100 * h.train_error:.1f}%", **style)
        ax.set_title(f"{title}, digits {cfg.size}x{cfg.size}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="final training error", title_fontsize=8)
    axes[0].set_ylabel("training error (%)")
    axes[0].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def max_loss_difference(results: dict[str, History], a: str = "ResNet-20", b: str = "ResNet-20 unfused") -> float:
    """The largest difference between two runs' per-iteration training losses."""
    return max(abs(x - y) for x, y in zip(results[a].losses, results[b].losses))


def report(results: dict[str, History]) -> str:
    lines = [f"{'model':<25} {'params':>8} {'train err':>10} {'test err':>9} {'last-epoch train err':>21} {'time':>7}"]
    for h in results.values():
        lines.append(f"{h.label:<25} {h.params / 1e6:>7.3f}M {100 * h.train_error:>9.2f}% {100 * h.test_error:>8.2f}% "
                     f"{100 * h.epoch_errors[-1]:>20.2f}% {h.seconds:>6.1f}s")
    lines.append("train err: final weights, eval mode, whole training set; last-epoch train err: the running "
                 "error of the last epoch (train mode), what the plot draws")
    if {"ResNet-20", "ResNet-20 unfused"} <= set(results):
        fused, unfused = results["ResNet-20"], results["ResNet-20 unfused"]
        first = abs(fused.losses[0] - unfused.losses[0])
        lines.append(f"ResNet-20 fused vs unfused: |loss difference| {first:.2g} at the first step, "
                     f"max {max_loss_difference(results):.3g} over {len(fused.losses)} steps")
        if "ResNet-20 unfused ulp-off" in results:
            control = max_loss_difference(results, "ResNet-20 unfused", "ResNet-20 unfused ulp-off")
            lines.append(f"  yardstick, unfused vs unfused with every initial weight one ulp off: max {control:.3g} "
                         "(rounding differences grow chaotically in SGD; the curves agree as closely as rounding allows)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, History]:
    parser = argparse.ArgumentParser(prog="examples/degradation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {Config.epochs})")
    parser.add_argument("--out", default="degradation.png", help="PNG of the training-error curves")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these small convs gain little from more, and on a "
                             "shared machine waiting threads cost far more than they save)")
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(QUICK if args.quick else Config())
    if args.epochs is not None:
        cfg.epochs = args.epochs
    print(f"digits {cfg.size}x{cfg.size}, width {cfg.width}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"SGD lr {cfg.lr:g} (/10 for {cfg.warmup_epochs:g} warm-up epoch(s), then /10 at 50% and 75%), momentum {cfg.momentum}, "
          f"weight decay {cfg.weight_decay}, {args.threads} thread(s)")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        results = run(cfg, args.out, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    print(report(results))
    print(f"saved {args.out}; total {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
