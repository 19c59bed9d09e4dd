"""torchrun / DistributedDataParallel support: the process group comes from the environment torchrun sets.

One process per device (GPU) or per share of the CPU cores. Every rank draws the same permutation of the
training set from (seed, epoch) and takes its slice of each global batch; DDP averages the gradients, so a
step on W ranks with B/W examples each is the same step as one process with the global batch B. Rank 0
alone prints, writes checkpoints and writes the run store.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from cifarbench.data.dataset import Split
from cifarbench.errors import CifarbenchError, Keyword
from cifarbench.evaluation.metrics import EvalResult, sum_dtype
from cifarbench.world import SINGLE as SINGLE
from cifarbench.world import DistEnv as DistEnv
from cifarbench.world import env_world as env_world


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group (nccl on CUDA, gloo on CPU) when launched by torchrun; pick this rank's device."""
    world = env_world()
    if not world.enabled:
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        # Share the cores: W processes with all threads each would fight over them.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def teardown(world: DistEnv, *, finished: bool = True) -> None:
    """Leave the process group. After a normal finish, wait for every rank first: a rank that tears its
    communication threads down while another is still saving can abort ("terminate called ...")."""
    if world.enabled and dist.is_initialized():
        # DDP wrappers sit in reference cycles: free them (and their hold on the group's threads) now, while
        # the group is alive, not in the garbage collector's own time at interpreter exit.
        import gc

        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: DistEnv, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """The module the training steps call: DDP around `model` under torchrun (`model` itself otherwise)."""
    if not world.enabled:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise CifarbenchError("{option} needs CUDA (torch's SyncBatchNorm has no CPU implementation)",
                                  option=Keyword("sync_bn", True))
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shard(index: torch.Tensor | slice, world: DistEnv, length: int) -> torch.Tensor | slice:
    """This rank's contiguous part of a global batch (sizes differ by at most one when it does not divide)."""
    if not world.enabled:
        return index
    if isinstance(index, slice):
        index = torch.arange(*index.indices(length))
    return index.tensor_split(world.world_size)[world.rank]


def all_sum(tensor: torch.Tensor, world: DistEnv) -> torch.Tensor:
    """Sum `tensor` over ranks, in place."""
    if world.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_int(value: int, world: DistEnv, device: torch.device) -> int:
    """Rank 0's `value` on every rank (decisions such as a budget's step count must agree)."""
    if not world.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def part(split: Split | None, world: DistEnv) -> Split | None:
    """This rank's contiguous share of an evaluation split (all of it in a single process)."""
    if split is None or not world.enabled:
        return split
    index = np.array_split(np.arange(len(split)), world.world_size)[world.rank]
    return Split(split.images[index], split.labels[index])


def merge(result: EvalResult, world: DistEnv, device: torch.device) -> EvalResult:
    """Combine the ranks' evaluations of their shares into the whole split's."""
    if not world.enabled:
        return result
    confusion = all_sum(torch.tensor(result.confusion, dtype=torch.int64, device=device), world)
    loss_sum = all_sum(torch.tensor([result.loss * result.n], dtype=sum_dtype(device), device=device), world)
    merged = EvalResult.from_counts(confusion, loss_sum.item())
    if result.predictions is not None and result.confidences is not None:
        merged.predictions = _gather_parts(result.predictions, merged.n, torch.int64, world, device).numpy()
        merged.confidences = _gather_parts(result.confidences, merged.n, torch.float32, world, device).numpy()
    return merged


def _gather_parts(values: np.ndarray, total: int, dtype: torch.dtype, world: DistEnv,
                  device: torch.device) -> torch.Tensor:
    """The whole split's per-example values from each rank's contiguous share (`part`), in split order: each rank
    fills its own slice of zeros and the sum puts them together."""
    start = int(np.array_split(np.arange(total), world.world_size)[world.rank][:1].sum()) if total else 0
    whole = torch.zeros(total, dtype=dtype, device=device)
    whole[start:start + len(values)] = torch.from_numpy(np.asarray(values)).to(device=device, dtype=dtype)
    return all_sum(whole, world).cpu()
