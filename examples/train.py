"""Train a ResNet, fused or unfused, in one process or many (torchrun): a script to copy.

The model comes from torchvision, timm or ``resnet_fused.models``; ``--fused`` converts it with
``resnet_fused.convert`` and prints what was fused. The data ship with a package (nothing is
downloaded): scikit-learn's handwritten digits, upscaled, with a fixed 75/25 split, or
torchvision's FakeData for throughput. Writes to --out: metrics.csv (a row per optimizer step),
checkpoint.pt (every epoch and at --max-steps; --resume continues from it exactly) and, with
--plot, metrics.png.

    python examples/train.py --fused                                       # one process
    torchrun --standalone --nproc_per_node 2 examples/train.py --fused --no-sync-bn --device cpu
    torchrun --standalone --nproc_per_node 8 examples/train.py --fused --amp bf16 --channels-last \\
        --data fake --image-size 224 --batch-size 128 --workers 8           # 8 GPUs

--batch-size is per process. On several GPUs BatchNorm becomes SyncBatchNorm (statistics of the
global batch) unless --no-sync-bn; on the CPU DistributedDataParallel refuses SyncBatchNorm.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import resnet_fused
from resnet_fused import backends
from resnet_fused.bench.models import paper_names, torchvision_names

MODEL_FORMS = ("torchvision:<name> (a ResNet, ResNeXt or Wide ResNet, e.g. torchvision:resnet18), "
               "timm:<name> (e.g. timm:resnet18), or paper:<name> (resnet_fused.models: paper:resnet20 "
               "... paper:resnet110 and paper:plain20 ... for 32 px; paper:resnet18 ... paper:resnet152)")
CSV_FIELDS = ("step", "epoch", "loss", "lr", "val_acc", "images_per_s")
# What the batches and the learning-rate schedule depend on: a resumed run must keep them.
RESUME_KEYS = ("model", "data", "image_size", "batch_size", "lr", "epochs", "seed")
FAKE_TRAIN, FAKE_VAL = 4096, 512  # FakeData images: enough steps per epoch to time


class UsageError(Exception):
    """A mistake in the command line or the set-up: one line on stderr, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="examples/train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="torchvision:resnet18", help=f"one of {MODEL_FORMS}")
    p.add_argument("--data", choices=("digits", "fake"), default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--fused", action="store_true", help="resnet_fused.convert the model")
    p.add_argument("--backend", choices=("auto", *resnet_fused.BACKENDS), help="with --fused (default auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-sync-bn", action="store_true", help="per-process BatchNorm statistics")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", default="runs/train", help="directory for metrics, checkpoint, plot")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--plot", action="store_true", help="also write OUT/metrics.png (matplotlib)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    # batch 2 at least: a batch of one gives BatchNorm no variance in training.
    for name, least in (("batch_size", 2), ("epochs", 1), ("max_steps", 1), ("image_size", 8), ("workers", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.backend is not None and not args.fused:
        raise UsageError("--backend chooses the fused kernels: add --fused")
    # Checked now, not after the training it would have plotted.
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install matplotlib")
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists():
        raise UsageError(f"--resume: no checkpoint at {Path(args.out) / 'checkpoint.pt'}")


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"process {local_rank} has no GPU: {torch.cuda.device_count()} visible, "
                         "start at most that many processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_device_options(args: argparse.Namespace, device: torch.device, world: int) -> None:
    if args.amp == "fp16" and device.type == "cpu":
        raise UsageError("--amp fp16 needs a GPU; on the CPU use --amp bf16")
    record = backends.REGISTRY.get(args.backend)
    if record and not record.runs_on(device):
        raise UsageError(f"--backend {args.backend} cannot run on {device.type}: {record.why_not}")
    if world > 1 and device.type == "cpu" and not args.no_sync_bn:
        # resnet_fused's fused SyncBatchNorm runs on the CPU, but it is an nn.SyncBatchNorm and
        # DistributedDataParallel refuses those in a CPU module.
        raise UsageError("DistributedDataParallel takes SyncBatchNorm only on GPUs: on the CPU add --no-sync-bn")


@dataclasses.dataclass
class Run:
    """This process's place in the job, and the options."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def to_device(self, x: torch.Tensor, y: torch.Tensor):
        fmt = torch.channels_last if self.args.channels_last else torch.contiguous_format
        return x.to(self.device, non_blocking=True, memory_format=fmt), y.to(self.device, non_blocking=True)

    def global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)  # SUM: gloo has no AVG
        return t.tolist()

    def loader(self, dataset, batch_size: int, indices, drop_last: bool = False) -> DataLoader:
        # Its own generator: creating a DataLoader iterator otherwise draws from the global RNG,
        # which dropout (in some timm models) reads, and a resumed run creates one more than the
        # run it continues.
        return DataLoader(dataset, batch_size=batch_size, sampler=indices, drop_last=drop_last,
                          num_workers=self.args.workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.args.seed))


def start_processes(args: argparse.Namespace) -> Run:
    """Joins the process group that torchrun's variables describe (none: one process)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    check_device_options(args, device, world)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
            raise UsageError(f"this torch build has no torch.distributed {backend} backend")
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Run(args, rank, world, device)


def model_factory(name: str, num_classes: int):
    """A function that builds the named model; raises UsageError naming the accepted forms."""
    source, _, arch = name.partition(":")
    if source == "torchvision" and arch in torchvision_names():
        import torchvision.models

        return lambda: torchvision.models.get_model(arch, num_classes=num_classes)
    if source == "paper" and name in paper_names():
        from resnet_fused import models

        return lambda: getattr(models, arch)(num_classes=num_classes)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise UsageError(f"--model {name} needs timm: pip install timm") from None
        if timm.is_model(arch):
            return lambda: timm.create_model(arch, pretrained=False, num_classes=num_classes)
    raise UsageError(f"unknown model {name!r}; use {MODEL_FORMS}")


def load_data(args: argparse.Namespace):
    """(train, val, number of classes): images (3, size, size), normalized, and labels."""
    if args.data == "fake":
        from torchvision import datasets, transforms

        tf = transforms.ToTensor()
        size = (3, args.image_size, args.image_size)
        # random_offset: the validation images must differ from the training images.
        return (datasets.FakeData(FAKE_TRAIN, size, 10, tf),
                datasets.FakeData(FAKE_VAL, size, 10, tf, random_offset=FAKE_TRAIN), 10)
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UsageError("--data digits needs scikit-learn: pip install scikit-learn (or use --data fake)") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=(args.image_size,) * 2, mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()  # ImageNet-style stems expect 3 channels
    y = torch.tensor(digits.target)
    # The split does not follow --seed: every run validates on the same images.
    train, val = train_test_split(torch.arange(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
    x = (x - x[train].mean()) / x[train].std()
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10


def build_model(run: Run, num_classes: int) -> nn.Module:
    args = run.args
    factory = model_factory(args.model, num_classes)
    torch.manual_seed(args.seed)  # the same initial weights fused or not, on every process
    model = factory()
    if run.world > 1 and not args.no_sync_bn:
        # Before convert: the fused convs apply the SyncBatchNorms they find (README).
        if args.model.startswith("timm:"):
            from timm.layers import convert_sync_batchnorm  # also turns BatchNormAct2d into SyncBatchNormAct
            model = convert_sync_batchnorm(model)
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.fused:
        model, report = resnet_fused.convert(model, backend=args.backend or "auto", report=True)
        if run.rank == 0:
            print(report, flush=True)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(run.device, memory_format=fmt)


def cosine_with_warmup(total_steps: int):
    """The learning-rate factor: a linear warm-up over the first 5% of the steps (BatchNorm
    nets at lr 0.1 from scratch can diverge in their first steps), then a cosine to zero.
    It depends on --epochs, not --max-steps, so a run stopped early and resumed follows the
    same schedule as one that never stopped."""
    warmup = max(1, total_steps // 20)
    return lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total_steps)))


@dataclasses.dataclass
class Trainer:
    model: nn.Module  # what the checkpoint holds; ``ddp`` wraps it when there are several processes
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, run: Run, model: nn.Module, total_steps: int) -> Trainer:
        optimizer = torch.optim.SGD(model.parameters(), lr=run.args.lr, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps))
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range.
        scaler = torch.amp.GradScaler(run.device.type, enabled=run.args.amp == "fp16")
        ddp = model
        if run.world > 1:
            ddp = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        return cls(model, ddp, optimizer, schedule, scaler)

    def step(self, run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One optimizer step: (the loss averaged over the processes, the learning rate used)."""
        x, y = run.to_device(x, y)
        with run.autocast():
            loss = F.cross_entropy(self.ddp(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.schedule.get_last_lr()[0]
        self.schedule.step()
        (loss_sum,) = run.global_sum([loss.item()])  # .item() also waits for the GPU: honest timings
        return loss_sum / run.world, lr


def epoch_batches(run: Run, train, epoch: int, skip: int) -> DataLoader:
    """This process's batches of ``epoch``, from batch ``skip`` on (a resumed epoch). Rank r
    takes every world-th image of the epoch's permutation, so the global batches are those of
    one process with world x batch-size images."""
    sampler = DistributedSampler(train, num_replicas=run.world, rank=run.rank, shuffle=True, seed=run.args.seed)
    sampler.set_epoch(epoch)
    # Full batches only: a short last batch would give BatchNorm noisy statistics (or none).
    return run.loader(train, run.args.batch_size, list(sampler)[skip * run.args.batch_size:], drop_last=True)


@torch.no_grad()
def evaluate(run: Run, model: nn.Module, val) -> float:
    """Top-1 accuracy on the validation set, each process taking every world-th image."""
    model.eval()
    correct = total = 0
    for x, y in run.loader(val, 256, range(run.rank, len(val), run.world)):
        x, y = run.to_device(x, y)
        with run.autocast():
            correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train()
    correct, total = run.global_sum([correct, total])
    return correct / total


def save_checkpoint(run: Run, t: Trainer, path: Path, step: int) -> None:
    """Rank 0 writes the model, optimizer, schedule, grad scaler, step and every process's RNG state."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None}
    states = [rng]
    if run.world > 1:
        states = [None] * run.world
        dist.all_gather_object(states, rng)
    if run.rank == 0:
        state = {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                 "schedule": t.schedule.state_dict(), "scaler": t.scaler.state_dict(), "step": step,
                 "rng": states, "world_size": run.world, "args": {k: getattr(run.args, k) for k in RESUME_KEYS}}
        # Written aside, then renamed: a crash while saving leaves the last good checkpoint.
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)


def load_checkpoint(run: Run, t: Trainer, path: Path) -> int:
    """Restores what save_checkpoint wrote; returns the optimizer step it was taken after."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = [f"--{k.replace('_', '-')} {state['args'][k]} -> {getattr(run.args, k)}"
               for k in RESUME_KEYS if state["args"][k] != getattr(run.args, k)]
    if changed:
        raise UsageError(f"--resume continues the same run, but these differ from the checkpoint: {'; '.join(changed)}")
    if state["world_size"] != run.world:
        raise UsageError(f"the checkpoint was written by {state['world_size']} process(es); resume with as many")
    t.model.load_state_dict(state["model"])  # fused or not: convert keeps the state_dict keys
    t.optimizer.load_state_dict(state["optimizer"])
    t.schedule.load_state_dict(state["schedule"])
    t.scaler.load_state_dict(state["scaler"])
    rng = state["rng"][run.rank]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


def start_metrics(path: Path, resume_step: int | None) -> None:
    """metrics.csv with its header; a resumed run keeps the rows up to its checkpoint (later
    ones came from steps the checkpoint does not hold)."""
    kept = []
    if resume_step is not None and path.exists():
        with path.open(newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(kept)


def append_metrics(path: Path, row: dict) -> None:
    # Opened per row: a crash keeps every finished step (and a step takes far longer than this).
    with path.open("a", newline="") as f:
        csv.DictWriter(f, CSV_FIELDS).writerow(row)


def plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fig, loss_ax = plt.subplots(figsize=(7, 3.5))
    loss_ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=1, label="training loss")
    loss_ax.set(xlabel="optimizer step", ylabel="loss")
    val = [r for r in rows if r["val_acc"]]
    acc_ax = loss_ax.twinx()
    acc_ax.plot([int(r["step"]) for r in val], [100 * float(r["val_acc"]) for r in val], "o-", color="tab:green",
                label="validation accuracy")
    acc_ax.set(ylabel="validation accuracy (%)", ylim=(0, 100))
    fig.legend(loc="center right", bbox_to_anchor=(0.88, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def fit(run: Run, t: Trainer, data, step: int, stop: int, steps_per_epoch: int, out: Path) -> None:
    """Optimizer steps ``step`` to ``stop``, a metrics row each; validation and a checkpoint at
    the end of each epoch and at ``stop``."""
    from rich.progress import Progress

    train_set, val_set = data
    lead = run.rank == 0
    with Progress(disable=not lead) as bar:
        task = bar.add_task(run.args.model, total=stop, completed=min(step, stop))
        while step < stop:
            epoch, clock = step // steps_per_epoch, time.perf_counter()
            for x, y in epoch_batches(run, train_set, epoch, step % steps_per_epoch):
                loss, lr = t.step(run, x, y)
                step += 1
                row = {"step": step, "epoch": epoch, "loss": f"{loss:.9g}", "lr": f"{lr:.6g}", "val_acc": "",
                       "images_per_s": f"{run.args.batch_size * run.world / (time.perf_counter() - clock):.1f}"}
                if step == stop or step % steps_per_epoch == 0:
                    row["val_acc"] = f"{evaluate(run, t.model, val_set):.4f}"
                    save_checkpoint(run, t, out / "checkpoint.pt", step)
                if lead:
                    append_metrics(out / "metrics.csv", row)
                    bar.update(task, advance=1, description=f"epoch {epoch} loss {loss:.3f}")
                    if row["val_acc"]:
                        bar.console.print(f"step {step}, epoch {epoch}: validation accuracy {row['val_acc']}")
                clock = time.perf_counter()
                if step == stop:
                    break


def train(args: argparse.Namespace) -> None:
    check_args(args)
    run = start_processes(args)
    train_set, val_set, num_classes = load_data(args)
    steps_per_epoch = math.ceil(len(train_set) / run.world) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} x {run.world} process(es) is more than the "
                         f"{len(train_set)} training images")
    t = Trainer.create(run, build_model(run, num_classes), args.epochs * steps_per_epoch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Dropout and the like draw from here: the same draws fused or not, different per process.
    torch.manual_seed(args.seed + run.rank)
    step = load_checkpoint(run, t, out / "checkpoint.pt") if args.resume else 0
    if run.rank == 0:
        start_metrics(out / "metrics.csv", step if args.resume else None)
    fit(run, t, (train_set, val_set), step, min(args.epochs * steps_per_epoch, args.max_steps or math.inf),
        steps_per_epoch, out)
    if run.rank == 0:
        if args.plot:
            plot(out / "metrics.csv", out / "metrics.png")
        print(f"wrote {out}/: metrics.csv, checkpoint.pt{', metrics.png' if args.plot else ''}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UsageError as error:
        where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{where}examples/train.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
