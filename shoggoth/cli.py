"""`shoggoth <command>`: turns flags and TOML presets into a stage Config, nothing else.

Stage commands get one flag per field of the stage's Config dataclass
(`--n-layer 4`, `--compile/--no-compile`), with the field's comment as help.
Precedence: dataclass defaults < `--config FILE.toml` (or a preset name) < flags.
"""

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import tomllib
import types
import typing
from pathlib import Path

PRESETS = Path(__file__).parent / "configs"

# command -> module with `Config` and `run(cfg)`; imported only when used.
STAGES = {
    "pretrain": "shoggoth.stages.pretrain",
}


class UsageError(Exception):
    """A bad flag, preset or value: printed as one line, exit status 2."""


def field_docs(cls):
    """Each field's trailing `# comment` in the dataclass source, for --help."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:.*#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def _kind(tp):
    """(python type, is_list) for a field annotation like int, str | None, list[str]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def stage_parser(command, cls):
    p = argparse.ArgumentParser(prog=f"shoggoth {command}", description=(cls.__doc__ or "").strip(),
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="TOML file, or the name of a preset in shoggoth/configs/")
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {default!r})"
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=tp, nargs="+" if is_list else None, help=help_)
    return p


def load_toml(name):
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


def make_config(cls, argv, command="stage"):
    """Config instance from defaults, an optional TOML file and flags."""
    args = vars(stage_parser(command, cls).parse_args(argv))
    values = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if "config" in args:
        table, path = load_toml(args.pop("config"))
        unknown = sorted(set(table) - names)
        if unknown:
            raise UsageError(f"{path}: unknown field(s) {', '.join(unknown)} for shoggoth {command}")
        values.update(table)
    values.update(args)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"shoggoth {command}: {e}") from None


# ---------------------------------------------------------------- commands


def cmd_tokenizer(argv):
    p = argparse.ArgumentParser(prog="shoggoth tokenizer", description="Train a byte-level BPE tokenizer.")
    p.add_argument("--corpus", nargs="*", default=[], help="text/markdown files, folders, or JSONL with 'text' (default: the King James Bible)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from . import data, tokenizer

    docs = data.read_corpus(a.corpus)
    tok = tokenizer.train(docs, a.vocab_size)
    tokenizer.save(tok, a.out)
    print(f"tokenizer: {len(tok)} tokens ({a.vocab_size} asked) saved to {a.out}")


def cmd_sample(argv):
    p = argparse.ArgumentParser(prog="shoggoth sample", description="Print completions of a prompt.")
    p.add_argument("model_dir")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from . import sampling

    for text in sampling.complete(a.model_dir, [a.prompt] * a.num_samples, max_new_tokens=a.max_new_tokens,
                                  temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed):
        print(a.prompt + text)
        print("-" * 40)


def cmd_demo(argv):
    p = argparse.ArgumentParser(prog="shoggoth demo", description="Every stage on the built-in defaults.")
    p.add_argument("--out", default="runs/demo")
    a = p.parse_args(argv)
    from . import demo

    demo.run(a.out)


COMMANDS = {"tokenizer": cmd_tokenizer, "sample": cmd_sample, "demo": cmd_demo}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = sorted([*COMMANDS, *STAGES])
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: shoggoth <command> [flags]\ncommands: {', '.join(names)}\n`shoggoth <command> --help` lists a command's flags.")
        return 0
    cmd, rest = argv[0], argv[1:]
    from .errors import ShoggothError

    try:
        if cmd in STAGES:
            mod = importlib.import_module(STAGES[cmd])
            mod.run(make_config(mod.Config, rest, cmd))
        elif cmd in COMMANDS:
            COMMANDS[cmd](rest)
        else:
            raise UsageError(f"unknown command {cmd!r} (commands: {', '.join(names)})")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ShoggothError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
