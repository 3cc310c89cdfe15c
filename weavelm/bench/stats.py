"""Summary statistics: median, percentiles, spread."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(values: list[float], scale: float = 1.0) -> dict:
    """mean, median, p90, p99, min, max (each times `scale`) and n; NaN-free: empty input gives None values."""
    if not values:
        return {"n": 0, "mean": None, "median": None, "p90": None, "p99": None, "min": None, "max": None}
    v = [x * scale for x in values]
    return {"n": len(v), "mean": statistics.fmean(v), "median": percentile(v, 50), "p90": percentile(v, 90),
            "p99": percentile(v, 99), "min": min(v), "max": max(v)}


def spread(values: list[float]) -> dict:
    """For repeated runs: median, min, max, and the relative spread (max - min) / median."""
    med = percentile(values, 50)
    return {"median": med, "min": min(values), "max": max(values), "values": list(values),
            "rel_spread": (max(values) - min(values)) / med if med else None}
