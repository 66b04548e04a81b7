"""Supervised fine-tuning: learn to answer like an assistant from human-written conversations.

    shoggoth sft --init runs/pretrain --out runs/sft            # built-in chatterbot-corpus
    shoggoth sft --init DIR --data chats.jsonl --out runs/sft   # TRL messages or prompt/completion JSONL

Conversations are rendered with the model directory's chat template; the loss
covers what each assistant turn writes, through its end-of-turn token, only
(tokenizer.Tok.render_chat). Examples are packed into rows of seq_len; per-example
positions and attention kept within each example (model.Documents: no (T, T)
mask) make packing change speed, not the math.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..lm import checkpoint, lora, tokenizer
from ..data.conversations import chatterbot_conversations, collate, encode_conversations, pack, read_conversations
from ..train import dist, stage
from ..errors import ShoggothError
from ..train.metrics import Metrics, peak_flops
from ..lm.model import Documents
from ..lm.sampling import chat_reply


@dataclass
class Config(lora.Options, stage.Common):
    """Supervised fine-tuning on conversations (loss on assistant turns only)."""

    init: str = ""  # model directory to fine-tune (a pretrain output or a Hugging Face Llama/Qwen directory or hub id)
    revision: str = ""  # branch, tag or commit of --init when it is a hub id; empty = main
    data: str = ""  # {"messages": [...]} or {"prompt", "completion"} records: JSONL, Parquet, Arrow, a save_to_disk folder or a hub ID:SPLIT; empty = built-in chatterbot-corpus
    eval_data: str = ""  # held-out conversations (as --data); empty = the built-in held-out questions, or 5% of --data
    out: str = "runs/sft"
    skip_invalid: bool = False  # skip (and count) invalid rows instead of stopping at the first
    seq_len: int = 0  # packed row length; 0 = the longest example (rounded up to 64), at most the model's context
    batch_size: int = 0  # packed rows per micro-step, summed over ranks; 0 = up to 8,192 tokens, fewer if memory is short
    max_memory: float = 0.0  # GiB a micro-step may use (weights, AdamW state, activations), for --batch-size 0 and --grad-ckpt auto; 0 = half the memory available now
    grad_accum: int = 1  # micro-steps per optimizer step
    epochs: int = 3  # passes over the training conversations
    max_steps: int = 0  # stop after this many steps; 0 = run all epochs
    lr: float = 1e-3
    warmup_steps: int = 20
    eval_every: int = 50  # steps between held-out losses
    sample_every: int = 100  # steps between held-out answers printed; 0 = never


MAY_CHANGE = stage.MAY_CHANGE | {"max_steps", "sample_every", "max_memory"}


def load_conversations(c: Config, log):
    """(train, held-out) conversations from the flags."""
    if not c.data:
        train, held = chatterbot_conversations("train"), chatterbot_conversations("heldout")
        log(f"data: built-in chatterbot-corpus: {len(train)} train / {len(held)} held-out conversations (split by question)")
        return train, held
    train = read_conversations(c.data, c.skip_invalid, log)
    if c.eval_data:
        return train, read_conversations(c.eval_data, c.skip_invalid, log)
    n = max(1, len(train) // 20) if len(train) > 1 else 0
    return train[n:], train[:n] or train


def micro_rows(free, per_token, seq_len, budget, log):
    """Rows per micro-step per process when --batch-size is 0: up to 8,192 tokens, fewer
    where their activations (per_token bytes each) would not fit in `free` bytes of the
    budget (its size and whence, for the message)."""
    fits = free // per_token
    rows = max(1, min(8192, max(seq_len, fits)) // seq_len)
    if fits < 8192:
        log(f"sft: {rows} row(s) of {seq_len} tokens per micro-step per process, to fit {budget[0] / 2**30:.3g} GiB "
            f"({budget[1]}); raise --grad-accum for larger batches")
    return rows


def run(c: Config):
    if not c.init:
        raise ShoggothError("sft: --init DIR is required (a pretrain output or a Hugging Face model directory)")
    d, out, state, ckpt_path = stage.begin(c, MAY_CHANGE, auto={"seq_len", "batch_size"})

    model = lora.wrap(checkpoint.load_pretrained(c.init), c, c.seed)
    tok = tokenizer.load(c.init)
    tok.check_model(model.config.vocab_size, c.init)
    limit = c.seq_len or model.config.max_seq_len
    train_convs, held_convs = load_conversations(c, dist.print0)
    train, cut = encode_conversations(train_convs, tok, limit)
    held, held_cut = encode_conversations(held_convs, tok, limit)
    if not train:
        raise ShoggothError(f"{c.data or 'the built-in data'}: no conversation has an assistant turn to train on")
    # Rows as long as the data needs, not the model's context (8,192 to 128K tokens for real
    # checkpoints); rows per micro-step that fit the memory, the same on every rank, and kept
    # by a resumed run (its checkpoint holds them), so that it sees the same batches.
    # Checkpointing (auto) where the rows asked for, or one, would not fit without it.
    saved = state["config"] if state else {}
    seq_len = c.seq_len or saved.get("seq_len") or min(limit, 64 * math.ceil(max(len(x) for x, _ in train + held) / 64))
    asked = c.batch_size or saved.get("batch_size")
    rows = math.ceil(asked / d.world) if asked else 1  # this rank's rows per micro-step (at least one)
    ckpt, ckpt_note, budget, whence = stage.sized_ckpt([model], c, d, seq_len * rows)
    batch_size = asked or d.world * micro_rows(budget - stage.weight_bytes(model), stage.activation_bytes(model, ckpt), seq_len,
                                               (budget, whence), dist.print0)
    c = dataclasses.replace(c, seq_len=seq_len, batch_size=batch_size)  # what the checkpoints record
    n_loss = sum(int((y != -100).sum()) for _, y in train)
    dist.print0(f"data: {len(train)} train / {len(held)} held-out examples, {n_loss:,} trained tokens per epoch; "
                f"{cut + held_cut} truncated to {limit} tokens")

    # Every epoch's packed batches, fixed by the seed: step s always sees the same batch.
    batches = []
    for epoch in range(c.epochs):
        order = np.random.default_rng([c.seed, epoch]).permutation(len(train))
        rows = pack(train, seq_len, order)
        batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    total = len(batches) // c.grad_accum
    if c.max_steps:
        total = min(total, c.max_steps)
    held_rows = pack(held, seq_len, range(len(held)))

    if state:
        checkpoint.load_trained(model, state["model"], ckpt_path)
    amp_dtype = dist.autocast_dtype(d.device, c.dtype)
    train_model, opt, step = stage.train_setup(model, c, d, amp_dtype, state, ckpt_path)
    amp = dist.autocast(d.device, amp_dtype)
    peak = peak_flops(d.device, amp_dtype) * d.world
    metrics = Metrics(out, total, resume_step=step, enabled=d.main, config=c)
    dist.print0(f"sft: {model.num_params():,} parameters, {total} steps ({c.epochs} epoch(s), {batch_size} rows "
                f"x {seq_len} tokens per micro-step), autocast {amp_dtype}{lora.summary(model)}{ckpt_note}")

    def micro_loss(examples, rows):
        """This rank's rows of a global batch: (sum of token losses, global count of loss tokens)."""
        ids, labels, pos, seg = collate(examples, rows, seq_len, tok.pad_id)
        count = (labels != -100).sum().to(d.device, torch.float32)
        share = slice(d.rank * len(rows) // d.world, (d.rank + 1) * len(rows) // d.world)
        if share.start == share.stop:  # fewer rows than ranks: run one row without loss tokens, so collectives match
            share, labels = slice(0, 1), torch.full_like(labels, -100)
        ids, labels, pos, seg = (t[share].to(d.device) for t in (ids, labels, pos, seg))
        logits = train_model(ids, pos=pos, mask=Documents(seg))
        loss_sum = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
        return loss_sum, count

    def evaluate():
        model.eval()
        total_loss, total_n = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
        with torch.no_grad(), amp:
            for i in range(0, len(held_rows), batch_size):
                s, n = micro_loss(held, held_rows[i:i + batch_size])
                total_loss += dist.all_mean(s) * d.world
                total_n += n
        model.train()
        return (total_loss / total_n).item()

    def save():
        stage.save_checkpoint(out, step, model, opt, c)  # rank 0 writes (gathered under FSDP); all resume from it

    if step == 0:
        metrics.log(0, val_loss=evaluate())
    model.train()
    while step < total:
        step += 1
        t0 = dist.clock(d.device)
        lr = stage.set_lr(opt, c, step, total)
        micro_batches = batches[(step - 1) * c.grad_accum: step * c.grad_accum]
        # Normalise by the loss tokens of the whole optimizer step, over all ranks; DDP
        # averages gradients over ranks, hence the factor world.
        n_tokens = sum(sum(int((train[i][1] != -100).sum()) for row in rows for i in row) for rows in micro_batches)
        loss_total, tokens = torch.zeros((), device=d.device), 0
        for micro, rows in enumerate(micro_batches):
            with amp, dist.grad_sync(train_model, micro == len(micro_batches) - 1):
                s, n = micro_loss(train, rows)
                (s * d.world / n_tokens).backward()
            loss_total += s.detach()
            tokens += sum(len(train[i][0]) for row in rows for i in row)
        loss_val = (dist.all_mean(loss_total) * d.world / n_tokens).item()
        grad_norm = stage.optimizer_step(opt, model, c, out, f"step {step}", loss_val)
        dt = dist.clock(d.device) - t0
        mfu = model.flops_per_token(seq_len) * tokens / dt / peak
        metrics.log(step, loss=loss_val, lr=lr, grad_norm=grad_norm.item(), **{"tok/s": tokens / dt}, mfu=mfu)
        if step % c.eval_every == 0 or step == total:
            metrics.log(step, val_loss=evaluate())
        if (d.main or c.fsdp) and c.sample_every and (step % c.sample_every == 0 or step == total):
            with dist.full_weights(model):  # under FSDP every rank gathers the weights and samples
                print_answers(model, tok, held_convs[:: max(1, len(held_convs) // 3)][:3], show=d.main)
        if step % c.ckpt_every == 0 or step == total:
            save()

    return stage.finish(d, metrics, model, dist.model_state(model), out, c.init)


def print_answers(model, tok, convs, show=True):
    for conv in convs:
        prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
        answer = chat_reply((model, tok), prompt, max_new_tokens=48, temperature=0.0)
        if show:
            print(f"  user> {prompt[-1]['content']}\n  assistant> {answer}", flush=True)
