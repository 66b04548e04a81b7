"""Hugging Face model directories in and out, and atomic resume checkpoints.

Every stage reads and writes a Hugging Face directory (config.json,
model.safetensors, tokenizer files, generation_config.json). Resume state
(weights, optimizer, step) lives in `out_dir/checkpoints/step_NNNNNN.pt`.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelDirError, ShoggothError
from ..data.files import atomic_write, looks_local, write_json
from .model import GPT, GPTConfig, RewardModel

# What a model directory says about its text, copied unchanged from a stage's input to its output.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "generation_config.json")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# ---------------------------------------------------------------- hub ids

# What a stage reads of a hub repository; a download skips the rest (Llama repos also hold their
# original/ weights, others ONNX or GGUF files: gigabytes that nothing here reads).
MODEL_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES)


def resolve(name, revision="", files=MODEL_FILES):
    """The local directory of a model argument: a path that exists, as given; otherwise a Hugging
    Face hub id (`org/name` or `name`) at `revision` (empty: main), from the hub cache or downloaded
    into it by huggingface_hub, which honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and the saved
    token. A missing path that cannot be an id (./x, /x, ~/x, a/b/c) comes back as given, for the
    loader's "no such model directory"."""
    if not name or os.path.exists(name) or looks_local(name):
        if revision:
            raise ModelDirError(f"--revision {revision}: {name!r} is a local path, and a revision picks a version "
                                f"of a Hugging Face hub id")
        return name
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    what = f"model {name!r}" + (f" (revision {revision!r})" if revision else "")
    cache = constants.HF_HUB_CACHE
    try:
        return snapshot_download(name, revision=revision or None, allow_patterns=list(files))
    except HFValidationError as e:
        raise ModelDirError(f"model {name!r} is not a local directory, nor a valid Hugging Face hub id ({e})") from None
    except IncompleteSnapshotError:
        raise ModelDirError(f"{what} is only partly in the Hugging Face cache {cache} and the hub cannot be reached: "
                            f"finish the download on a machine with access, or give a directory") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelDirError(f"{what} is not a local directory and is not in the Hugging Face cache {cache} ({why}): "
                            f"download it on a machine with access, or give a directory") from None
    except RevisionNotFoundError:
        raise ModelDirError(f"model {name!r} has no revision {revision!r} on the Hugging Face hub") from None
    except GatedRepoError:
        raise ModelDirError(f"{what} is gated: accept its terms on huggingface.co, then log in (`hf auth login` "
                            f"or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelDirError(f"{what} is not a local directory, nor a model on the Hugging Face hub that this token "
                            f"may read (a private one needs `hf auth login` or HF_TOKEN)") from None
    except OSError as e:  # the hub's other HTTP errors (a 5xx), a full disk or an unwritable cache
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelDirError(f"{what}: download into the Hugging Face cache {cache} failed ({first})") from None


# ---------------------------------------------------------------- HF config


def hf_config(c: GPTConfig, dtype="float32"):
    """GPTConfig -> the config.json of the matching Hugging Face architecture."""
    if c.qk_norm and c.qkv_bias:
        raise ModelDirError("q/k norm together with q/k/v bias has no Hugging Face architecture")
    model_type = "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias else "llama"
    d = {
        "architectures": [ARCHS[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        # transformers 5 reads rope_parameters; older releases and other tools read rope_theta.
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if c.rope_scaling:
        if model_type != "llama":
            raise ModelDirError("llama3 RoPE scaling is a Llama architecture's")
        d["rope_scaling"] = {"rope_type": "llama3", **c.rope_scaling}
        d["rope_parameters"] = {**d["rope_parameters"], **d["rope_scaling"]}
    if model_type == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    elif model_type == "qwen3":
        d.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    return d


def gpt_config(d: dict, where="config.json"):
    """A Hugging Face config.json (Llama, Qwen2, Qwen3) -> GPTConfig, or a clear error."""
    mt = d.get("model_type")
    if mt not in ARCHS:
        raise ModelDirError(f"{where}: model_type {mt!r} is not supported (use one of {', '.join(ARCHS)})")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ModelDirError(f"{where}: RoPE scaling {kind!r} is not supported (default and llama3 are)")
    scaling = None
    if kind == "llama3":
        try:
            scaling = {k: rope[k] for k in LLAMA3_ROPE}
        except KeyError as e:
            raise ModelDirError(f"{where}: llama3 RoPE scaling without {e.args[0]}") from None
    if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias"):
        raise ModelDirError(f"{where}: only a bias-free SiLU MLP is supported")
    if d.get("use_sliding_window"):
        raise ModelDirError(f"{where}: sliding-window attention is not supported")
    if mt in ("llama", "qwen3") and d.get("attention_bias"):
        raise ModelDirError(f"{where}: attention_bias (which also biases o_proj) is not supported")
    sizes = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
    for k in sizes + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = d.get(k)
        if (k in sizes or v is not None) and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ModelDirError(f"{where}: {k} must be a positive integer (got {v!r})")
    n_head = d["num_attention_heads"]
    return GPTConfig(
        vocab_size=d["vocab_size"],
        n_layer=d["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head,
        n_embd=d["hidden_size"],
        head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
        intermediate_size=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=d.get("tie_word_embeddings", mt != "qwen2"),
        qkv_bias=mt == "qwen2",
        qk_norm=mt == "qwen3",
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=_first(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )


def _first(x):
    return x[0] if isinstance(x, list) else x


# ---------------------------------------------------------------- HF directories


def save_pretrained(model: GPT, out_dir, tokenizer_dir=None, state_dict=None):
    """Write model as a Hugging Face causal-LM directory, weights in fp32 (state_dict
    instead of model's own, e.g. gathered from FSDP shards by dist.model_state).

    tokenizer_dir (the stage's input) gives the tokenizer files, chat template and
    generation_config.json, copied unchanged (what it lacks is removed from out_dir), and
    the token ids of config.json as it wrote them (Llama 3's eos is a list). Without it,
    or saved in place, out_dir keeps what it has; what is missing comes from model.config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = {k: v.detach().float().contiguous().cpu() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    if c.tie_embeddings:
        sd.pop("lm_head.weight", None)  # a reward model has no lm_head
    atomic_write(out / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    cfg = hf_config(c)
    src = Path(tokenizer_dir) if tokenizer_dir is not None else out
    if (src / "config.json").exists():  # the ids as the input wrote them (Llama 3's eos is a list)
        cfg.update({k: v for k, v in read_config(src).items() if k in TOKEN_IDS})
    if src.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, out / name)
            else:  # a file left by an earlier run would override the input's (chat_template.jinja does)
                (out / name).unlink(missing_ok=True)
    write_json(out / "config.json", cfg)
    if not (out / "generation_config.json").exists():
        write_json(out / "generation_config.json", {k: getattr(c, k) for k in TOKEN_IDS})


def read_config(model_dir):
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"{d}: no such model directory")
    if not (d / "config.json").exists():
        raise ModelDirError(f"{d}: not a model directory (no config.json)")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{d / 'config.json'}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelDirError(f"{d / 'config.json'}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def load_state_dict(model_dir):
    """All tensors of a directory's model.safetensors (or its shards)."""
    d = Path(model_dir)
    files = sorted(d.glob("model*.safetensors"))
    if not files:
        raise ModelDirError(f"{d}: no model.safetensors")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            raise ModelDirError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return sd


def load_pretrained(model_dir, dtype=torch.float32):
    """A Hugging Face Llama/Qwen2/Qwen3 (or shoggoth) directory -> GPT."""
    d = Path(model_dir)
    config = gpt_config(read_config(d), where=str(d / "config.json"))
    model = GPT(config)
    load_weights(model, load_state_dict(d), where=str(d))
    return model.to(dtype)


def load_weights(module, sd, where):
    """Copy sd into module, failing with the names of missing or misshapen weights."""
    own = module.state_dict()
    tied = getattr(getattr(module, "config", None), "tie_embeddings", False)
    if tied:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(sd))
    if missing:
        raise ModelDirError(f"{where}: weights missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(k for k in set(sd) - set(own) if "rotary_emb" not in k)
    if extra:
        raise ModelDirError(f"{where}: unexpected weights: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    for k, v in own.items():
        if sd[k].shape != v.shape:
            raise ModelDirError(f"{where}: {k} has shape {tuple(sd[k].shape)}, the config says {tuple(v.shape)}")
    module.load_state_dict({k: sd[k] for k in own}, strict=False)


# ---------------------------------------------------------------- reward models


def save_reward(model, out_dir, shift=0.0, tokenizer_dir=None, state_dict=None):
    """Write a RewardModel as a Hugging Face sequence-classification directory (one label,
    `score.weight`), with its normalisation in config.json as `reward_shift`.

    transformers reads the score at the last token that is not pad_token_id and knows
    nothing of the shift: its logits are raw scores; shoggoth's scores are raw - shift."""
    out = Path(out_dir)
    save_pretrained(model, out, tokenizer_dir=tokenizer_dir, state_dict=state_dict)
    cfg = read_config(out)  # pad_token_id: where transformers reads the score (stages/reward.score_pad)
    cfg["pad_token_id"] = model.config.pad_token_id
    cfg["architectures"] = [cfg["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, reward_shift=float(shift))
    write_json(out / "config.json", cfg)


def load_reward(model_dir, dtype=torch.float32):
    """A reward directory -> (RewardModel, shift); shoggoth's score is the model's output - shift."""
    d = Path(model_dir)
    cfg = read_config(d)
    if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []) \
            or cfg.get("num_labels", len(cfg.get("id2label") or {})) != 1:
        raise ModelDirError(f"{d}: not a reward model (expected a *ForSequenceClassification with one label)")
    model = RewardModel(gpt_config(cfg, where=str(d / "config.json")))
    load_weights(model, load_state_dict(d), where=str(d))
    return model.to(dtype), float(cfg.get("reward_shift", 0.0))


def load_trunk(model, model_dir):
    """Copy the trunk (`model.*`) of a causal-LM or reward directory into model; the head stays as it is."""
    d = Path(model_dir)
    sd = {k: v for k, v in load_state_dict(d).items() if k.startswith("model.")}
    load_weights(model.model, {k[len("model."):]: v for k, v in sd.items()}, where=str(d))


# ---------------------------------------------------------------- resume checkpoints


def save_checkpoint(out_dir, step, state: dict, keep=3):
    """Atomically write out_dir/checkpoints/step_NNNNNN.pt and keep the last `keep`."""
    ckdir = Path(out_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"step_{step:06d}.pt"
    atomic_write(path, lambda p: torch.save({**state, "step": step}, p))
    for old in sorted(ckdir.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def trained(model, sd):
    """The entries of model's state dict sd that training changes: all of them in full
    fine-tuning; a LoRA run's adapters and heads (its frozen rest is the input directory's,
    loaded again on resume)."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in sd.items() if k not in frozen}


def load_trained(model, sd, where):
    """Load what trained(model, ...) saved into model; the frozen rest stays as loaded."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - frozen:
        raise ShoggothError(f"{where}: its weights do not fit the model (unexpected {unexpected[:3]}, missing "
                            f"{sorted(set(missing) - frozen)[:3]}): resume with the run's own LoRA settings")


def latest_checkpoint(out_dir):
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a checkpoint: torch raises RuntimeError, pickle errors, EOFError
        raise ShoggothError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it to resume from "
                            f"the one before, or start afresh in another --out") from None


def resume_state(out_dir, config, resume, may_change, auto=()):
    """(state, path) of the checkpoint to continue from, or (None, None) for a fresh run.

    Refuses to start over a run that has checkpoints (no silent overwrite) and to
    resume with a config that differs, in fields outside may_change, from the saved one.
    Fields in auto that are 0 now (sized by the run) take the saved value: the caller reads it."""
    path = latest_checkpoint(out_dir)
    if path and not resume:
        raise ShoggothError(f"{out_dir} has checkpoints from an earlier run: pass --resume to continue it, or pick another --out")
    if resume and not path:
        raise ShoggothError(f"--resume: no checkpoint in {Path(out_dir) / 'checkpoints'}")
    if not path and ((Path(out_dir) / "config.json").exists() or any(Path(out_dir).glob("model*.safetensors"))):
        raise ShoggothError(f"{out_dir} holds a model already (config.json or model.safetensors) and no checkpoint of "
                            f"a run to continue: pick another --out (a run never writes over a model it did not start)")
    if not path:
        return None, None
    state = load_checkpoint(path)
    diff = {k: (v, getattr(config, k)) for k, v in state["config"].items()
            if k not in may_change and getattr(config, k, v) != v and not (k in auto and not getattr(config, k))}
    if diff:
        raise ShoggothError(f"--resume: config differs from the checkpoint's (saved, now): {diff}")
    return state, path
