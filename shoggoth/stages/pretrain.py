"""Pretraining: next-token prediction on raw text, from scratch or from a Hugging Face model.

    shoggoth pretrain --config demo-cpu --out runs/pretrain
    torchrun --nproc_per_node 8 -m shoggoth pretrain --config gpt2-124m --corpus data/ --out runs/p

The loop is written out: lr schedule, micro-steps, clip, step, log, eval,
sample, checkpoint. The output directory is a Hugging Face LlamaForCausalLM
directory; resume state lives in out/checkpoints/.
"""

import math
from dataclasses import dataclass, field

import torch

from ..lm import checkpoint, tokenizer
from ..data.corpus import read_corpus
from ..data.shards import TokenShards, build_shards
from ..train import dist, stage
from ..errors import ShoggothError
from ..train.metrics import Metrics, peak_flops
from ..lm.model import GPT, GPTConfig
from ..lm.sampling import complete


@dataclass
class Config(stage.Common):
    """Pretrain a GPT by next-token prediction on raw text."""

    corpus: list[str] = field(default_factory=list)  # .txt/.md files, folders, JSONL with "text" (or Parquet, Arrow, a save_to_disk folder, a hub ID:SPLIT), builtin:bible, builtin:chitchat; empty = builtin:bible
    out: str = "runs/pretrain"
    init: str = ""  # continue from this Hugging Face model directory or hub id (Llama/Qwen2/Qwen3); its tokenizer is used
    revision: str = ""  # branch, tag or commit of --init when it is a hub id; empty = main
    tokenizer: str = ""  # tokenizer directory or hub id (at main); empty = train one on the corpus (or use init's)
    vocab_size: int = 4096  # vocabulary of a newly trained tokenizer
    n_layer: int = 4  # decoder blocks (ignored with --init)
    n_head: int = 4  # attention heads
    n_kv_head: int = 0  # key/value heads; 0 = n_head
    n_embd: int = 256  # residual width
    seq_len: int = 256  # tokens per training sequence
    rope_theta: float = 10000.0  # RoPE base
    tie_embeddings: bool = True  # share the input embedding with the output projection
    batch_size: int = 16  # sequences per micro-step, summed over all ranks
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000  # optimizer steps
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    compile: bool = False  # torch.compile the model
    val_every: int = 50  # hold out every N-th document for the validation loss
    eval_every: int = 100  # steps between validation losses
    eval_batches: int = 8  # batches per validation loss
    sample_every: int = 250  # steps between printed samples; 0 = never
    sample_tokens: int = 48  # tokens per printed sample
    ckpt_every: int = 100


# Fields a resumed run may change; the rest must match the checkpoint's.
MAY_CHANGE = stage.MAY_CHANGE | {"max_steps", "eval_batches", "sample_every", "sample_tokens", "compile"}
SAMPLE_PROMPTS = ["In the beginning", "And the LORD said", "Blessed are"]


def new_model(c: Config, vocab):
    """A fresh GPT of c's shape for a vocabulary of `vocab` tokens (rounded up to a multiple of 64)."""
    return GPT(GPTConfig(vocab_size=64 * math.ceil(vocab / 64), n_layer=c.n_layer, n_head=c.n_head,
                         n_kv_head=c.n_kv_head, n_embd=c.n_embd, max_seq_len=c.seq_len, rope_theta=c.rope_theta,
                         tie_embeddings=c.tie_embeddings))


def run(c: Config):
    d, out, state, ckpt_path = stage.begin(c, MAY_CHANGE)
    if c.batch_size % d.world:
        raise ShoggothError(f"batch_size {c.batch_size} (summed over ranks) is not a multiple of the {d.world} ranks")
    out.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer and data (rank 0 builds, the others wait and read)
    if c.init:
        tok_dir = c.init
    elif c.tokenizer:
        tok_dir = c.tokenizer
    else:
        tok_dir = out
        if d.main and not (out / "tokenizer.json").exists():
            dist.print0(f"tokenizer: training a {c.vocab_size}-token byte-level BPE on the corpus")
            tokenizer.save(tokenizer.train(read_corpus(c.corpus), c.vocab_size), out, c.seq_len)
    dist.barrier()
    tok = tokenizer.load(tok_dir)
    if d.main:
        build_shards(c.corpus, tok, out / "tokens", c.val_every, log=dist.print0)
    dist.barrier()
    shards = TokenShards(out / "tokens", seed=c.seed)

    # ---- model and optimizer
    torch.manual_seed(c.seed)
    if c.init:
        model = checkpoint.load_pretrained(c.init)
        if c.seq_len > model.config.max_seq_len:
            raise ShoggothError(f"seq_len {c.seq_len} exceeds {c.init}'s max_position_embeddings {model.config.max_seq_len}")
    else:
        model = new_model(c, len(tok))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = \
        tok.bos_id, tok.eos_id, tok.pad_id if tok.has_pad else None
    tok.check_model(model.config.vocab_size, tok_dir)
    if state:
        model.load_state_dict(state["model"])
    amp_dtype = dist.autocast_dtype(d.device, c.dtype)
    _, ckpt_note = stage.grad_ckpt([model], c)
    train_model, opt, step = stage.train_setup(model, c, d, amp_dtype, state, ckpt_path, (c.beta1, c.beta2))
    if c.compile:
        train_model = torch.compile(train_model)

    amp = dist.autocast(d.device, amp_dtype)
    tokens_per_step = c.batch_size * c.grad_accum * c.seq_len
    flops_per_step = model.flops_per_token(c.seq_len) * tokens_per_step
    peak = peak_flops(d.device, amp_dtype) * d.world
    dist.print0(f"model: {model.num_params():,} parameters, {model.config.n_layer} layers, d={model.config.n_embd}; "
                f"{tokens_per_step:,} tokens/step on {d.world} {d.device.type} process(es), autocast {amp_dtype}{ckpt_note}; "
                f"train {shards.tokens('train'):,} tokens ({step * tokens_per_step / max(1, shards.tokens('train')):.2f} epochs done)")
    metrics = Metrics(out, c.max_steps, resume_step=step, enabled=d.main, config=c)

    def evaluate():
        model.eval()
        losses = []
        with torch.no_grad(), amp:
            for i in range(c.eval_batches):
                x, y = shards.batch("val", c.batch_size, c.seq_len, step=i, rank=d.rank, world=d.world)
                losses.append(model(x.to(d.device), y.to(d.device)))
        model.train()
        return dist.all_mean(torch.stack(losses).mean()).item()

    def save():
        stage.save_checkpoint(out, step, model, opt, c)  # rank 0 writes (gathered under FSDP); all resume from it

    # ---- the loop
    model.train()
    while step < c.max_steps:
        step += 1
        t0 = dist.clock(d.device)
        lr = stage.set_lr(opt, c, step, c.max_steps)
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(c.grad_accum):
            x, y = shards.batch("train", c.batch_size, c.seq_len, step, micro, d.rank, d.world)
            x, y = x.to(d.device), y.to(d.device)
            with amp, dist.grad_sync(train_model, micro == c.grad_accum - 1):
                loss = train_model(x, y) / c.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        loss_val = dist.all_mean(loss_sum).item()
        grad_norm = stage.optimizer_step(opt, model, c, out, f"step {step}", loss_val)
        dt = dist.clock(d.device) - t0
        metrics.log(step, loss=loss_val, lr=lr, grad_norm=grad_norm.item(), **{"tok/s": tokens_per_step / dt},
                    mfu=flops_per_step / dt / peak, dt=dt)
        if step % c.eval_every == 0 or step == c.max_steps:
            metrics.log(step, val_loss=evaluate())
        if (d.main or c.fsdp) and c.sample_every and (step % c.sample_every == 0 or step == c.max_steps):
            with dist.full_weights(model):  # under FSDP every rank gathers the weights and samples
                print_samples(model, tok, c.sample_tokens, show=d.main)
        if step % c.ckpt_every == 0 or step == c.max_steps:
            save()

    return stage.finish(d, metrics, model, dist.model_state(model), out, tok_dir)


def print_samples(model, tok, n_tokens, show=True):
    texts = complete((model, tok), SAMPLE_PROMPTS, max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=0)
    for prompt, text in zip(SAMPLE_PROMPTS, texts):
        if show:
            print(f"  sample> {prompt}{text}".replace("\n", " / "), flush=True)
