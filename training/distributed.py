"""Data-parallel training under ``torchrun``: the same ``medcl train`` command, N processes, one result.

Every process draws the same global batch (same seeds) and augments it identically; the model
wrapper (``ShardedForward``) runs only this process's share through DDP and gathers the outputs of
all processes with autograd, so each loss sees the whole batch: contrastive negatives come from
every process, exactly as in a single-process run. Batch-norm statistics are all-reduced across
processes (``GlobalBatchNorm``: torch's SyncBatchNorm runs only on GPUs), so the forward pass is the
single-process one split N ways. Gradients: the gathered outputs send each process N times its share
of the gradient (every process computes the same loss), DDP averages over N: the sum is the
single-process gradient.

On CPU the backend is gloo; the engine has no GPU path yet, so NCCL is not used (docs/retraining.md).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.nn.functional's collectives are deprecated in favour of the private
# torch.distributed._functional_collectives; they are still the public, autograd-aware ones.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_environment() -> Distributed | None:
    """The process group torchrun describes (WORLD_SIZE > 1), initialised once; None when alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the whole batch across processes."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        c = x.shape[1]
        # Two passes (mean, then squared deviations), as a single process computes the variance: the
        # one-pass E[x^2] - E[x]^2 loses digits to cancellation.
        count = torch.tensor([x.numel() / c], dtype=x.dtype)
        first = all_reduce(torch.cat([x.sum(dims), count]))  # autograd-aware: backward sums across processes
        n = first[c]
        mean = first[:c] / n
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of ``module`` replaced by a GlobalBatchNorm holding the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            global_batchnorm(child)
    return module


class ShardedForward(nn.Module):
    """The model as the methods see it: full batch in, full-batch outputs out, this process computing
    its contiguous share. In eval mode the whole batch runs locally (no collectives). ``model``'s batch
    norms must already be global (``global_batchnorm``, before the optimiser takes the parameters)."""

    def __init__(self, model: nn.Module, context: Distributed) -> None:
        super().__init__()
        self.context = context
        # Buffers need no broadcast: the global statistics are the same on every process.
        self.ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)

    @property
    def module(self) -> nn.Module:
        return self.ddp.module

    def forward(self, x: torch.Tensor, **kwargs):
        if not self.training:
            return self.ddp.module(x, **kwargs)
        from torch.distributed.nn.functional import all_gather

        world, rank = self.context.world, self.context.rank
        if x.shape[0] % world:
            raise ValueError(f"a batch of {x.shape[0]} images does not split over {world} processes; "
                             "make the batch sizes multiples of the process count")
        outputs = self.ddp(x.chunk(world)[rank], **kwargs)
        single = isinstance(outputs, torch.Tensor)
        gathered = [torch.cat(all_gather(o.contiguous())) for o in ((outputs,) if single else outputs)]
        return gathered[0] if single else tuple(gathered)

    def __deepcopy__(self, memo: dict) -> nn.Module:
        # A mean teacher is a plain copy of the network; its batch norm still agrees across processes.
        return copy.deepcopy(self.ddp.module, memo)


def agree(flag: bool) -> bool:
    """True on every process if it is true on any (e.g. the time budget ran out on one clock)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
