"""The Python API (shoggoth/api.py): docs/python.md's script runs as written, each stage returns a
Result, and a bad call raises the command line's one-line error instead of exiting."""

import re
from pathlib import Path

import pytest

import shoggoth
from shoggoth import config
from shoggoth.errors import ShoggothError

DOC = Path(__file__).resolve().parent.parent / "docs" / "python.md"


@pytest.mark.slow
def test_the_documented_script_runs_end_to_end(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, str(DOC), "exec"), ns)
    for name in ("pre", "sft", "rm", "ppo"):
        r = ns[name]
        assert isinstance(r, shoggoth.Result) and (tmp_path / r.out / "config.json").exists(), name
        assert r.config.out == str(r.out) and r.metrics, name
    assert ns["sft"].config.init == str(ns["pre"].out) and 0 <= ns["rm"].metrics["val_accuracy"] <= 1
    assert set(ns["wins"]["models"]) == {"sft", "ppo"} and ns["wins"]["prompts"] == 12
    out = capsys.readouterr().out
    assert re.search(r"PPO preferred over SFT \d+% \[\d+%, \d+%\] of the time", out), out[-2000:]


def test_a_bad_call_raises_the_one_line_error(tmp_path):
    with pytest.raises(config.UsageError, match="nonsense"):
        shoggoth.sft(nonsense=1)
    with pytest.raises(config.UsageError, match="--lr"):
        shoggoth.sft(init=str(tmp_path), lr=-1.0)
    with pytest.raises(ShoggothError, match="no such|not a model|config.json"):
        shoggoth.sft(init=str(tmp_path / "missing"), out=str(tmp_path / "out"))
    with pytest.raises(config.UsageError, match="no stage 'train'"):
        shoggoth.run("train")


def test_the_stage_modules_stay_importable_by_name():
    """`from shoggoth import rounds` is the module (shoggoth/rounds.py), not an API function of that name."""
    import importlib

    from shoggoth import rounds

    assert rounds is importlib.import_module("shoggoth.rounds") and hasattr(rounds, "Config")
    assert callable(shoggoth.sft) and shoggoth.run.__module__ == "shoggoth.api"
