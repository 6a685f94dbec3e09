"""The fleet service: device registry, signed model delivery over MQTT, staged rollouts.

Layers, inside out:

- `engine`: the rollout engine, pure logic (no IO): a plan, a persisted state and what the
  devices and telemetry say in, a decision (new state, assignments, rollbacks, events) out.
- `telemetry`: mergeable latency histograms and the statistics the gates and queries use.
- `store`/`models`: one data layer on SQLAlchemy 2 (SQLite by default, PostgreSQL by URL).
- `delivery`: artifact chunks and zstd deltas answering device chunk requests.
- `service`: `FleetService`, the API the REST layer and the CLI share, and the MQTT session.
- `rest`: a thin FastAPI layer over `FleetService`; `cli`: `tandem fleet ...`.
"""
