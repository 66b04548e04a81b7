"""--report-to: a stage's metrics reach TensorBoard, MLflow, trackio and Weights & Biases (offline)
through each tool's own library, under the names a TRL user's tracker shows (trackers.py), read
back from what each tool wrote; sample completions reach them as a table; a bad choice, or a
tracker that is not installed, is a one-line error."""

import json
import sqlite3
import subprocess
import sys

import pytest
from common import shoggoth
from rl_common import ENV, FAST, lm_dir  # noqa: F401

from shoggoth.train import metrics, trackers


def test_trl_names():
    assert trackers.trl_name("sft", "loss") == "train/loss" and trackers.trl_name("sft", "lr") == "train/learning_rate"
    assert trackers.trl_name("pretrain", "val_loss") == "eval/loss"
    assert trackers.trl_name("ppo", "objective/kl") == "train/objective/kl"
    assert trackers.trl_name("ppo", "policy/clipfrac") == "train/policy/clipfrac_avg"
    assert trackers.trl_name("ppo", "eval/scores") == "eval/scores"
    assert trackers.trl_name("dpo", "val/rewards/accuracies") == "eval/rewards/accuracies"


@pytest.mark.slow
def test_every_tracker_reads_back_what_the_stage_logged(tmp_path):
    out = tmp_path / "pre"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "TRACKIO_PROJECT": "t", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "shoggoth", "pretrain", "--config", "tiny", "--out", str(out), "--max-steps", "6",
                        "--eval-every", "3", "--ckpt-every", "3", "--report-to", "tensorboard", "mlflow", "trackio", "wandb"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = metrics.read(out / "metrics.jsonl")
    loss = {m["step"]: m["loss"] for m in logged if "loss" in m}
    val = {m["step"]: m["val_loss"] for m in logged if "val_loss" in m}
    assert sorted(loss) == [1, 2, 3, 4, 5, 6] and sorted(val) == [3, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert {e.step: round(e.value, 4) for e in ea.Scalars("train/loss")} == {s: round(v, 4) for s, v in loss.items()}
    assert [e.step for e in ea.Scalars("eval/loss")] == [3, 6] and ea.Scalars("train/learning_rate")

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("shoggoth").experiment_id])
    hist = client.get_metric_history(run.info.run_id, "eval/loss")
    assert {m.step: round(m.value, 4) for m in hist} == {s: round(v, 4) for s, v in val.items()}
    assert run.data.params["max_steps"] == "6"

    db = sqlite3.connect(tmp_path / "trackio" / "t.db")
    rows = {}  # a step's train and eval lines are two trackio rows
    for step, m in db.execute("select step, metrics from metrics where run_name = 'pre-pretrain'"):
        rows.setdefault(step, {}).update(json.loads(m))
    assert {s: round(m["train/loss"], 4) for s, m in rows.items() if "train/loss" in m} == \
        {s: round(v, 4) for s, v in loss.items()}

    (wandb_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's own binary log
    assert b"train/loss" in wandb_file.read_bytes() and b"eval/loss" in wandb_file.read_bytes()


@pytest.mark.slow
def test_rl_evaluations_hand_the_trackers_sample_completions(lm_dir, tmp_path):  # noqa: F811
    out = tmp_path / "ppo"
    shoggoth("ppo", "--policy", lm_dir, "--toy-reward", "the", "--out", out, "--iterations", 2, "--batch-size", 8,
             "--minibatch-size", 4, "--eval-every", 2, "--report-to", "tensorboard", *FAST, env=ENV)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    texts = [e for e in ea.Tensors("eval/completions/text_summary")]
    assert [e.step for e in texts] == [0, 2]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | completion | reward |") and table.count("\n") == 2 + 8
    assert "train/objective/kl" in ea.Tags()["scalars"] and "train/policy/clipfrac_avg" in ea.Tags()["scalars"]
    assert all("eval/completions" not in m for m in metrics.read(out / "metrics.jsonl"))  # trackers only


def test_bad_choices_are_one_line_errors(tmp_path, monkeypatch):
    for bad, msg in ((["comet"], "choose among"), (["none", "wandb"], "stand alone")):
        r = shoggoth("pretrain", "--config", "tiny", "--out", tmp_path / "x", "--report-to", *bad, check=False)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    r = shoggoth("pretrain", "--config", "tiny", "--out", tmp_path / "y", "--max-steps", 1, "--report-to", "wandb",
                 check=False)
    assert r.returncode == 1 and "pip install 'shoggoth[track]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
