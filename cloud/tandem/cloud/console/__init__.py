"""The fleet console: a web page and an operator CLI over the fleet service's REST API.

- `api.mount_console(app, service)`: adds the page (`/console/`), its static files, the
  live event stream (server-sent events) and the read-only views the page needs (rollout
  detail with per-stage cohorts, telemetry series of the new version against the baseline)
  to the fleet service's FastAPI app.
- `cli`: `tandem rollout ...`, `tandem devices list` and `tandem models list`, talking to the
  REST API with a bearer token.

The page is plain HTML, CSS and a little vanilla JavaScript shipped as package data: no build
step, no CDN, no chart library (charts are inline SVG).
"""
