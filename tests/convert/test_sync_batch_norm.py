"""Fused SyncBatchNorm across 2 processes on the CPU (gloo), uneven batch sizes per rank, against
the oracle: a plain BatchNorm2d model run in one process on the concatenated global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import resnet_fused
from helpers import assert_grads_close, max_rel_error, randomize_batch_norms, textbook_resnet
from resnet_fused.nn import FoldedSyncBatchNorm, FusedConv2d

SPLIT = (3, 2)  # images per rank: uneven on purpose
STEPS = 2


def make_model() -> nn.Module:
    torch.manual_seed(30)
    model = randomize_batch_norms(textbook_resnet(), torch.Generator().manual_seed(30))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None if module.num_features == 16 else 0.2  # cumulative average too
    return model.train()


def global_batches():
    g = torch.Generator().manual_seed(31)
    return [(torch.randn(sum(SPLIT), 3, 9, 8, generator=g), torch.randn(sum(SPLIT), 5, generator=g)) for _ in range(STEPS)]


def run_steps(model, batches, rows):
    """Forward and backward of ``STEPS`` batches (the rows ``rows`` of each); gradients accumulate."""
    outputs, input_grads = [], []
    for x, weights in batches:
        x = x[rows].clone().requires_grad_()
        out = model(x)
        (out * weights[rows]).sum().backward()
        outputs.append(out.detach())
        input_grads.append(x.grad)
    return outputs, input_grads


def worker(rank: int, init_file: str, result_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SPLIT))
    try:
        converted = resnet_fused.convert(nn.SyncBatchNorm.convert_sync_batchnorm(make_model()), backend="cpu")
        assert sum(isinstance(m, FoldedSyncBatchNorm) for m in converted.modules()) == 9
        start = sum(SPLIT[:rank])
        outputs, input_grads = run_steps(converted, global_batches(), slice(start, start + SPLIT[rank]))
        grads = {name: p.grad for name, p in converted.named_parameters()}
        torch.save({"outputs": outputs, "input_grads": input_grads, "grads": grads,
                    "state": converted.state_dict()}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_global_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=len(SPLIT), join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(len(SPLIT))]

    oracle = make_model()
    outputs, input_grads = run_steps(oracle, global_batches(), slice(None))
    for step in range(STEPS):
        assert max_rel_error(torch.cat([r["outputs"][step] for r in ranks]), outputs[step]) < 1e-4
        assert max_rel_error(torch.cat([r["input_grads"][step] for r in ranks]), input_grads[step]) < 1e-4
    names = [name for name, _ in oracle.named_parameters()]
    assert_grads_close([sum(r["grads"][name] for r in ranks) for name in names],
                       [p.grad for p in oracle.parameters()], 1e-5)
    for key, value in oracle.state_dict().items():
        for r in ranks:
            if value.is_floating_point():
                assert max_rel_error(r["state"][key], value) < 1e-5, key
            else:
                assert torch.equal(r["state"][key], value), key


def test_without_process_group_it_is_plain_batch_norm():
    """Outside torch.distributed a SyncBatchNorm normalizes like a BatchNorm2d; the fused unit
    does the same on the CPU."""
    converted = resnet_fused.convert(nn.SyncBatchNorm.convert_sync_batchnorm(make_model()), backend="cpu")
    plain = make_model()
    assert isinstance(converted[0], FusedConv2d) and isinstance(converted[1], FoldedSyncBatchNorm)
    x = torch.randn(4, 3, 8, 8)
    assert max_rel_error(converted(x), plain(x)) < 1e-4
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value)
