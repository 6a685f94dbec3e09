"""Checking a variant against the full model, output by output (the spec build's gate).

The primary output (`[model] scores`) by the task's measure and `[checks]`: classification
top-1 agreement (and accuracy drop when labels exist), embedding mean cosine, regression and
generic max / mean absolute error. Every other output by `[checks.outputs.<name>]`: float
outputs by mean cosine per row plus the abs errors when given, integer and bool outputs by
exact agreement. Each returns the measures (for the report) and the tolerances missed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tandem.cloud.build.spec import DEFAULT_OUTPUT_CHECKS, ModelSpec

Array = np.ndarray[Any, Any]


def _tolerance(spec: ModelSpec, key: str, scale: float, share: float) -> float:
    return float(spec.checks.get(key, share * scale))


def check_variant(
    spec: ModelSpec, full: Array, variant: Array, labels: Array | None
) -> tuple[dict[str, float], list[str]]:
    """The variant's quality numbers on the primary output, and each tolerance it misses."""
    metrics: dict[str, float] = {}
    misses: list[str] = []
    full = full.astype(np.float64).reshape(full.shape[0], -1)
    variant = variant.astype(np.float64).reshape(variant.shape[0], -1)
    if spec.task == "classification":
        agreement = float(np.mean(full.argmax(1) == variant.argmax(1)))
        metrics["top1_agreement"] = agreement
        limit = spec.checks["min_top1_agreement"]
        if agreement < limit:
            misses.append(
                f"top1_agreement {agreement:.4f} < {limit} (short by {limit - agreement:.4f})"
            )
        if labels is not None:
            full_acc = float(np.mean(full.argmax(1) == labels))
            acc = float(np.mean(variant.argmax(1) == labels))
            metrics["accuracy"], metrics["full_accuracy"] = acc, full_acc
            drop, limit = full_acc - acc, spec.checks["max_accuracy_drop"]
            if drop > limit:
                misses.append(f"accuracy drop {drop:.4f} > {limit} (over by {drop - limit:.4f})")
    elif spec.task == "embedding":
        norms = np.linalg.norm(full, axis=1) * np.linalg.norm(variant, axis=1)
        cosine = float(np.mean(np.sum(full * variant, axis=1) / np.maximum(norms, 1e-12)))
        metrics["cosine_mean"] = cosine
        limit = spec.checks["min_cosine"]
        if cosine < limit:
            misses.append(f"cosine {cosine:.4f} < {limit} (short by {limit - cosine:.4f})")
    else:
        error = np.abs(full - variant)
        scale = float(np.mean(np.abs(full))) or 1.0
        for key, value, share in (
            ("max_abs_error", float(error.max()), 1.0),
            ("max_mean_abs_error", float(error.mean()), 0.1),
        ):
            metrics[key.removeprefix("max_")] = value
            limit = _tolerance(spec, key, scale, share)
            if value > limit:
                misses.append(f"{key[4:]} {value:.4g} > {limit:.4g} (over by {value - limit:.4g})")
    return {k: round(v, 6) for k, v in metrics.items()}, misses


def check_secondary(
    spec: ModelSpec, name: str, full: Array, variant: Array
) -> tuple[dict[str, float], list[str]]:
    """One secondary output against the full model's: cosine and abs errors, or agreement."""
    limits = {**DEFAULT_OUTPUT_CHECKS, **spec.output_checks.get(name, {})}
    metrics: dict[str, float] = {}
    misses: list[str] = []

    def gate(key: str, value: float, limit_key: str, low: bool) -> None:
        metrics[f"{name}.{key}"] = round(value, 6)
        limit = limits.get(limit_key)
        if limit is None:
            return
        if low and value < limit:
            misses.append(f"{name} {key} {value:.4f} < {limit} (short by {limit - value:.4f})")
        elif not low and value > limit:
            misses.append(f"{name} {key} {value:.4g} > {limit:.4g} (over by {value - limit:.4g})")

    if full.dtype.kind in "biu":
        same = np.all(full.reshape(full.shape[0], -1) == variant.reshape(variant.shape[0], -1), 1)
        gate("agreement", float(np.mean(same)), "min_agreement", True)
        return metrics, misses
    a = full.astype(np.float64).reshape(full.shape[0], -1)
    b = variant.astype(np.float64).reshape(variant.shape[0], -1)
    if a.shape[1] == 1:  # one number per row: the cosine of the whole column
        a, b = a.T, b.T
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosines = np.where(norms > 1e-12, np.sum(a * b, axis=1) / np.maximum(norms, 1e-12), 1.0)
    gate("cosine_mean", float(np.mean(cosines)), "min_cosine", True)
    error = np.abs(a - b)
    gate("max_abs_error", float(error.max()), "max_abs_error", False)
    gate("mean_abs_error", float(error.mean()), "max_mean_abs_error", False)
    return metrics, misses


def check_outputs(
    spec: ModelSpec,
    full: Mapping[str, Array],
    variant: Mapping[str, Array],
    primary: str,
    labels: Array | None,
) -> tuple[dict[str, float], list[str]]:
    """Every output of a variant against the full model's: the primary, then the others."""
    metrics, misses = check_variant(spec, full[primary], variant[primary], labels)
    for name in full:
        if name != primary:
            more, missed = check_secondary(spec, name, full[name], variant[name])
            metrics.update(more)
            misses += missed
    return metrics, misses


def export_misses(full: Mapping[str, Array], exported: Mapping[str, Array]) -> list[str]:
    """Where an FP32 export is not the model it was exported from (float round-off allowed)."""
    misses = []
    for name, a in full.items():
        b = exported[name]
        if a.shape != b.shape:
            misses.append(f"{name} has shape {list(b.shape)}, expected {list(a.shape)}")
        elif a.dtype.kind in "biu":
            if not np.array_equal(a, b):
                misses.append(f"{name} differs in {int(np.sum(a != b))} entries")
        else:
            error = float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0))
            limit = 1e-3 * (1.0 + float(np.max(np.abs(a), initial=0.0)))
            if error > limit:
                misses.append(f"{name} max_abs_error {error:.3g} > {limit:.3g}")
    return misses


__all__ = ["check_outputs", "check_secondary", "check_variant", "export_misses"]
