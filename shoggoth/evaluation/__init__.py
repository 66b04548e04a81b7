"""Judging replies and showing a run: reward-model, toy and gold scores and the RL stages' held-out
evaluation (scoring.py), the simulated labelers and their written-down taste (simulated.py), and
the HTML report with its inline SVG plots (report.py, svgplot.py)."""
