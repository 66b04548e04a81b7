"""torchrun set-up: one process or many, the same code. No-ops on one process."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup(device=""):
    """Init the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if device:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return Dist(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def print0(*args, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kw, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_mean(x: torch.Tensor):
    """Mean of a tensor over ranks (itself on one process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
        if x.device.type != "cuda":  # gloo has no AVG
            x /= dist.get_world_size()
    return x


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(device, dtype):
    """The autocast dtype for a run: 'auto' takes bf16 where matmuls are fast in
    bf16 (CUDA, CPUs with AVX-512 bf16 or AMX) and fp32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        else:
            fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        dtype = "bf16" if fast else "fp32"
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16 or fp32, not {dtype!r}")
    return torch.bfloat16 if dtype == "bf16" else torch.float32
