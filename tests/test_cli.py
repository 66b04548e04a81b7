"""Every command's --help prints its flags and exits 0 (a field doc with a % once crashed argparse); flags
out of range, a device that is not here, and outputs that would overwrite a model are one-line errors."""

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


@pytest.mark.parametrize("flags, says", [
    (["--batch-size", "0"], "--batch-size must be at least 1"), (["--lr", "nan"], "--lr must be above 0"),
    (["--beta1", "1.5"], "--beta1 must be in [0, 1)"), (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--n-head", "3"], "heads of an even size"), (["--warmup-steps", "-3"], "--warmup-steps must be 0 or more"),
    (["--dtype", "fp8"], "--dtype must be auto, bf16 or fp32")])
def test_stage_fields_out_of_range_are_usage_errors(flags, says, tmp_path, capsys):
    assert cli.main(["pretrain", "--config", "tiny", *flags, "--out", str(tmp_path / "run")]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stage_never_writes_over_a_model_or_a_broken_checkpoint(tmp_path, capsys):
    from shoggoth.lm.checkpoint import save_pretrained
    from shoggoth.lm.model import GPT, GPTConfig

    model = tmp_path / "model"
    save_pretrained(GPT(GPTConfig(vocab_size=50, n_layer=1, n_embd=32, n_head=2)), model)
    before = (model / "model.safetensors").read_bytes()
    assert cli.main(["pretrain", "--config", "tiny", "--out", str(model)]) == 1
    assert "holds a model already" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before
    assert cli.main(["tokenizer", "--out", str(model)]) == 2  # a model's tokenizer is part of the model
    assert "holds a model" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_5.pt").write_bytes(b"truncated")
    assert cli.main(["pretrain", "--config", "tiny", "--out", str(run), "--resume"]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_sampling_flags_and_prompts_are_checked(tmp_path, capsys):
    for flags, says in [(["-n", "0"], "-n must be"), (["--max-new-tokens", "-5"], "--max-new-tokens must be"),
                        (["--temperature", "-1"], "--temperature must be"), (["--top-p", "0"], "--top-p must be"),
                        (["--top-k", "-3"], "--top-k must be"), (["--prompt", "caf\udcff"], "not valid UTF-8")]:
        assert cli.main(["sample", str(tmp_path / "no-model"), *flags]) == 2, flags  # checked before loading
        assert says in capsys.readouterr().err


def test_outputs_and_inputs_of_the_wrong_kind_are_named(tmp_path, capsys):
    from shoggoth.data.shards import TokenShards
    from shoggoth.errors import DataError

    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "a directory; name the HTML file" in capsys.readouterr().err
    with pytest.raises(DataError, match="not a folder of token shards"):  # PPO-ptx's --ptx-data
        TokenShards(tmp_path)
