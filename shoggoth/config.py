"""Building a stage's Config: which module each stage command runs (STAGES), the TOML presets
of shoggoth/configs/, `load`/`build` (a Config from its defaults < a preset or TOML file < typed
fields), `check` (each numeric field in its range, refused with the flag's name) and `field_docs`
(each field's one-line doc, for --help). The command line (cli.py) and the demo (demo.py) both
build their Configs here: a field that does not exist or a value out of range fails when the
Config is made, before any stage runs; UsageError is that failure."""

import dataclasses
import importlib
import inspect
import re
import tomllib
from pathlib import Path

PRESETS = Path(__file__).parent / "configs"

# command -> module with `Config` and `run(cfg)`; imported only when used.
STAGES = {
    "pretrain": "shoggoth.stages.pretrain",
    "sft": "shoggoth.stages.sft",
    "reward": "shoggoth.stages.reward",
    "ppo": "shoggoth.stages.ppo",
    "dpo": "shoggoth.stages.dpo",
    "grpo": "shoggoth.stages.grpo",
    "rounds": "shoggoth.rounds",
}


class UsageError(Exception):
    """A bad flag, preset or value: printed as one line, exit status 2."""


def field_docs(cls):
    """Each field's trailing `# comment` in the dataclass source (and its bases': stage.Common,
    lora.Options; a stage's own comment wins), for --help."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:.*#\s*(.+)$", line)
            if m:
                docs[m.group(1)] = m.group(2).strip()
    return docs


def load_toml(name):
    """(table, path) of a TOML file, or of the preset of that name in shoggoth/configs/."""
    path = Path(name)
    if not path.suffix and not path.exists():
        path = PRESETS / f"{name}.toml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
            raise UsageError(f"no config file or preset named {name!r} (presets: {known})")
    if not path.exists():
        raise UsageError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text()), path
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML ({e})") from None


def build(cls, preset=None, command="stage", **fields):
    """cls (a stage's Config) from its defaults < the TOML file or preset `preset` < fields.
    A preset field cls lacks is a UsageError; a keyword it lacks, a TypeError."""
    values = {}
    if preset:
        table, path = load_toml(preset)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise UsageError(f"{path}: unknown field(s) {', '.join(unknown)} for shoggoth {command}")
        values.update(table)
    cfg = cls(**{**values, **fields})
    check(cfg)
    return resolve_models(cfg)


# Fields that name a model (or tokenizer) directory. Each may be a Hugging Face hub id instead, made
# a directory when the Config is built; --revision picks the version of the first of them a Config has.
MODELS = ("init", "sft", "policy", "ref", "reward", "warm", "tokenizer")


def resolve_models(cfg):
    """cfg with each model field a local directory (checkpoint.resolve: a hub id becomes its
    snapshot in the Hugging Face cache, downloaded if need be), so that stages read directories only."""
    from .lm.checkpoint import MODEL_FILES, TOKENIZER_FILES, resolve

    names = [n for n in MODELS if hasattr(cfg, n)]
    revision = getattr(cfg, "revision", "")
    if revision and not getattr(cfg, names[0]):
        raise UsageError(f"--revision {revision} needs --{names[0]} (a Hugging Face hub id)")
    for n in names:
        setattr(cfg, n, resolve(getattr(cfg, n), revision if n == names[0] else "",
                                ("config.json", *TOKENIZER_FILES) if n == "tokenizer" else MODEL_FILES))
    return cfg


# Ranges of the stages' numeric fields, by name, for whichever Config has them. A count whose
# comment says what 0 means ("0 = never", "0 = run all epochs", ...) may also be 0.
COUNTS = {"batch_size", "grad_accum", "max_steps", "epochs", "iterations", "ppo_epochs", "group_size", "minibatch_size",
          "max_new_tokens", "eval_every", "ckpt_every", "keep", "eval_batches", "n_layer", "n_head", "n_embd", "seq_len",
          "vocab_size", "sample_every", "sample_tokens", "val_every", "normalize_max_new_tokens", "kl_horizon",
          "n_kv_head", "rounds", "prompts_per_round", "k", "rankings_per_task", "labelers", "pool", "heads"}
AT_LEAST_0 = {"warmup_steps", "weight_decay", "grad_clip", "beta", "target_kl", "missing_eos_penalty", "ptx_coef",
              "vf_coef", "eval_samples", "normalize_samples", "lora_r", "lora_alpha", "label_smoothing", "max_memory"}
ABOVE_0 = {"poll", "lr", "temperature", "normalize_temperature", "clip", "vf_clip", "rope_theta"}
UNIT = {"min_lr_frac": "[0, 1]", "gamma": "[0, 1]", "lam": "[0, 1]", "beta1": "[0, 1)", "beta2": "[0, 1)",
        "ema_decay": "[0, 1)", "lora_dropout": "[0, 1)", "eval_frac": "(0, 1)"}


def check(cfg):
    """A UsageError naming the flag of the first field out of its range (a zero batch, a negative
    or NaN learning rate, beta1 of 1.5, a head count that does not divide the width ...)."""
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        name, v = f.name, getattr(cfg, f.name)
        flag = "--" + name.replace("_", "-")
        if name == "dtype" and v not in ("auto", "bf16", "fp32"):
            raise UsageError(f"{flag} must be auto, bf16 or fp32 (got {v!r})")
        if name == "report_to":
            from .train.trackers import check as check_trackers

            if (problem := check_trackers(v)):
                raise UsageError(problem)
        if name == "grad_ckpt" and v not in ("auto", "on", "off"):
            raise UsageError(f"{flag} must be auto, on or off (got {v!r})")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if name in COUNTS:
            low = 0 if "0 =" in docs.get(name, "") else 1
            if v < low:
                raise UsageError(f"{flag} must be at least {low} (got {v})")
        elif name in AT_LEAST_0 and not v >= 0:  # `not >=` also refuses NaN
            raise UsageError(f"{flag} must be 0 or more (got {v})")
        elif name in ABOVE_0 and not 0 < v < float("inf"):
            raise UsageError(f"{flag} must be above 0 (got {v})")
        elif name in UNIT:
            lo, hi = UNIT[name][0] == "[", UNIT[name][-1] == "]"
            if not ((0 <= v if lo else 0 < v) and (v <= 1 if hi else v < 1)):
                raise UsageError(f"{flag} must be in {UNIT[name]} (got {v})")
    heads, width, kv = (getattr(cfg, k, None) for k in ("n_head", "n_embd", "n_kv_head"))
    if heads and width and (width % heads or width // heads % 2):
        raise UsageError(f"--n-embd {width} must split into --n-head {heads} heads of an even size (RoPE)")
    if heads and kv and heads % kv:
        raise UsageError(f"--n-head {heads} must be a multiple of --n-kv-head {kv}")


def load(command, preset=None, **fields):
    """(stage module, its Config built as `build` does) of a stage command."""
    mod = importlib.import_module(STAGES[command])
    return mod, build(mod.Config, preset, command, **fields)


def finished(out):
    """Whether a stage's output directory holds its final model (a run that stopped holds only checkpoints)."""
    out = Path(out)
    return (out / "config.json").exists() and any(out.glob("model*.safetensors"))


def run(command, preset, out, **fields):
    """Run stage `command` on its preset and fields into `out`, resumed from its last checkpoint
    if it had started; returns its Config. The demo and `shoggoth rounds` chain stages this way."""
    from .lm.checkpoint import latest_checkpoint
    from .data.files import write_json

    mod, cfg = load(command, preset, **fields, out=str(out), resume=latest_checkpoint(out) is not None)
    mod.run(cfg)
    write_json(Path(out) / "run_config.json", dataclasses.asdict(cfg))  # what reproduces it, beside the model
    return cfg
