"""What every training stage shares, in one place each: the common Config fields, the set-up
(process group, resume state, wrap, AdamW, optimizer resume), the lr setting, the optimizer
step (clip, the non-finite check on loss and grad norm, step) and the final save.

Each stage's loop stays written out in its own file (stages/*.py); a stage reads

    d, out, state, ckpt_path = stage.begin(c, MAY_CHANGE)
    ...  # load the model, its resume weights
    train_model, opt, step = stage.train_setup(model, c, d, amp_dtype, state, ckpt_path)
    while step < total:
        step += 1
        lr = stage.set_lr(opt, c, step, total)
        ...  # forward, backward
        grad_norm = stage.optimizer_step(opt, model, c, out, f"step {step}", loss)
    stage.finish(d, metrics, model, dist.model_state(model), out, c.init)
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..lm import checkpoint, lora
from . import dist, optim
from ..errors import TrainingError
from .rl import split_state


@dataclass
class Common:
    """The fields of every stage's Config; a stage redeclares those whose default it changes."""

    out: str = "runs/out"  # output Hugging Face model directory
    lr: float = 1e-4  # peak learning rate
    min_lr_frac: float = 0.1  # final lr as a fraction of the peak (cosine decay; 1 = constant)
    warmup_steps: int = 10  # linear warmup, in optimizer steps
    weight_decay: float = 0.0  # AdamW decay on matrices (not on norms or biases)
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    dtype: str = "auto"  # auto | bf16 | fp32: autocast dtype (auto = bf16 where fast)
    grad_ckpt: str = "auto"  # auto | on | off: keep only each block's input and recompute the block in backward (less memory, about 1/3 more compute, same numbers); auto = on where the step would not fit the memory otherwise (every stage but pretraining sizes it; there off)
    fsdp: bool = False  # under torchrun, shard weights, grads and optimizer state over ranks (FSDP2) instead of DDP
    device: str = ""  # cpu | cuda; empty = cuda when available
    eval_every: int = 50  # steps between held-out evaluations
    ckpt_every: int = 50  # steps between resume checkpoints
    keep: int = 3  # resume checkpoints kept
    resume: bool = False  # continue from the last checkpoint in out/checkpoints
    seed: int = 1337  # seeds the data order, sampling and any new weights
    report_to: list[str] = field(default_factory=lambda: ["auto"])  # trackers: auto (TensorBoard if installed), none, tensorboard, wandb, mlflow, trackio


# Common fields a resumed run may change; each stage adds its own. The rest must match the checkpoint's.
MAY_CHANGE = frozenset({"eval_every", "ckpt_every", "keep", "resume", "device", "fsdp", "out", "report_to", "grad_ckpt"})


def begin(c, may_change, auto=()):
    """(d, out, state, ckpt_path): the process group of c.device, the output directory and,
    with c.resume, the last checkpoint's state (checkpoint.resume_state; None without)."""
    d = dist.setup(c.device)
    out = Path(c.out)
    state, ckpt_path = checkpoint.resume_state(out, c, c.resume, may_change, auto)
    return d, out, state, ckpt_path


def grad_ckpt(models, c, need=0, have=0):
    """Turn activation checkpointing on or off in the blocks of models (each a GPT or RewardModel)
    as c.grad_ckpt says; with auto, on where the stage's memory sizing says the step needs more
    bytes than it has (need > have; a stage without sizing passes neither: auto is off).
    Returns whether it is on and what the stage's start-up line adds ('' when off)."""
    on = c.grad_ckpt == "on" or (c.grad_ckpt == "auto" and need > have)
    for m in models:
        m.model.grad_ckpt = on
    if not on:
        return False, ""
    why = f" (auto: the step needs {need / 2**30:.3g} GiB, {have / 2**30:.3g} GiB available)"
    return True, ", grad-ckpt on" + (why if c.grad_ckpt == "auto" else "")


def memory_budget(c, d):
    """(bytes, whence) a micro-step of a stage with --max-memory (c.max_memory, GiB) may use (weights,
    AdamW state, activations): --max-memory, or half the memory available now (the GPU's on CUDA); the
    least any rank of d (dist.setup's) has, so that every rank sizes its steps alike."""
    if c.max_memory:
        return int(c.max_memory * 2**30), "--max-memory"
    available = 16 * 2**30  # where the machine does not say
    if d.device.type == "cuda":
        available = torch.cuda.mem_get_info(d.device)[0]
    elif Path("/proc/meminfo").exists():
        found = [ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable:")]
        available = int(found[0]) * 1024 if found else available
    return int(dist.all_min(torch.tensor(available // 2, device=d.device))), "half the memory available"


def sized_ckpt(models, c, d, tokens):
    """grad_ckpt with the memory sizing of a step that puts `tokens` tokens through each of models at
    once: (on, the start-up line's note, the budget in bytes, whence): checkpointing (auto) where their
    weights, AdamW state and activations would not fit the memory budget (the least any rank has)."""
    budget, whence = memory_budget(c, d)
    need = sum(weight_bytes(m) + activation_bytes(m, False) * tokens for m in models)
    return (*grad_ckpt(models, c, need, budget), budget, whence)


def micro_steps(model, c, d, share, item_tokens, name, item):
    """(items per micro-step, the start-up line's note) for a stage whose step puts `share` items (pairs,
    rankings) of at most item_tokens tokens each through model on this rank: checkpointing (auto) where
    the whole share would not fit the memory budget (the least any rank has), then as many items per
    micro-step as fit, said when fewer than the share."""
    ckpt, note, budget, whence = sized_ckpt([model], c, d, item_tokens * share)
    per = int(max(1, min(share, (budget - weight_bytes(model)) // (activation_bytes(model, ckpt) * item_tokens))))
    if per < share:
        dist.print0(f"{name}: {per} {item}(s) per micro-step per process, to fit {budget / 2**30:.3g} GiB ({whence})")
    return per, note


def weight_bytes(model):
    """Weights and AdamW state: 16 bytes per trained parameter, 4 per frozen one (LoRA)."""
    return sum(p.numel() * (16 if p.requires_grad else 4) for p in model.parameters())


def activation_bytes(model, ckpt):
    """Activations kept for backward, in bytes per token. Without checkpointing about 29 per
    layer and unit of n_embd + intermediate_size under autocast (61 KB per token and layer
    measured at SmolLM2-135M's shape in bf16: bench/RESULTS.md); with it, each block's fp32
    input plus the activations of the one block being recomputed."""
    c = model.config
    block = 29 * (c.n_embd + c.intermediate_size)
    return 4 * c.n_layer * c.n_embd + block if ckpt else c.n_layer * block


def train_setup(model, c, d, amp_dtype, state, ckpt_path, betas=(0.9, 0.95), blocks=None, unit="step"):
    """(train_model, opt, step) of a model whose resume weights are loaded: model wrapped for
    d's ranks (dist.wrap: DDP, or FSDP2 in place), AdamW over what trains, and with a resume
    state the optimizer's state and the step it reached."""
    train_model = dist.wrap(model, d, c.fsdp, amp_dtype, blocks=blocks)
    opt = optim.adamw(model, c.lr, c.weight_decay, betas)
    step = 0
    if state:
        dist.load_optim_state(model, opt, state["optim"])
        step = state["step"]
        dist.print0(f"resumed from {ckpt_path} ({unit} {step})")
    return train_model, opt, step


def set_lr(opt, c, step, total):
    """Set and return the lr of optimizer step `step` (from 1) of `total`: c's warmup and cosine decay."""
    lr = optim.cosine_lr(step, total, c.lr, c.warmup_steps, c.min_lr_frac)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(opt, model, c, out, where, loss):
    """Clip model's global grad norm to c.grad_clip, refuse a non-finite loss or grad norm
    (naming the last good checkpoint of out), step and zero the gradients. loss: the step's
    loss, the same on every rank (reduced over ranks), so that every rank stops together.
    Returns the grad norm before clipping."""
    norm = dist.clip_grad_norm(model, c.grad_clip)
    loss = float(loss)
    if not (torch.isfinite(norm) and torch.isfinite(torch.tensor(loss))):
        raise TrainingError(f"{where}: loss {loss:.4g}, grad norm {norm.item():.4g}: not finite; stopped without "
                            f"updating. Last good checkpoint: {checkpoint.latest_checkpoint(out) or 'none'} "
                            "(lower --lr, then --resume)")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def save_checkpoint(out, step, model, opt, c, split=False, **extra):
    """Every rank calls this: rank 0 writes out/checkpoints/step_NNNNNN.pt (what trains of model,
    checkpoint.trained: under "model", or with split each model of an rl.PolicyValue under its
    own name; the optimizer state, extra, c), in the one-process format gathered first under FSDP2;
    the others wait for it. Every rank resumes from it."""
    sd = checkpoint.trained(model, dist.model_state(model))
    if split:
        sd = split_state(sd)
    models = sd if split else {"model": sd}
    optim_sd = dist.optim_state(model, opt)
    if dist.is_main():
        checkpoint.save_checkpoint(out, step, {**models, "optim": optim_sd, **extra, "config": asdict(c)}, keep=c.keep)
    dist.barrier()


def finish(d, metrics, model, sd, out, base_dir, shift=None, note=""):
    """The end of a stage: rank 0 saves model with state dict sd (dist.model_state's: adapters
    merged in) as the Hugging Face directory out, with base_dir's tokenizer files; a reward model
    (shift given) as a sequence-classification model with its shift. With LoRA the adapter also
    goes to out/adapter. Then the metrics file closes and the process group ends."""
    if d.main:
        what = "model directory"
        if shift is None:
            checkpoint.save_pretrained(model, out, tokenizer_dir=base_dir, state_dict=lora.merged(model, sd))
        else:
            what = "sequence-classification model"
            checkpoint.save_reward(model, out, shift, tokenizer_dir=base_dir, state_dict=lora.merged(model, sd))
        heads = ("score",) if shift is not None else ()
        note += lora.save_adapter(model, sd, Path(out) / "adapter", base_dir, heads=heads)
        dist.print0(f"saved Hugging Face {what} {out}{note}")
    metrics.close()
    dist.cleanup()
    return out
