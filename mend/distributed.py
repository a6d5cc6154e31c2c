"""Meta-training on several processes: `torchrun --nproc_per_node=N mend train-editor ...`.

Each step's edits are sampled identically on every rank (one seed); rank r computes the gradient
factors, keys and values of edits r, r+N, ... on its own device, and the keys and values of all
ranks are gathered (differentiably: the backward pass returns each rank the gradient of its own
rows) so that every rank solves the same least-squares update over the global batch. Each rank then
scores its share of the edits and unrelated facts, normalised by the global counts, so that the
ranks' losses sum to the single-process loss; DistributedDataParallel averages the editor's
gradients, so each rank's loss is scaled by N. The normalisation statistics are updated with the
gathered rows and C₀ is summed over ranks: every rank holds the same editor at every step. Every
rank runs every pass of the base model, validation included (with FSDP each pass gathers the
model's parameters from all ranks); rank 0 saves and logs. Backends: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

from mend.models import resolve_device


@dataclass(frozen=True)
class Shard:
    """This process's part of each step; the default is the whole step (one process)."""

    rank: int = 0
    world: int = 1
    group: object = None  # the editor's gathers run in a group apart from DDP's gradient all-reduce
    device: torch.device = torch.device("cpu")  # where this rank's collectives' tensors live

    @property
    def main(self) -> bool:  # validates, saves and logs
        return self.rank == 0

    def take(self, items: list) -> list:
        return items[self.rank :: self.world]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, in rank order (differentiable); ranks may hold different numbers of rows."""
        if self.world == 1:
            return rows
        sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device), group=self.group)
        sizes = [int(s) for s in sizes]
        padded = torch.cat([rows, rows.new_zeros(max(sizes) - rows.shape[0], *rows.shape[1:])])
        return torch.cat([part[:n] for part, n in zip(all_gather(padded, group=self.group), sizes)])

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (not differentiable)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value

    def broadcast(self, flag: bool) -> bool:
        """Rank 0's value of `flag` on every rank (so that all stop together)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0, group=self.group)
        return bool(t.item())


def start(device: str = "auto") -> tuple[Shard, torch.device]:
    """This process's shard and device. Under torchrun (WORLD_SIZE > 1) it joins the process group:
    NCCL and cuda:LOCAL_RANK when the device is CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world == 1:
        return Shard(), resolved
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size(), dist.new_group(), resolved), resolved


def shard_model(model: torch.nn.Module, targets, shard: Shard) -> None:
    """FSDP (`fully_shard`) of the frozen base model across the ranks, for a model one device cannot
    hold: each layer of its largest layer stack, then the rest, keeps 1/N of its parameters and
    gathers them for each pass. The edited weights stay whole on every rank (edits replace them)."""
    from torch.distributed.fsdp import fully_shard

    from mend.errors import ConfigError

    if shard.world == 1:
        raise ConfigError("train.fsdp shards the model across processes: run under torchrun with --nproc_per_node of 2 or more")
    params = dict(model.named_parameters())
    ignored = {params[t.param_name] for t in targets}
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    for layer in max(stacks, key=len, default=[]):
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
