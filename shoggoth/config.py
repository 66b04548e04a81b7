"""Stage Configs from presets: the stage commands, the TOML presets of shoggoth/configs/, and
`load`, which builds a stage's Config from its defaults, a preset and typed fields. The command
line (cli.py) and the demo (demo.py) both build their Configs here: a field that does not exist
fails when the Config is made, before any stage runs."""

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
    return cls(**{**values, **fields})


def load(command, preset=None, **fields):
    """(stage module, its Config built as `build` does) of a stage command."""
    mod = importlib.import_module(STAGES[command])
    return mod, build(mod.Config, preset, command, **fields)
