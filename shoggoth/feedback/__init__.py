"""The ranking web app: people (and simulated labelers) rank K completions per prompt.

`db` holds the tables and the assignment/submission logic, `app` the FastAPI app,
`agreement` the inter-annotator statistics, `cli` the `shoggoth feedback` commands.
"""
