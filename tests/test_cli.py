"""Every command's --help prints its flags and exits 0 (a field doc with a % once crashed argparse)."""

import pytest

from shoggoth import cli

COMMANDS = sorted([*cli.COMMANDS, *cli.STAGES]) + [f"feedback {a}" for a in ("generate", "serve", "simulate", "export")]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: shoggoth {command}") and "--help" in out


def test_every_stage_field_is_a_flag(capsys):
    import dataclasses
    import importlib

    for name, module in cli.STAGES.items():
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        for f in dataclasses.fields(importlib.import_module(module).Config):
            assert "--" + f.name.replace("_", "-") in out, (name, f.name)


def test_a_device_that_is_not_here_is_a_usage_error(tmp_path, capsys):
    import torch

    bad = ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        assert cli.main(["pretrain", "--config", "tiny", "--device", device, "--out", str(tmp_path / "run")]) == 2
        assert f"--device {device}:" in capsys.readouterr().err
        assert not (tmp_path / "run" / "checkpoints").exists()
