"""torchrun set-up and the parallel wrappers: one process or many, the same stage code.

Every helper is a no-op (or the plain PyTorch call) on one process, so a stage
reads the same with or without torchrun:

    d = dist.setup(c.device)
    model.load_state_dict(...)                            # on the CPU, before wrapping
    train_model = dist.wrap(model, d, c.fsdp, amp_dtype)  # to the device; DDP, or FSDP2 in place
    opt = AdamW(model.parameters(), ...)                  # after wrap: FSDP2 swaps in sharded parameters
    with dist.grad_sync(train_model, last_micro_step): loss.backward()
    grad_norm = dist.clip_grad_norm(model, c.grad_clip)
    # dist.model_state(model), dist.optim_state(model, opt)  # every rank; rank 0 gets the full state
"""

import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


launched = False  # this process joined a torchrun process group (cli.main then exits without finalizing)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def device_or_error(name):
    """torch.device(name), or a UsageError that says why it cannot run here."""
    from ..config import UsageError

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine's PyTorch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: shoggoth runs on cpu or cuda")
    return dev


def setup(device=""):
    """Init the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if device:
        dev = device_or_error(device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return Dist(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    global launched
    launched = True
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def clock(device):
    """time.perf_counter() once the device has done the work queued so far: CUDA runs
    asynchronously, so a phase's time read without waiting is only the time to queue it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def is_main():
    """This process is rank 0 (or the only one)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kw):
    if is_main():
        print(*args, **kw, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(x: torch.Tensor):
    """Sum of a tensor over ranks (itself on one process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_min(x: torch.Tensor):
    """Minimum of a tensor over ranks (itself on one process): a value every rank must agree on."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def all_mean(x: torch.Tensor):
    """Mean of a tensor over ranks (itself on one process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
        if x.device.type != "cuda":  # gloo has no AVG
            x /= dist.get_world_size()
    return x


def all_sums(values, device=None):
    """Sums over ranks of named scalars ({name: 0-dim tensor or number}), in one all-reduce: each
    comes back a 0-dim tensor of its own float dtype (an integer or bool as float32). device: where
    the reduction runs (default: that of the first value)."""
    ts = {k: torch.as_tensor(v) for k, v in values.items()}
    if not dist.is_initialized():
        return {k: t if t.is_floating_point() else t.float() for k, t in ts.items()}
    device = device or next(iter(ts.values())).device
    flat = all_sum(torch.stack([t.to(device, torch.float64) for t in ts.values()]))  # float64 on the wire
    return {k: s.to(t.dtype if t.is_floating_point() else torch.float32) for (k, t), s in zip(ts.items(), flat)}


def all_means(values, device=None):
    """Means over ranks of named scalars, in one all-reduce (all_sums divided by the number of ranks)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world if world > 1 else v for k, v in all_sums(values, device).items()}


def share(items, d: Dist):
    """This rank's contiguous share of a sequence (rows of a global batch, prompts to roll out)."""
    n = len(items)
    return items[d.rank * n // d.world:(d.rank + 1) * n // d.world]


def gathered(items, d):
    """Every rank's list of picklable items, concatenated in rank order (items itself on one process)."""
    if d.world == 1:
        return list(items)
    parts = [None] * d.world
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(device, dtype):
    """The autocast dtype for a run: 'auto' takes bf16 where matmuls are fast in
    bf16 (GPUs from Ampere on, CPUs with AVX-512 bf16 or AMX) and fp32 elsewhere. The CPU's flags
    are not enough: kernels limited to AVX2 (ATEN_CPU_CAPABILITY=avx2, as on an
    AVX2 machine) run bf16 matmuls at a few GFLOP/s."""
    if dtype == "auto":
        if device.type == "cuda":  # bf16 tensor cores from Ampere (8.0) on; is_bf16_supported counts emulation
            fast = torch.cuda.get_device_capability(device) >= (8, 0)
        else:
            fast = (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) \
                and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        dtype = "bf16" if fast else "fp32"
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16 or fp32, not {dtype!r}")
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def autocast(device, amp_dtype):
    """The autocast context of a run's amp_dtype (autocast_dtype's answer); none for fp32."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()


# ---------------------------------------------------------------- DDP / FSDP2


def wrap(model, d: Dist, fsdp=False, amp_dtype=torch.float32, blocks=None):
    """Move model (built or loaded on the CPU) to d.device and return the module to train.
    One process: model itself. Several: DDP (a full copy per rank, gradients all-reduced),
    or with fsdp FSDP2, which shards each decoder block and then the root (embeddings,
    final norm, head) over the ranks *in place*: model itself becomes the sharded module,
    tied embeddings stay one parameter, and only a shard of each block ever stays on the
    device. blocks: the modules sharded one by one (default model.model.layers; the RL
    stages pass the blocks of every trained model). Build the optimizer after this call.
    Under FSDP2 on CUDA the parameters are gathered in amp_dtype and gradients reduced in fp32."""
    if d.world == 1 or not fsdp:
        model.to(d.device)
    if d.world == 1:
        return model
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy()
    if d.device.type == "cuda" and amp_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers if blocks is None else blocks:  # the Hugging Face layout: model.model.layers[i]
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _fsdp(module):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def grad_sync(train_model, sync):
    """Context for one micro-step's backward: gradients are reduced over ranks only
    when sync is true (the last micro-step of an optimizer step)."""
    m = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if isinstance(m, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else m.no_sync()
    if _fsdp(m):
        m.set_requires_gradient_sync(sync)
    return nullcontext()


@contextmanager
def full_weights(model):
    """Inside, every rank holds model's full weights (under FSDP2; a no-op otherwise), for
    sampling: the engine calls the trunk and head directly, which FSDP2's root hooks do not
    see, and decoding one token at a time should not all-gather every block at every token.
    Every rank must enter it (it all-gathers) and run the same forward passes inside."""
    if not _fsdp(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root, then each block
    # FSDP2 takes the first module to run forward as its root; the engine calls the blocks
    # directly, so settle that first (an RL stage samples before its first training forward).
    model._get_fsdp_state()._lazy_init()
    for m in sharded:
        m.unshard()
    for m in sharded[1:]:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in sharded[1:]:
            m.set_reshard_after_forward(True, recurse=False)
        for m in sharded:
            m.reshard()


def clip_grad_norm(model, max_norm):
    """Clip the global gradient norm to max_norm (0 = no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model):
    """model.state_dict() as one process holds it. Under FSDP2 it is gathered to rank 0's
    CPU (the other ranks get {}); a collective there: call it on every rank."""
    if not _fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_full())
    if not sd:
        return sd
    # The gathered dict names a tied parameter once; a plain state_dict names it under every owner.
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    params = dict(model.named_parameters(remove_duplicate=False))
    return {k: sd[k] if k in sd else sd[first[id(params[k])]] for k in model.state_dict()}


def optim_state(model, opt):
    """opt.state_dict() as one process holds it (state keyed by parameter index). Under
    FSDP2 it is gathered to rank 0's CPU (the other ranks get {}); call it on every rank."""
    if not _fsdp(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=_full())
    if not sd:
        return sd
    index = {}
    groups = [{**g, "params": [index.setdefault(f, len(index)) for f in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[f]: s for f, s in sd["state"].items()}, "param_groups": groups}


def load_optim_state(model, opt, sd):
    """The inverse of optim_state: load a full (one-process) optimizer state dict, on every rank."""
    if not _fsdp(model):
        return opt.load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    fqn = {id(p): name for name, p in model.named_parameters()}
    names = [fqn[id(p)] for g in opt.param_groups for p in g["params"]]
    groups, i = [], 0
    for g in sd["param_groups"]:
        groups.append({**g, "params": names[i:i + len(g["params"])]})
        i += len(g["params"])
    by_name = {"state": {names[k]: s for k, s in sd["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))
