"""SFT speed and peak memory of TRL's SFTTrainer, the reference side of the SFT benchmark.

Runs `trl.SFTTrainer` on a model directory and a JSONL of {"messages": [...]}
conversations (both from bench/sft_data.py), on the CPU, with packed rows of
--max-length tokens, and prints ONE JSON line: seconds per optimizer step after
the warm-up step(s), tokens per step, tokens/s, the process's peak RSS, the settings
and the library versions.

    python bench/sft_trl.py --model DIR --data FILE.jsonl --max-length 2048 --batch-size B --steps N [--bf16]

Settings (TRL's defaults unless said; each is in the JSON line):
  * packing=True with TRL's default packing_strategy "bfd": whole conversations are
    packed best-fit into rows of at most max_length (none is cut; longer ones would be
    truncated). TRL then forces padding_free=True: the B rows of a batch are flattened
    into ONE row with per-document position_ids and no attention_mask.
  * attn_implementation "sdpa" (what transformers picks on CPU; flash-attention does
    not run on CPU). With position_ids restarting at 0 and no attention_mask,
    transformers' masking_utils detects the packed documents and builds a
    block-diagonal causal mask for SDPA, so each conversation attends to itself only
    (--verify-packing checks this on the first batch). The mask is dense over the
    flattened row: (B*max_length)^2, so attention cost grows with B^2.
  * Loss on every token (assistant_only_loss=False, TRL's default): SmolLM2's
    template has no {% generation %} markers and TRL ships no training template for
    it. --assistant-only-loss uses the same template with the markers added (renders
    identically) to match a loss on assistant turns only.
  * gradient_checkpointing=True (TRL's default; --no-gradient-checkpointing turns it off).
  * fp32 weights; --bf16 trains under bf16 autocast (fp32 master weights), as
    Trainer does on CPU; without it bf16=False (SFTConfig would default to True).
  * TRL's fused LM head (always on in SFTTrainer 1.x, no switch): log-probabilities
    are computed in tiles of 4096 tokens x 32768 vocab entries without the whole
    (tokens x vocab) logits. Without Triton (CPU) the tiles are folded with plain
    torch ops, several fp32 passes over each tile (log-softmax, entropy and top-1
    for TRL's logged metrics; the backward recomputes the tile), and every position
    is scored, labelled or not; on CPU this is a large share of a step.
  * AdamW (Trainer's default optimizer), linear schedule with no warm-up, max_grad_norm 1.0.

Timing: a TrainerCallback takes wall and CPU time from on_step_begin to on_step_end
(forward, backward, clip, optimizer step; the data loading and logging between steps
are outside). Tokens: a forward pre-hook on the model counts the tokens of each
training forward (the attention mask's sum, or every token of a padding-free row).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# SmolLM2-Instruct's template with {% generation %} around what the assistant writes
# (its content and <|im_end|>); renders exactly as the original.
CHAT_TEMPLATE_GENERATION = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def versions():
    import accelerate
    import datasets
    import tokenizers
    import transformers
    import trl

    return {m.__name__: m.__version__ for m in (trl, transformers, torch, accelerate, datasets, tokenizers)} | {
        "python": sys.version.split()[0]}


def verify_packing(model, batch):
    """Max |logit difference| between the packed, padding-free forward of the first
    batch and each of its documents run alone (small for per-document attention)."""
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    was_training = model.training
    model.eval()
    worst = 0.0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()
        for s, e in list(zip(starts, starts[1:]))[:8]:  # the first 8 documents are plenty
            alone = model(input_ids=batch["input_ids"][:, s:e]).logits[0].float()
            worst = max(worst, (packed[s:e] - alone).abs().max().item())
    model.train(was_training)
    return {"documents_checked": min(8, len(starts) - 1), "documents_in_row": len(starts) - 1,
            "max_abs_logit_diff": worst}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (bench/sft_data.py make_model_dir)")
    ap.add_argument("--data", required=True, help="JSONL of {'messages': [...]} (bench/sft_data.py make_data)")
    ap.add_argument("--max-length", type=int, default=2048, help="packed row length")
    ap.add_argument("--batch-size", type=int, default=1, help="packed rows per step (per_device_train_batch_size)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps (max_steps), warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default: fp32)")
    ap.add_argument("--lr", type=float, default=2e-5, help="learning rate (TRL's default)")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                    help="turn off TRL's default gradient checkpointing")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager | flex_attention)")
    ap.add_argument("--packing-strategy", default="bfd", choices=["bfd", "bfd_split", "wrapped"])
    ap.add_argument("--assistant-only-loss", action="store_true",
                    help="loss on assistant turns only (template with {% generation %} markers)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--verify-packing", action="store_true",
                    help="before training, compare the packed forward of the first batch with its documents alone")
    a = ap.parse_args()
    if a.steps <= a.warmup:
        ap.error("--steps must be larger than --warmup")
    if a.threads:
        torch.set_num_threads(a.threads)

    import datasets
    import transformers
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    t_start = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if a.assistant_only_loss:
        tokenizer.chat_template = CHAT_TEMPLATE_GENERATION
    ds = datasets.load_dataset("json", data_files=a.data, split="train")

    config = SFTConfig(
        output_dir=os.path.join("/tmp", f"sft_trl_{os.getpid()}"),
        max_length=a.max_length,
        packing=True,
        packing_strategy=a.packing_strategy,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        logging_steps=1,
        bf16=a.bf16,
        gradient_checkpointing=a.gradient_checkpointing,
        assistant_only_loss=a.assistant_only_loss,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        use_cpu=True,
        seed=a.seed,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": a.attn},
    )
    trainer = SFTTrainer(model=a.model, args=config, train_dataset=ds, processing_class=tokenizer)
    for cb in (PrinterCallback, ProgressCallback):  # keep stdout for the JSON line
        trainer.remove_callback(cb)
    model = trainer.model
    setup_s = time.perf_counter() - t_start
    rss_before = rss_mib()

    rows = trainer.train_dataset
    row_lengths = [len(x) for x in rows["input_ids"]]

    verify = None
    if a.verify_packing:
        batch = next(iter(trainer.get_train_dataloader()))
        if "position_ids" in batch:
            verify = verify_packing(model, batch)
        else:
            verify = {"skipped": "no position_ids in the batch (not padding-free)"}

    # Tokens of each training forward (gradient checkpointing re-runs layers, not this hook).
    forwards = []

    def count(module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        pos = kwargs.get("position_ids")
        forwards.append({
            "tokens": int(mask.sum()) if mask is not None else int(ids.numel()),
            "shape": list(ids.shape),
            "loss_tokens": int((labels != -100).sum()) if labels is not None else None,
            "documents": int((pos == 0).sum()) if pos is not None and mask is None else None,
        })

    hook = model.register_forward_pre_hook(count, with_kwargs=True)

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps, self.losses = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.n = len(forwards)
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            wall, cpu = time.perf_counter() - self.t, time.process_time() - self.c
            fw = forwards[self.n:]
            self.steps.append({"wall_s": wall, "cpu_s": cpu, "tokens": sum(f["tokens"] for f in fw),
                               "loss_tokens": sum(f["loss_tokens"] or 0 for f in fw),
                               "documents": sum(f["documents"] or 0 for f in fw),
                               "shapes": [f["shape"] for f in fw], "rss_mib": rss_mib()})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 4))

    timer = Timer()
    trainer.add_callback(timer)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    hook.remove()

    timed = timer.steps[a.warmup:]
    walls = [s["wall_s"] for s in timed]
    tokens = sum(s["tokens"] for s in timed)
    out = {
        "trainer": "trl.SFTTrainer",
        "model": a.model,
        "model_config": {k: getattr(model.config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": a.data,
        "conversations": len(ds),
        "packed_rows": len(row_lengths),
        "mean_row_tokens": round(statistics.mean(row_lengths), 1),
        "max_length": a.max_length,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "warmup_steps": a.warmup,
        "dtype": "bf16-autocast" if a.bf16 else "fp32",
        "settings": {
            "packing": config.packing,
            "packing_strategy": config.packing_strategy,
            "padding_free": trainer.padding_free,
            "attn_implementation": model.config._attn_implementation,
            "assistant_only_loss": config.assistant_only_loss,
            "completion_only_loss": trainer.completion_only_loss,
            "gradient_checkpointing": config.gradient_checkpointing,
            "gradient_checkpointing_active": bool(getattr(model, "is_activation_checkpointing", None)
                                                   or getattr(model, "is_gradient_checkpointing", None)),
            "fused_lm_head": True,
            "optim": str(config.optim),
            "learning_rate": a.lr,
            "lr_scheduler": str(config.lr_scheduler_type),
            "max_grad_norm": config.max_grad_norm,
            "torch_threads": torch.get_num_threads(),
        },
        "step_wall_s": [round(w, 4) for w in walls],
        "step_cpu_s": [round(s["cpu_s"], 4) for s in timed],
        "median_step_s": round(statistics.median(walls), 4),
        "mean_step_s": round(statistics.mean(walls), 4),
        "warmup_step_s": [round(s["wall_s"], 4) for s in timer.steps[:a.warmup]],
        "tokens_per_step": [s["tokens"] for s in timed],
        "mean_tokens_per_step": round(tokens / len(timed), 1),
        "loss_tokens_per_step": [s["loss_tokens"] for s in timed],
        "documents_per_step": [s["documents"] for s in timed],
        "batch_shapes": [s["shapes"] for s in timed][:3],
        "tokens_per_s": round(tokens / sum(walls), 1),
        "tokens_per_cpu_s": round(tokens / sum(s["cpu_s"] for s in timed), 1),
        "losses": timer.losses,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_before_train_mib": round(rss_before, 1),
        "rss_after_steps_mib": [round(s["rss_mib"], 1) for s in timer.steps],
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
        "verify_packing": verify,
        "versions": versions(),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
