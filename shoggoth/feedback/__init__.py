"""The ranking web app: people (and simulated labelers) rank K completions per prompt.

`db` holds the tables and the assignment/submission logic, `app` the FastAPI app,
`jobs` the work behind `shoggoth feedback generate|simulate|export` (its flags are
parsed in shoggoth/cli.py), `agreement` the inter-annotator statistics, `winrate` the
blind win rates of an evaluation campaign.
"""
