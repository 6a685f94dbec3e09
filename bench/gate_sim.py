"""A seeded, pure simulation of staged rollouts judged by the rollout engine's gates.

No IO, no broker, no clock: simulated time advances a tick at a time. A fleet of devices,
each with its own request rate (lognormal across devices), answers requests with the
version it runs. Every request is an error, a fallback to the cloud, or a local answer; a
share of the local answers is shadow-sampled against the cloud (agreeing or not); each local
answer has a calibrated confidence (20 linear buckets) and a local latency (log buckets, as
the telemetry histograms have them). Traffic varies across devices (lognormal rates); with
`World.device_spread` the error, fallback and agreement rates do too (each device's inputs are
easy or hard for any model: a logit shift, the same under both versions).

Each tick the telemetry of the interval is drawn once for every device under both versions,
and two rollouts of the same plan run in lockstep over those same numbers:

- ``new``: the real `eng.step` with the plan's gates (the statistical gates of issue 12);
- ``old``: the gates as the engine judged them before (`old_gate_verdicts`): the point value
  against the threshold as soon as `min_samples` are in, waiting without a deadline. The
  stage mechanics (cohorts, installs, settling, soaks) are the same `eng.step`, run on the
  plan without gates; the old rule aborts, holds or lets it advance.

The cohort's totals are the new version's telemetry on the devices running it, since the
rollout began; the baseline's are the baseline version's on every other device, as the fleet
service builds its observation (gate window = rollout creation, no resume). Each side also
carries its per-device totals as `gates.Clusters`, as `observe.clusters` builds them from the
store's per-device rows, so the engine judges the same device-clustered intervals here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

from tandem.cloud.fleet import engine as eng
from tandem.cloud.fleet.gates import AGRESTI_COULL, Change, Clusters
from tandem.cloud.fleet.observe import ChangeFields

LAT_MIN_MS = 0.5  # latency histogram layout: underflow below, then log buckets
LAT_GROWTH = 1.1
LAT_BUCKETS = 40  # the last one holds the tail
CONF_BUCKETS = 20  # linear over [0, 1], as the SDK fills them


@dataclass(frozen=True)
class Version:
    """The true per-request behaviour of a version (the same on every device)."""

    error_rate: float = 0.01
    fallback_rate: float = 0.10  # answered by the cloud instead (share of all requests)
    agreement: float = 0.95  # shadow-sampled local answers that agree with the cloud
    accuracy_drop: float = 0.0  # how far the mean calibrated confidence is below the baseline's
    latency_median_ms: float = 2.0
    latency_sigma: float = 0.35  # of log latency


@dataclass(frozen=True)
class World:
    devices: int = 200
    median_rps: float = 1.5  # requests per second of the median device
    rps_sigma: float = 1.0  # sigma of log(rate) across devices
    shadow_rate: float = 0.2  # share of local answers also sent to the cloud
    tick_s: float = 60.0  # one telemetry interval; the engine looks once per tick
    install_s: tuple[float, float] = (30.0, 300.0)  # assignment to HEALTHY, uniform
    horizon_s: float = 86_400.0  # the old gates never end a wait: still waiting here = stalled
    # Sigma of each device's logit shift of its error, fallback and agreement rates (its
    # inputs); 0: the same true rates on every device, as the gates' binomial model assumes.
    device_spread: float = 0.0
    # Seconds of baseline-version telemetry every device has from before the rollout (the
    # store's history, observe.HISTORY_S): with it the relative gates compare each device
    # with itself (gates.Change); 0: no history, the fleet comparison only.
    history_s: float = 0.0


@dataclass(frozen=True)
class Outcome:
    status: str  # completed | aborted | paused (max_wait_s) | stalled (old gates, horizon)
    reason: str  # the gate that failed, or the gates that lacked evidence
    stage: int  # stage index at the decision
    time_s: float  # simulated seconds from creation to the decision
    requests: int  # new-version requests in the cohort at the decision
    shadow: int  # new-version shadow samples in the cohort at the decision
    # The first stage's decision (advance, abort, pause): when, and on how many samples.
    canary_s: float = math.nan
    canary_requests: int = 0
    canary_shadow: int = 0


def _conf_pvals(drop: float) -> np.ndarray:
    mids = (np.arange(CONF_BUCKETS) + 0.5) / CONF_BUCKETS
    base = 0.55 ** (CONF_BUCKETS - 1 - np.arange(CONF_BUCKETS))
    base /= base.sum()
    if drop <= 0:
        return base
    low = np.zeros(CONF_BUCKETS)
    low[CONF_BUCKETS // 2 - 1] = 1.0  # moves mass to 0.475: the mean drops by exactly `drop`
    share = drop / (float(base @ mids) - float(mids[CONF_BUCKETS // 2 - 1]))
    return (1 - share) * base + share * low


def _latency_pvals(median_ms: float, sigma: float) -> np.ndarray:
    dist = NormalDist(math.log(median_ms), sigma)
    edges = [dist.cdf(math.log(LAT_MIN_MS * LAT_GROWTH**i)) for i in range(LAT_BUCKETS)]
    p = np.diff([0.0, *edges, 1.0])  # underflow, buckets 0..L-2, the tail in bucket L-1
    return np.clip(p, 0.0, None) / np.clip(p, 0.0, None).sum()


def true_accuracy(v: Version) -> float:
    mids = (np.arange(CONF_BUCKETS) + 0.5) / CONF_BUCKETS
    return float(_conf_pvals(v.accuracy_drop) @ mids)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class _Model:
    """A version's rates on each device, and its confidence and latency distributions."""

    error: np.ndarray  # per device
    fallback: np.ndarray  # per device, of the requests that did not fail
    agreement: np.ndarray  # per device
    conf: np.ndarray
    latency: np.ndarray

    @classmethod
    def of(cls, v: Version, offsets: np.ndarray) -> _Model:
        """`offsets` (3, devices): each device's logit shift of the error, fallback and
        agreement rates, the same for every version (its inputs are easy or hard for all)."""
        shifted = [
            1.0 / (1.0 + np.exp(-(_logit(p) + off)))
            for p, off in zip((v.error_rate, v.fallback_rate, v.agreement), offsets, strict=True)
        ]
        error, fallback, agreement = shifted
        return cls(
            error,
            np.clip(fallback / (1.0 - error), 0.0, 1.0),
            agreement,
            _conf_pvals(v.accuracy_drop),
            _latency_pvals(v.latency_median_ms, v.latency_sigma),
        )

    def counts(self, rng: np.random.Generator, requests: np.ndarray, shadow: float) -> np.ndarray:
        """(devices, 5): requests, errors, fallbacks, shadow samples, agreements."""
        errors = rng.binomial(requests, self.error)
        fallbacks = rng.binomial(requests - errors, self.fallback)
        sampled = rng.binomial(requests - errors - fallbacks, shadow)
        agreed = rng.binomial(sampled, self.agreement)
        return np.stack([requests, errors, fallbacks, sampled, agreed], axis=1)


_MIDS = (np.arange(CONF_BUCKETS) + 0.5) / CONF_BUCKETS


def _clusters(x: np.ndarray, n: np.ndarray) -> Clusters:
    """`gates.Clusters` of per-device (x_i, n_i), as `Clusters.of` sums them (vectorised)."""
    on = n > 0
    x, n = x[on].astype(float), n[on].astype(float)
    return Clusters(
        int(on.sum()), float(x.sum()), float(n.sum()), float(x @ x), float(x @ n),
        float(n @ n), float((n * n) @ n),
    )  # fmt: skip


def _change(xa: np.ndarray, na: np.ndarray, xb: np.ndarray, nb: np.ndarray) -> Change:
    """`gates.Change` of per-device (after, before) totals, as `Change.of` sums them
    (vectorised)."""
    on, had = na > 0, nb > 0
    both = on & had
    xa, na, xb, nb = (a[both].astype(float) for a in (xa, na, xb, nb))
    w = na * nb / (na + nb)
    d = xa / na - xb / nb
    k = AGRESTI_COULL
    q = (xa + xb + k) / (na + nb + 2 * k)
    return Change(
        int(both.sum()), int((on & ~had).sum()), float(na.sum()), float(w.sum()),
        float(w @ d), float(w @ (q * (1 - q))), float(w @ w), float((w * w) @ d),
        float((w * w) @ (d * d)),
    )  # fmt: skip


@dataclass(frozen=True)
class _History:
    """Each device's baseline-version telemetry from before the rollout."""

    dev: np.ndarray  # (devices, 5) as _Totals.dev
    answers: np.ndarray
    mass: np.ndarray


def _changes(
    dev: np.ndarray, answers: np.ndarray, mass: np.ndarray, h: _History, mask: np.ndarray
) -> ChangeFields:
    """The VersionStats change fields of the devices in `mask` (observe.changes)."""

    def of(x: int, n: int) -> Change:
        return _change(dev[mask, x], dev[mask, n], h.dev[mask, x], h.dev[mask, n])

    return {
        "error_change": of(1, 0),
        "fallback_change": of(2, 0),
        "agreement_change": of(4, 3),
        "accuracy_change": _change(mass[mask], answers[mask], h.mass[mask], h.answers[mask]),
        # The simulated fleet does not generate text.
        "acceptance_change": Change(),
        "escalation_change": Change(),
    }


class _Totals:
    """One side's telemetry since creation: per device (counts, local answers and their
    confidence mass) and the merged confidence and local-latency histograms."""

    def __init__(self, devices: int) -> None:
        self.dev = np.zeros((devices, 5), dtype=np.int64)
        self.answers = np.zeros(devices, dtype=np.int64)
        self.mass = np.zeros(devices)
        self.conf = np.zeros(CONF_BUCKETS, dtype=np.int64)
        self.latency = np.zeros(1 + LAT_BUCKETS, dtype=np.int64)

    @property
    def counts(self) -> np.ndarray:
        total: np.ndarray = self.dev.sum(axis=0)
        return total

    def add(
        self,
        mask: np.ndarray,
        counts: np.ndarray,
        answers: np.ndarray,
        mass: np.ndarray,
        conf: np.ndarray,
        lat: np.ndarray,
    ) -> None:
        self.dev[mask] += counts[mask]
        self.answers[mask] += answers[mask]
        self.mass[mask] += mass[mask]
        self.conf += conf
        self.latency += lat

    def stats(self) -> eng.VersionStats:
        requests, errors, fallbacks, shadow, agreed = (int(x) for x in self.counts)
        counts = tuple(int(x) for x in self.latency)
        d = self.dev
        return eng.VersionStats(
            requests=requests,
            errors=errors,
            fallbacks=fallbacks,
            shadow_sampled=shadow,
            shadow_agreed=agreed,
            p95_latency_ms=_quantile(counts, 0.95),
            latency_counts=counts,
            latency_layout=(LAT_MIN_MS, LAT_GROWTH),
            confidence_buckets=tuple(int(x) for x in self.conf),
            error_clusters=_clusters(d[:, 1], d[:, 0]),
            fallback_clusters=_clusters(d[:, 2], d[:, 0]),
            agreement_clusters=_clusters(d[:, 4], d[:, 3]),
            accuracy_clusters=_clusters(self.mass, self.answers),
        )


def _quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile of a log histogram (underflow first), geometric inside its bucket."""
    total = sum(counts)
    if total == 0:
        return None
    target, cum = q * total, float(counts[0])
    if cum >= target:
        return LAT_MIN_MS
    for i, c in enumerate(counts[1:]):
        if c and cum + c >= target:
            return float(LAT_MIN_MS * LAT_GROWTH ** (i + (target - cum) / c))
        cum += c
    return float(LAT_MIN_MS * LAT_GROWTH**LAT_BUCKETS)


# --- the gates as they were --------------------------------------------------------------

_HIGHER_IS_BETTER = {eng.GateMetric.SHADOW_AGREEMENT, eng.GateMetric.ESTIMATED_ACCURACY}


def _mean_confidence(buckets: Sequence[int]) -> tuple[float | None, int]:
    n = sum(buckets)
    if not n:
        return None, 0
    b = len(buckets)
    return sum(c * (i + 0.5) / b for i, c in enumerate(buckets)) / n, n


def old_gate_verdicts(
    gates: Sequence[eng.Gate],
    cohort: eng.VersionStats,
    baseline: eng.VersionStats,
    failed_pct: float,
    cohort_devices: int,
) -> list[tuple[eng.GateMetric, bool | None]]:
    """The rule the engine applied before the statistical gates (commit c1088af^): once
    `min_samples` are in, the point value (or its difference to the baseline's point value)
    against the threshold; None below that. estimated_accuracy did not exist then; it is
    judged the same way, on the mean confidence of the local answers."""
    out: list[tuple[eng.GateMetric, bool | None]] = []
    M = eng.GateMetric
    for gate in gates:
        value: float | None
        base: float | None = None
        samples = cohort.requests
        if gate.metric is M.FAILED_DEVICE_PCT:
            value, samples = (failed_pct if cohort_devices else None), cohort_devices
        elif gate.metric is M.ERROR_RATE:
            value, base = cohort.error_rate, baseline.error_rate
        elif gate.metric is M.FALLBACK_RATE:
            value, base = cohort.fallback_rate, baseline.fallback_rate
        elif gate.metric is M.SHADOW_AGREEMENT:
            value, base, samples = cohort.agreement, baseline.agreement, cohort.shadow_sampled
        elif gate.metric is M.ESTIMATED_ACCURACY:
            value, samples = _mean_confidence(cohort.confidence_buckets)
            base = _mean_confidence(baseline.confidence_buckets)[0]
        else:  # P95_LATENCY_RATIO
            b = baseline.p95_latency_ms
            value = cohort.p95_latency_ms / b if cohort.p95_latency_ms is not None and b else None
        if value is not None and gate.relative:
            if base is None:
                value = None
            else:
                value = base - value if gate.metric in _HIGHER_IS_BETTER else value - base
        if value is None or samples < gate.min_samples:
            out.append((gate.metric, None))
        elif gate.metric in _HIGHER_IS_BETTER and not gate.relative:
            out.append((gate.metric, value >= gate.threshold))
        else:
            out.append((gate.metric, value <= gate.threshold))
    return out


# --- one rollout ---------------------------------------------------------------------------

_TERMINAL = {eng.RolloutStatus.COMPLETED, eng.RolloutStatus.ABORTED, eng.RolloutStatus.PAUSED}


class _Rollout:
    def __init__(self, plan: eng.RolloutPlan, delays: np.ndarray, *, old: bool) -> None:
        self.plan = plan
        self.old = old
        # The old rule judges the gates itself; the engine only walks the stages.
        self.walk = (
            replace(plan, stages=tuple(replace(s, gates=()) for s in plan.stages)) if old else plan
        )
        self.ids = [f"dev-{i:04d}" for i in range(len(delays))]
        self.index = {d: i for i, d in enumerate(self.ids)}
        self.views = {d: eng.DeviceView(d) for d in self.ids}
        self.delays = delays
        self.healthy_at = np.full(len(delays), np.inf)
        self.on_new = np.zeros(len(delays), dtype=bool)
        self.state = eng.RolloutState.initial(0.0)
        self.cohort, self.baseline = _Totals(len(delays)), _Totals(len(delays))
        self.outcome: Outcome | None = None
        self.canary: tuple[float, int, int] | None = None
        self.history: _History | None = None

    def tick(self, now: float, draw: _Tick | None = None) -> None:
        """`draw`: the interval's telemetry of every device under both versions; the cohort
        takes the new version's on the devices running it, the baseline the others'."""
        if draw is not None:
            on = self.on_new.copy()
            for side, v, mask in ((self.cohort, 1, on), (self.baseline, 0, ~on)):
                conf, lat = draw.histograms(v, mask)
                side.add(mask, draw.counts[v], draw.answers[v], draw.mass[v], conf, lat)
        for i in np.flatnonzero((self.healthy_at <= now) & ~self.on_new):
            d = self.ids[i]
            if self.views[d].state is eng.DeviceState.ASSIGNED:
                at = float(self.healthy_at[i])
                self.views[d] = replace(
                    self.views[d], state=eng.DeviceState.SUCCEEDED, updated_at=at
                )
                self.on_new[i] = True
        views = list(self.views.values())
        cohort, baseline = self.cohort.stats(), self.baseline.stats()
        if self.history is not None:
            touched = np.array([v.state is not None for v in views])
            h, new, old = self.history, self.cohort, self.baseline
            cohort = replace(cohort, **_changes(new.dev, new.answers, new.mass, h, touched))
            baseline = replace(baseline, **_changes(old.dev, old.answers, old.mass, h, ~touched))
        obs = eng.Observation(now, views, cohort, baseline)
        decision = eng.step(self.walk, self.state, obs)
        if self.old:
            decision = self._old_gates(decision, now, views, cohort, baseline)
        self._apply(decision, now)
        status = self.state.status
        if self.canary is None and (self.state.stage_index > 0 or status in _TERMINAL):
            c = self.cohort.counts
            self.canary = (now, int(c[0]), int(c[3]))
        if status in _TERMINAL:
            reason = ""
            for e in decision.events:
                if e.kind is eng.EventKind.GATE_FAILED:
                    reason = e.actor.removeprefix("gate:")
                elif e.kind is eng.EventKind.GATE_EVIDENCE_TIMEOUT:
                    reason = "no evidence: " + ",".join(g["metric"] for g in e.detail["gates"])
            self._finish(status.value, reason, now)

    def stall(self, now: float) -> None:
        self._finish("stalled", "waiting at the horizon", now)

    def _finish(self, status: str, reason: str, now: float) -> None:
        c = self.cohort.counts
        canary = self.canary or (math.nan, 0, 0)
        self.outcome = Outcome(
            status, reason, self.state.stage_index, now, int(c[0]), int(c[3]), *canary
        )

    def _old_gates(
        self,
        d: eng.Decision,
        now: float,
        views: list[eng.DeviceView],
        cohort: eng.VersionStats,
        baseline: eng.VersionStats,
    ) -> eng.Decision:
        idx = self.state.stage_index
        moved_on = d.state.stage_index != idx or d.state.status is eng.RolloutStatus.COMPLETED
        gates = self.plan.stages[idx].gates
        if not gates or not (moved_on or d.state.stage_settled_at is not None):
            return d
        touched = [v for v in views if v.state is not None]
        failed = sum(1 for v in touched if v.state is eng.DeviceState.FAILED)
        pct = 100.0 * failed / len(touched) if touched else 0.0
        verdicts = old_gate_verdicts(gates, cohort, baseline, pct, len(touched))
        broken = [m for m, ok in verdicts if ok is False]
        if broken:
            abort = eng.command(self.walk, self.state, eng.Command.ABORT, "gate", now, views)
            event = eng.Event(eng.EventKind.GATE_FAILED, f"gate:{broken[0].value}", idx)
            return replace(abort, events=(event, *abort.events))
        if moved_on and any(ok is None for _, ok in verdicts):
            # Held without a deadline until every gate has min_samples (waiting_for_telemetry).
            settled = self.state.stage_settled_at
            return eng.Decision(
                replace(self.state, stage_settled_at=now if settled is None else settled)
            )
        return d

    def _apply(self, d: eng.Decision, now: float) -> None:
        self.state = d.state
        for dev in d.assign:
            i = self.index[dev]
            self.views[dev] = eng.DeviceView(dev, eng.DeviceState.ASSIGNED, now, now)
            self.healthy_at[i] = now + self.delays[i]
        for dev, _ in d.fail:
            self.views[dev] = replace(self.views[dev], state=eng.DeviceState.FAILED)
            self.on_new[self.index[dev]] = False
        for dev in d.rollback:
            self.views[dev] = replace(self.views[dev], state=eng.DeviceState.ROLLED_BACK)
            self.on_new[self.index[dev]] = False
            self.healthy_at[self.index[dev]] = np.inf


@dataclass(frozen=True)
class _Tick:
    """One interval under both versions (index 0: baseline, 1: new): per-device counts and
    confidence buckets, and local-latency histograms per group of devices."""

    counts: tuple[np.ndarray, np.ndarray]  # (devices, 5) each
    answers: tuple[np.ndarray, np.ndarray]  # (devices,) local answers
    mass: tuple[np.ndarray, np.ndarray]  # (devices,) their confidence mass
    group: np.ndarray  # each device's group: which of the two rollouts run it on new
    # (version, group) -> (confidence buckets, local-latency histogram)
    hists: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]

    def histograms(self, version: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        conf = np.zeros(CONF_BUCKETS, dtype=np.int64)
        lat = np.zeros(1 + LAT_BUCKETS, dtype=np.int64)
        for g in set(np.unique(self.group[mask]).tolist()):
            c, la = self.hists[(version, g)]
            conf += c
            lat += la
        return conf, lat


def simulate(
    seed: int | Sequence[int], plan: eng.RolloutPlan, base: Version, new: Version, world: World
) -> tuple[Outcome, Outcome]:
    """One rollout of `new` against `base` under the plan's gates and under the old rule,
    over the same simulated telemetry. Returns (new gates, old gates)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    n = world.devices
    rates = world.median_rps * np.exp(world.rps_sigma * rng.standard_normal(n))
    delays = rng.uniform(*world.install_s, size=n)
    offsets = world.device_spread * rng.standard_normal((3, n))
    models = _Model.of(base, offsets), _Model.of(new, offsets)
    moments = []
    for m in models:
        mu = float(m.conf @ _MIDS)
        moments.append((mu, math.sqrt(max(float(m.conf @ (_MIDS * _MIDS)) - mu * mu, 0.0))))
    runs = [_Rollout(plan, delays, old=False), _Rollout(plan, delays, old=True)]
    if world.history_s > 0:
        before = models[0].counts(rng, rng.poisson(rates * world.history_s), world.shadow_rate)
        k = before[:, 0] - before[:, 1] - before[:, 2]
        mu, sd = moments[0]
        mass = np.clip(k * mu + np.sqrt(k) * sd * rng.standard_normal(n), 0.0, k)
        runs[0].history = _History(before, k, mass)  # the old rule had no use for it
    for r in runs:
        r.tick(0.0)
    now = 0.0
    while any(r.outcome is None for r in runs):
        now += world.tick_s
        requests = rng.poisson(rates * world.tick_s)
        per_device = [m.counts(rng, requests, world.shadow_rate) for m in models]
        local = [c[:, 0] - c[:, 1] - c[:, 2] for c in per_device]
        # Each device's confidence mass (sum of its local answers' confidences): normal with
        # the bucket distribution's mean and variance (a multinomial per device costs 4x).
        mass = [
            np.clip(k * mu + np.sqrt(k) * sd * rng.standard_normal(n), 0.0, k)
            for k, (mu, sd) in zip(local, moments, strict=True)
        ]
        # Histograms per group of devices (by the version they ran in each of the two
        # rollouts), so that both rollouts see the same numbers where they agree.
        group = runs[0].on_new.astype(np.int64) + 2 * runs[1].on_new
        hists = {
            (v, g): (
                rng.multinomial(int(local[v][group == g].sum()), models[v].conf),
                rng.multinomial(int(local[v][group == g].sum()), models[v].latency),
            )
            for v in range(2)
            for g in range(4)
        }
        draw = _Tick(
            (per_device[0], per_device[1]), (local[0], local[1]), (mass[0], mass[1]), group, hists
        )
        for r in runs:
            if r.outcome is None:
                r.tick(now, draw)
                if r.outcome is None and now >= world.horizon_s:
                    r.stall(now)
    new_outcome, old_outcome = (r.outcome for r in runs)
    assert new_outcome is not None and old_outcome is not None
    return new_outcome, old_outcome


# --- plans, scenarios and the tally --------------------------------------------------------

BASE = Version()


def make_plan(
    *,
    boundary: bool = False,
    soak_s: float = 1800.0,
    max_wait_s: float = 3600.0,
    min_requests: int = 500,
    min_shadow: int = 200,
    percents: Sequence[float] = (1, 10, 50, 100),
) -> eng.RolloutPlan:
    """Gates on every stage but the last, relative to the baseline where the metric allows.

    The default thresholds leave a margin under which a good version sits (what an operator
    sets); `boundary` puts every proportion threshold on the good version's true value (no
    worse than the baseline at all), the hardest case for the stated false-abort rate. The
    latency gate keeps 1.2 in both: it has no min_effect and passes on the point ratio, so
    at a threshold of 1.0 a good version would wait there about half the time. Each gate
    keeps the default min_effect (0.02), the plan the default false_abort_rate (0.01)."""
    M = eng.GateMetric
    t_err, t_fb, t_agree, t_acc, t_lat = (0.0, 0.0, 0.0, 0.0, 1.2) if boundary else _MARGINS
    gates = (
        eng.Gate(M.ERROR_RATE, t_err, min_requests, relative=True),
        eng.Gate(M.FALLBACK_RATE, t_fb, min_requests, relative=True),
        eng.Gate(M.SHADOW_AGREEMENT, t_agree, min_shadow, relative=True),
        eng.Gate(M.ESTIMATED_ACCURACY, t_acc, min_requests, relative=True),
        eng.Gate(M.P95_LATENCY_RATIO, t_lat, min_requests),
        eng.Gate(M.FAILED_DEVICE_PCT, 5.0),
    )
    *gated, last = percents
    stages = [eng.Stage(p, soak_s, gates, max_wait_s) for p in gated]
    stages.append(eng.Stage(last, 0.0, (), max_wait_s))
    return eng.RolloutPlan("digits", 2, tuple(stages), device_timeout_s=3600.0)


_MARGINS = (0.005, 0.02, 0.01, 0.01, 1.2)


def bad_versions(plan: eng.RolloutPlan, factor: float = 1.0) -> dict[str, Version]:
    """Versions degraded on one metric by `factor` times the smallest degradation its gate
    must catch (threshold + min_effect; the p95 ratio threshold x 1.25 for latency), plus one
    that answers almost nothing locally."""
    by = {g.metric: g for g in plan.stages[0].gates}
    M = eng.GateMetric

    def worse(m: eng.GateMetric) -> float:
        return factor * (by[m].threshold + by[m].min_effect)

    lat = by[M.P95_LATENCY_RATIO].threshold * (1 + 0.25 * factor)
    return {
        "error_rate": replace(BASE, error_rate=BASE.error_rate + worse(M.ERROR_RATE)),
        "fallback_rate": replace(BASE, fallback_rate=BASE.fallback_rate + worse(M.FALLBACK_RATE)),
        "shadow_agreement": replace(BASE, agreement=BASE.agreement - worse(M.SHADOW_AGREEMENT)),
        "estimated_accuracy": replace(BASE, accuracy_drop=worse(M.ESTIMATED_ACCURACY)),
        "p95_latency": replace(BASE, latency_median_ms=BASE.latency_median_ms * lat),
        "mute (90% fallbacks)": replace(BASE, fallback_rate=0.9, error_rate=0.01),
    }


@dataclass(frozen=True)
class Result:
    """The outcomes of one scenario: good or bad rollouts, under the new and the old gates."""

    name: str
    good: bool
    new: tuple[Outcome, ...]
    old: tuple[Outcome, ...]
    kinds: tuple[str, ...]  # the degradation of each bad rollout ("" for good ones)


def run(
    name: str,
    plan: eng.RolloutPlan,
    world: World,
    runs: int,
    *,
    seed: int,
    bad: dict[str, Version] | None = None,
) -> Result:
    """`runs` rollouts with seeds (seed, i): of BASE itself, or of the bad versions in turn."""
    new, old, kinds = [], [], []
    names = list(bad) if bad else [""]
    for i in range(runs):
        kind = names[i % len(names)]
        version = bad[kind] if bad else BASE
        a, b = simulate((seed, i), plan, BASE, version, world)
        new.append(a)
        old.append(b)
        kinds.append(kind)
    return Result(name, bad is None, tuple(new), tuple(old), tuple(kinds))


def wilson95(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def count(outcomes: Sequence[Outcome], status: str) -> int:
    return sum(1 for o in outcomes if o.status == status)


def table(results: Sequence[Result]) -> list[str]:
    head = (
        f"{'scenario':<28} {'gates':<5} {'runs':>4} {'done':>4} {'abort':>5} {'pause':>5} "
        f"{'stall':>5}  {'key rate [Wilson 95%]':<31} {'canary requests':>17} "
        f"{'canary shadow':>15} {'canary min':>11} {'rollout min':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        for gates, outs in (("new", r.new), ("old", r.old)):
            n = len(outs)
            done, ab = count(outs, "completed"), count(outs, "aborted")
            pa, st = count(outs, "paused"), count(outs, "stalled")
            if r.good:
                lo, hi = wilson95(ab, n)
                key = f"false abort {ab / n:6.1%} [{lo:.1%}, {hi:.1%}]"
            else:
                lo, hi = wilson95(n - done, n)
                key = f"stopped {(n - done) / n:6.1%} [{lo:.1%}, {hi:.1%}]"
            req = [float(o.canary_requests) for o in outs]
            shadow = [float(o.canary_shadow) for o in outs]
            canary = [o.canary_s / 60 for o in outs]
            mins = [o.time_s / 60 for o in outs]
            lines.append(
                f"{r.name:<28} {gates:<5} {n:>4} {done:>4} {ab:>5} {pa:>5} {st:>5}  {key:<31} "
                f"{_pct(req, 50):>8,.0f}/{_pct(req, 90):<8,.0f} "
                f"{_pct(shadow, 50):>6,.0f}/{_pct(shadow, 90):<8,.0f} "
                f"{_pct(canary, 50):>4.0f}/{_pct(canary, 90):<6.0f} "
                f"{_pct(mins, 50):>4.0f}/{_pct(mins, 90):<6.0f}"
            )
    return lines


def by_kind(r: Result) -> list[str]:
    """Bad rollouts per degradation: how each rule ended them."""
    lines = []
    for kind in dict.fromkeys(r.kinds):
        idx = [i for i, k in enumerate(r.kinds) if k == kind]
        parts = []
        for gates, outs in (("new", r.new), ("old", r.old)):
            sel = [outs[i] for i in idx]
            parts.append(
                f"{gates}: {count(sel, 'aborted')} aborted, {count(sel, 'paused')} paused, "
                f"{count(sel, 'stalled')} stalled, {count(sel, 'completed')} completed"
            )
        lines.append(f"  {kind:<22} ({len(idx)} runs)  " + " | ".join(parts))
    return lines
