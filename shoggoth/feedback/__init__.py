"""The ranking web app: people (and simulated labelers) rank K completions per prompt.

- `app`: `create_app(db)`, the FastAPI app, its error pages and limits; `serve` runs it with uvicorn.
- `labeling` and `admin`: the routes of the labelers' side and of the admin's side.
- `auth`: who is asking (invite links traded for sessions, the admin token, CSRF), as FastAPI
  dependencies; `contract`: what every answer looks like and what /openapi.json publishes.
- the storage, each module on `db` (the tables, their migrations, the transactions):
  `campaigns` (campaigns and their tasks), `accounts` (labelers, invites, sessions),
  `assignments` (the labeling loop: next task, submit, skip, revise), `queries` (reading the
  rankings back: the export, the admin's overview), `oversight` (known answers, quality
  settings, pausing) and `guidelines` (stored, read, rendered).
- `jobs`: the work behind `shoggoth feedback generate|simulate|export` (its flags are
  parsed in shoggoth/cli.py).
- `agreement`: the inter-annotator statistics; `winrate`: the blind win rates of an
  evaluation campaign.

`templates/` and `static/` hold the pages and their script and style.
"""
