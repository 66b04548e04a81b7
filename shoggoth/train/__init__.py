"""What the training stages (shoggoth/stages/) share: set-up, optimizer step and final save
(stage.py), AdamW groups and the lr schedule (optim.py), the losses as the papers write them,
torchrun and its wrappers (dist.py), the progress line and metrics.jsonl (metrics.py, trackers.py),
and the RL stages' rollouts (rl.py). Stages never import each other; what two of them need is here."""
