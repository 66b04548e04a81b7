"""LoRA (Hu et al. 2021) for every training stage, through the `peft` library.

A stage's Config inherits Options; with lora_r > 0 the stage calls wrap(model, c):
peft injects low-rank adapters W x + (alpha / r) B A x into the named nn.Linear
modules *in place* (the model stays shoggoth's GPT or RewardModel, so the engine,
DDP and FSDP2 see the same modules as in full fine-tuning), and freezes everything
else. Shoggoth's modules carry Hugging Face's names (q_proj, ..., down_proj), so
the adapters are peft's ordinary ones for the transformers model of the same
directory: save_adapter writes them as PeftModel.save_pretrained does.

The reference of PPO, GRPO and DPO is the policy under disabled(): adapters off,
no second copy. Outputs: the merged Hugging Face directory (merged()) as in full
fine-tuning, plus out/adapter in peft's format. Resume checkpoints hold only what
trains (checkpoint.trained): the frozen rest is the input directory's.

peft is imported only when a stage uses LoRA (it takes seconds to import).
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ShoggothError

# The projections of a Llama-family block, by their Hugging Face names. Embeddings and the
# output head are left out: the model reads lm_head.weight directly in its loss.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # peft's name of a model's one adapter


@dataclass
class Options:
    """The LoRA fields of every fine-tuning stage's Config (flags --lora-r, --lora-alpha, ...)."""

    lora_r: int = 0  # LoRA rank: train rank-r adapters (peft) on lora_targets, the rest frozen; 0 = full fine-tuning
    lora_alpha: float = 0.0  # LoRA scale numerator: adapters add (alpha / r) B A x; 0 = 2 * lora_r
    lora_dropout: float = 0.0  # dropout on the adapters' input while training (SFT, reward, DPO; 0 in PPO and GRPO)
    lora_targets: list[str] = field(default_factory=lambda: list(TARGETS))  # modules given adapters (HF names)


def lora_config(o: Options):
    """The peft LoraConfig of a stage's options, or a clear error for bad ones."""
    from peft import LoraConfig

    bad = sorted(set(o.lora_targets) - set(TARGETS))
    if bad or not o.lora_targets:
        raise ShoggothError(f"--lora-targets: {', '.join(bad) or 'none given'}; choose among {', '.join(TARGETS)}")
    if o.lora_r < 0 or o.lora_alpha < 0 or not 0 <= o.lora_dropout < 1:
        raise ShoggothError(f"LoRA needs lora_r >= 0, lora_alpha >= 0, 0 <= lora_dropout < 1 "
                            f"(got {o.lora_r}, {o.lora_alpha}, {o.lora_dropout})")
    return LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha or 2 * o.lora_r, lora_dropout=o.lora_dropout,
                      target_modules=sorted(set(o.lora_targets)))


def wrap(model, o: Options, seed, trained=()):
    """Inject o's adapters into model in place (a no-op when o.lora_r is 0) and return it.
    Only the adapters train, and the modules named in `trained` (a reward or value head).
    A starts random (seeded: every rank and every resumed run builds the same), B at zero,
    so the wrapped model computes what it did before."""
    if not o.lora_r:
        return model
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(o), model, adapter_name=ADAPTER)
    for _, m in layers(model):
        # peft casts each adapter's input to the adapter's dtype (fp32) before autocast casts it
        # back to bf16: the same numbers, plus one more saved bf16 copy of the input per
        # projection (a 4 x 512-token forward at SmolLM2-135M's shape saved 2,361 MiB instead of 2,159).
        m.cast_input_dtype_enabled = False
    for name in trained:
        getattr(model, name).requires_grad_(True)
    return model


def layers(model):
    """(name, module) of every LoRA layer of model."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A")]


@contextmanager
def disabled(model):
    """Inside, model computes as its base: every adapter off (the reference model of the RL
    stages; the reward model under the value model's adapters). A no-op without adapters."""
    found = [m for _, m in layers(model)]
    for m in found:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in found:
            m.enable_adapters(True)


def weight(linear):
    """The weight an nn.Linear, or a LoRA layer, applies: a LoRA layer's base weight plus
    (alpha / r) B A while its adapter is on (what the engine packs for decoding)."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight
    if linear.disable_adapters or linear.merged:
        return base.weight
    return base.weight + linear.get_delta_weight(ADAPTER)


def merged(model, sd):
    """State dict sd of model (its own, or gathered from FSDP2 shards) with the adapters
    merged in: W + (alpha / r) B A under the plain names, as if trained in full. sd itself
    when model has no adapters."""
    found = layers(model)
    if not found:
        return sd
    out = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
    for name, m in found:
        a, b = sd[f"{name}.lora_A.{ADAPTER}.weight"].float(), sd[f"{name}.lora_B.{ADAPTER}.weight"].float()
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + m.scaling[ADAPTER] * (b @ a)).to(w.dtype)
    return out


def summary(model):
    """'; LoRA: N of M parameters trained (x%)' for a stage's opening line; '' without adapters."""
    if not layers(model):
        return ""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"; LoRA: {n:,} of {total:,} parameters trained ({100 * n / total:.2f}%)"


def save_adapter(model, sd, out_dir, base_dir, heads=()):
    """Write model's adapter in peft's own format to out_dir (adapter_config.json,
    adapter_model.safetensors): `PeftModel.from_pretrained(AutoModelFor...(base_dir), out_dir)`
    computes what the merged output does. heads: modules trained in full besides the
    adapters (a reward model's score), saved whole as peft's modules_to_save are; a model
    with a score head is peft's SEQ_CLS task, else CAUSAL_LM. sd as for merged(). Returns
    what the stage's closing line adds; a no-op ('') without adapters."""
    from safetensors.torch import save_file

    from ..data.files import atomic_write

    if not layers(model):
        return ""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model.peft_config[ADAPTER])
    cfg.base_model_name_or_path = str(Path(base_dir).resolve())
    cfg.task_type = "SEQ_CLS" if hasattr(model, "score") else "CAUSAL_LM"
    cfg.modules_to_save = list(heads) or None
    cfg.inference_mode = True
    cfg.save_pretrained(str(out))
    # PeftModel's own names: its wrapper's prefix, without the adapter's name.
    tensors = {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v for k, v in sd.items()
               if ".lora_" in k or k.split(".")[0] in heads}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return f" and its LoRA adapter (peft) in {out}"
