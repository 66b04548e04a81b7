"""The ranking web app: people (and simulated labelers) rank K completions per prompt.

- `app`: `create_app(db)`, the FastAPI app, its error pages and limits; `serve` runs it with uvicorn.
- `labeling` and `admin`: the routes of the labelers' side and of the admin's side.
- `auth`: who is asking (invite links traded for sessions, the admin token, CSRF), as FastAPI
  dependencies; `contract`: what every answer looks like and what /openapi.json publishes.
- `db`: the tables, their migrations and the assignment/submission logic, invites and
  sessions, the export.
- `jobs`: the work behind `shoggoth feedback generate|simulate|export` (its flags are
  parsed in shoggoth/cli.py).
- `agreement`: the inter-annotator statistics; `winrate`: the blind win rates of an
  evaluation campaign.

`templates/` and `static/` hold the pages and their script and style.
"""
