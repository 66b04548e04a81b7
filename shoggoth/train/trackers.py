"""Experiment trackers (`--report-to`): every step a stage logs also goes to TensorBoard, Weights &
Biases, MLflow or trackio, through each tool's own library, under the names a TRL user sees there.

metrics.jsonl keeps Shoggoth's names (the report and the demo read them); a tracker gets TRL's
name for the same quantity (NAMES, then `transformers`' rewrite: `eval_x` -> `eval/x`, anything
else -> `train/x`), so a run charts beside a TRL run of the same kind. docs/trackers.md holds the
table. Each tool is configured as it always is: WANDB_PROJECT / WANDB_MODE=offline,
MLFLOW_TRACKING_URI (default sqlite:///mlflow.db in the working directory), TRACKIO_DIR /
TRACKIO_PROJECT. `auto` (the default) is TensorBoard when it is installed, as before this option."""

import json
import os
from pathlib import Path
from ..errors import ShoggothError

CHOICES = ("auto", "none", "tensorboard", "wandb", "mlflow", "trackio")
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
PROJECT = "shoggoth"  # the project / experiment name when the tool's own variable does not name one

# Shoggoth's name -> the name TRL logs for the same quantity (before the train/ or eval/ prefix).
COMMON = {"lr": "learning_rate", "val_loss": "eval_loss", "val_accuracy": "eval_accuracy", "val_margin": "eval_margin",
          "val_tau": "eval_tau"}
NAMES = {
    "ppo": {"policy/approxkl": "policy/approxkl_avg", "policy/clipfrac": "policy/clipfrac_avg",
            "policy/entropy": "policy/entropy_avg", "loss/policy": "loss/policy_avg", "loss/value": "loss/value_avg",
            "val/clipfrac": "val/clipfrac_avg", "eot_rate": "val/num_eos_tokens_rate", "lr": "lr"},
    "grpo": {"objective/scores": "reward", "policy/kl": "kl", "policy/clipfrac": "clip_ratio/region_mean",
             "policy/entropy": "entropy", "response_length": "completions/mean_length"},
    "dpo": {"val/rewards/accuracies": "eval_rewards/accuracies", "val/rewards/margins": "eval_rewards/margins"},
}


def check(names):
    """The first problem with a --report-to list, as a message; None when it is fine."""
    bad = [n for n in names if n not in CHOICES]
    if bad:
        return f"--report-to {' '.join(bad)}: choose among {', '.join(CHOICES)}"
    if len(names) > 1 and ("none" in names or "auto" in names):
        return "--report-to none and auto stand alone; or name the trackers"
    return None


def trl_name(stage, key):
    """The name a TRL user's tracker shows for Shoggoth's metric `key` of `stage`."""
    name = NAMES.get(stage, {}).get(key) or COMMON.get(key, key)
    if name.startswith("eval_"):
        return "eval/" + name[len("eval_"):]
    return name if name.startswith("eval/") else "train/" + name


def open_all(names, out, stage, config, resume_step):
    """The trackers `names` asks for, opened for this run: an explicitly named one that is not
    installed is a one-line error naming what to install."""
    if "none" in names:
        return []
    if "auto" in names:
        try:
            return [TensorBoard(out, stage, config, resume_step)]
        except ImportError:
            return []
    opened = []
    for name in dict.fromkeys(names):
        try:
            opened.append(KINDS[name](out, stage, config, resume_step))
        except ImportError:
            raise ShoggothError(f"--report-to {name}: {MODULES[name]} is not installed "
                                f"(pip install 'shoggoth[track]')") from None
    return opened


# Each tracker: log(values, step) and table(name, rows, step), names already TRL's (Metrics renames
# once for all of them), and close().


class TensorBoard:
    def __init__(self, out, stage, config, resume_step):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(Path(out) / "tb"), purge_step=resume_step + 1)

    def log(self, values, step):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def table(self, name, rows, step):
        head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
        body = "".join("| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r.values()) + " |\n"
                       for r in rows)
        self.w.add_text(name, head + body, step)

    def close(self):
        self.w.close()


class WandB:
    def __init__(self, out, stage, config, resume_step):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=f"{Path(out).name} ({stage})",
                              dir=os.environ.get("WANDB_DIR", str(out)), config=config, reinit="create_new")

    def log(self, values, step):
        self.run.log(values, step=step)

    def table(self, name, rows, step):
        self.run.log({name: self.wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])}, step=step)

    def close(self):
        self.run.finish()


class MLflow:
    def __init__(self, out, stage, config, resume_step):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri("sqlite:///mlflow.db")  # MLflow's own advice (its file store is frozen)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        self.run = mlflow.start_run(run_name=f"{Path(out).name} ({stage})")
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, values, step):
        self.mlflow.log_metrics(values, step=step)

    def table(self, name, rows, step):
        self.mlflow.log_text(json.dumps(rows, indent=1), f"{name}/step_{step}.json")

    def close(self):
        self.mlflow.end_run()


class Trackio:
    def __init__(self, out, stage, config, resume_step):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=f"{Path(out).name}-{stage}",
                                config=config, resume="allow", auto_log_cpu=False, auto_log_gpu=False)

    def log(self, values, step):
        self.trackio.log(values, step=step)

    def table(self, name, rows, step):
        self.trackio.log({name: self.trackio.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])},
                         step=step)

    def close(self):
        self.trackio.finish()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}
