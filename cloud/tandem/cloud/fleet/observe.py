"""What the rollout engine sees: the targeted devices, their variants, and the cohort's and
the baseline's telemetry as `VersionStats`. Reads the store, decides nothing."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import replace
from typing import TypedDict

from tandem.sdk.histogram import LogHistogram

from . import engine as eng
from .errors import NotFoundError
from .gates import Change, Clusters
from .store import Artifact, Device, Rollout, Store, pick_variant
from .telemetry import DeviceTotals, TelemetryStats

# How far back before a rollout's creation each device's baseline-version telemetry is read:
# the history that the within-device gates compare every device with (gates.Change).
HISTORY_S = 3600.0
# That history is fixed once the rollout exists, but for summaries still in flight when it
# was created (an agent's interval, a resend): a cached read is refreshed this often.
HISTORY_REFRESH_S = 15.0
# rollout id -> (when read, by the service's clock; the per-device history)
HistoryCache = MutableMapping[str, tuple[float, Sequence[DeviceTotals]]]


def observation(
    store: Store,
    r: Rollout,
    now: float,
    targets: Sequence[Device],
    history: HistoryCache | None = None,
) -> eng.Observation:
    """What the engine sees of rollout `r` at `now`: every targeted device's state, and the
    telemetry of the cohort (the new version on the devices it was assigned to, since the
    stage's gate window opened) and of the baseline version over the same window; and each
    device's baseline-version telemetry in the `HISTORY_S` before the rollout, from which
    both sides get their within-device change (`changes`). With a `history` cache that read
    is made once per `HISTORY_REFRESH_S` per rollout instead of at every turn."""
    assignments = {a.device_id: a for a in store.assignments(r.rollout_id)}
    views = [eng.DeviceView(d.device_id) for d in targets if d.device_id not in assignments]
    views += [
        eng.DeviceView(a.device_id, a.state, a.assigned_at, a.updated_at)
        for a in assignments.values()
    ]
    touched = list(assignments)
    cohort = (
        store.telemetry_stats(
            r.plan.model, r.plan.version, since=r.state.gate_window_start, device_ids=touched
        )
        if touched
        else None
    )
    baseline = (
        store.telemetry_stats(r.plan.model, r.baseline_version, since=r.state.gate_window_start)
        if r.baseline_version is not None
        else None
    )
    base_hist = baseline.latency_local if baseline is not None else None
    base_tokens = baseline.ms_per_token if baseline is not None else None
    cohort_view = version_stats(cohort, base_hist, base_tokens)
    baseline_view = version_stats(baseline)
    if r.baseline_version is not None and cohort is not None and baseline is not None:
        before = _history(store, r, r.baseline_version, now, history)
        mine = set(touched)
        cohort_view = replace(cohort_view, **changes(cohort.per_device, before, keep=mine))
        others = {d.device_id for d in baseline.per_device} - mine
        baseline_view = replace(baseline_view, **changes(baseline.per_device, before, keep=others))
    return eng.Observation(now, views, cohort_view, baseline_view)


def _history(
    store: Store, r: Rollout, baseline_version: int, now: float, cache: HistoryCache | None
) -> Sequence[DeviceTotals]:
    hit = cache.get(r.rollout_id) if cache is not None else None
    if hit is not None and 0 <= now - hit[0] < HISTORY_REFRESH_S:
        return hit[1]
    before = store.telemetry_stats(
        r.plan.model, baseline_version, since=r.created_at - HISTORY_S, until=r.created_at
    ).per_device
    if cache is not None:
        cache[r.rollout_id] = (now, before)
    return before


def targets(store: Store, r: Rollout) -> tuple[list[Device], dict[str, str]]:
    """Online devices matching the selector that have a variant, and that variant."""
    artifacts = store.artifacts(r.plan.model, r.plan.version)
    out, variants = [], {}
    for d in store.devices(r.selector, online=True):
        variant = pick_variant(d, artifacts)
        if variant is not None:
            out.append(d)
            variants[d.device_id] = variant
    return out, variants


def baseline_variants(store: Store, r: Rollout, device_ids: Sequence[str]) -> dict[str, str]:
    if not device_ids:
        return {}
    assignments = {a.device_id: a for a in store.assignments(r.rollout_id)}
    cache: dict[int, list[Artifact]] = {}
    out: dict[str, str] = {}
    for device_id in device_ids:
        a = assignments.get(device_id)
        version = a.previous_version if a else r.baseline_version
        if version is None:
            continue
        if version not in cache:
            cache[version] = store.artifacts(r.plan.model, version)
        try:
            device = store.device(device_id)
        except NotFoundError:
            continue
        variant = pick_variant(device, cache[version])
        if variant is not None:
            out[device_id] = variant
    return out


def _rebucketed(hist: LogHistogram | None, layout: LogHistogram | None) -> LogHistogram | None:
    if hist is None or layout is None or hist.layout == layout.layout:
        return hist
    rebucketed = LogHistogram(layout.min_value, layout.growth, len(layout.counts))
    rebucketed.merge(hist)
    return rebucketed


def version_stats(
    stats: TelemetryStats | None,
    layout: LogHistogram | None = None,
    token_layout: LogHistogram | None = None,
) -> eng.VersionStats:
    """The engine's view of one version's telemetry. The local-latency histogram goes into
    `layout`'s buckets (the baseline's) when given, and the milliseconds-per-token histogram
    into `token_layout`'s, so cohort and baseline are ranked on one bucket layout even when
    their devices were configured differently."""
    if stats is None:
        return eng.VersionStats()
    hist = _rebucketed(stats.latency_local, layout)
    token_time = _rebucketed(stats.ms_per_token, token_layout)
    return eng.VersionStats(
        requests=stats.requests,
        errors=stats.errors,
        fallbacks=stats.fallbacks,
        shadow_sampled=stats.shadow_sampled,
        shadow_agreed=stats.shadow_agreed,
        p95_latency_ms=stats.p95_latency_ms,
        latency_counts=hist.bucket_counts() if hist is not None else (),
        latency_layout=hist.layout if hist is not None else None,
        token_time_counts=token_time.bucket_counts() if token_time is not None else (),
        token_time_layout=token_time.layout if token_time is not None else None,
        p50_ms_per_token=token_time.quantile(0.5) if token_time else None,
        confidence_buckets=stats.confidence_buckets,
        confidence_sum=stats.confidence_sum,
        drafted=stats.drafted,
        accepted=stats.accepted,
        generations=stats.generations,
        escalations=stats.escalations,
        **clusters(stats.per_device),
    )


class ClusterFields(TypedDict, total=False):
    error_clusters: Clusters
    fallback_clusters: Clusters
    agreement_clusters: Clusters
    accuracy_clusters: Clusters
    acceptance_clusters: Clusters
    escalation_clusters: Clusters


class ChangeFields(TypedDict):
    error_change: Change
    fallback_change: Change
    agreement_change: Change
    accuracy_change: Change
    acceptance_change: Change
    escalation_change: Change


def clusters(devices: Sequence[DeviceTotals]) -> ClusterFields:
    """The per-device moments of each proportion (gates.Clusters), for the VersionStats
    fields of the same names; None without per-device totals."""
    if not devices:
        return {}
    return {
        "error_clusters": Clusters.of((d.errors, d.requests) for d in devices),
        "fallback_clusters": Clusters.of((d.fallbacks, d.requests) for d in devices),
        "agreement_clusters": Clusters.of((d.shadow_agreed, d.shadow_sampled) for d in devices),
        "accuracy_clusters": Clusters.of((d.confidence_mass, d.answers) for d in devices),
        "acceptance_clusters": Clusters.of((d.accepted, d.drafted) for d in devices),
        "escalation_clusters": Clusters.of((d.escalations, d.generations) for d in devices),
    }


def changes(
    after: Sequence[DeviceTotals], before: Sequence[DeviceTotals], keep: set[str]
) -> ChangeFields:
    """Each proportion's within-device change (gates.Change) of the devices in `keep`, from
    their totals `before` to `after`, for the VersionStats fields of the same names."""
    old = {d.device_id: d for d in before}
    none = DeviceTotals("")
    pairs = [(d, old.get(d.device_id, none)) for d in after if d.device_id in keep]

    def of(x: Callable[[DeviceTotals], tuple[float, float]]) -> Change:
        return Change.of((x(a), x(b)) for a, b in pairs)

    return {
        "error_change": of(lambda d: (d.errors, d.requests)),
        "fallback_change": of(lambda d: (d.fallbacks, d.requests)),
        "agreement_change": of(lambda d: (d.shadow_agreed, d.shadow_sampled)),
        "accuracy_change": of(lambda d: (d.confidence_mass, d.answers)),
        "acceptance_change": of(lambda d: (d.accepted, d.drafted)),
        "escalation_change": of(lambda d: (d.escalations, d.generations)),
    }
