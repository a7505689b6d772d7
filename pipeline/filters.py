"""Keep-or-filter decisions from the score columns, recorded with their reasons.

A pure function of the table's columns and the spec's thresholds: re-filtering a committed table
version with new thresholds never decodes anything. Rows already `rejected` (bad source) or
`duplicate` (decided by dedup, which runs after filtering) pass through untouched; every other row is
decided again: `kept` with a null reason, or `filtered` with every failed check named, e.g.
"blur 0.93 > max_blur 0.85; text_ratio 0.12 > max_text_ratio 0.05". A score an enabled threshold needs
but the row lacks (null or NaN) filters the row as "scores missing: motion, blur".
"""
import numpy as np
import pyarrow as pa

from pipeline.spec import FilterSpec

_PASS_THROUGH = {"rejected", "duplicate"}


def _floats(rows: pa.Table, name: str) -> np.ndarray:
    """A column as float64 with NaN for null; all NaN if the table has no such column."""
    if name not in rows.column_names:
        return np.full(rows.num_rows, np.nan)
    return rows.column(name).cast(pa.float64()).to_numpy()  # nulls become NaN


def _duration_s(rows: pa.Table) -> np.ndarray:
    """Clip length in seconds: end_s - start_s, else (end_frame - start_frame) / fps."""
    d = _floats(rows, "end_s") - _floats(rows, "start_s")
    by_frames = (_floats(rows, "end_frame") - _floats(rows, "start_frame")) / _floats(rows, "fps")
    return np.where(np.isfinite(d), d, by_frames)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def apply_filters(rows: pa.Table, spec: FilterSpec, min_seconds: float, max_seconds: float) -> pa.Table:
    """Return `rows` with `status` and `reason` set from the scores (other columns untouched).

    Checks, in this order: duration (seconds) within [min_seconds, max_seconds], motion >= min_motion,
    not static (drop_static), blur <= max_blur, brightness within [min_brightness, max_brightness],
    text_ratio <= max_text_ratio, aesthetic >= min_aesthetic. A None threshold is skipped.
    """
    n = rows.num_rows
    status_in = rows.column("status").to_pylist() if "status" in rows.column_names else [None] * n
    reason_in = rows.column("reason").to_pylist() if "reason" in rows.column_names else [None] * n

    # (column, op, limit, limit name) in report order; a None limit is off.
    checks = [("duration", "<", min_seconds, "min_seconds"),
              ("duration", ">", max_seconds, "max_seconds"),
              ("motion", "<", spec.min_motion, "min_motion"),
              ("static", "is", spec.drop_static or None, "drop_static"),
              ("blur", ">", spec.max_blur, "max_blur"),
              ("brightness", "<", spec.min_brightness, "min_brightness"),
              ("brightness", ">", spec.max_brightness, "max_brightness"),
              ("text_ratio", ">", spec.max_text_ratio, "max_text_ratio"),
              ("aesthetic", "<", spec.min_aesthetic, "min_aesthetic")]
    checks = [c for c in checks if c[2] is not None]
    values = {"duration": _duration_s(rows)}
    for col, _, _, _ in checks:
        if col not in values:
            values[col] = _floats(rows, col)  # static: 1.0 / 0.0 / NaN

    missing: list[list[str]] = [[] for _ in range(n)]
    for col in dict.fromkeys(c for c, _, _, _ in checks):  # each needed column once, in order
        for r in np.nonzero(~np.isfinite(values[col]))[0]:
            missing[r].append(col)
    failures: list[list[str]] = [[] for _ in range(n)]
    for col, op, limit, limit_name in checks:
        v = values[col]
        ok = np.isfinite(v)
        if op == "is":
            for r in np.nonzero(ok & (v > 0))[0]:
                failures[r].append("static hold (drop_static)")
            continue
        # A clip holds whole frames: allow float rounding of the frame times at the length limits.
        tol = 1e-6 if col == "duration" else 0.0
        bad = ok & ((v < limit - tol) if op == "<" else (v > limit + tol))
        for r in np.nonzero(bad)[0]:
            failures[r].append(f"{col} {_fmt(v[r])} {op} {limit_name} {limit:g}")

    status, reason = [], []
    for r in range(n):
        if status_in[r] in _PASS_THROUGH:
            status.append(status_in[r])
            reason.append(reason_in[r])
            continue
        parts = ([f"scores missing: {', '.join(missing[r])}"] if missing[r] else []) + failures[r]
        status.append("filtered" if parts else "kept")
        reason.append("; ".join(parts) if parts else None)
    for name, new in (("status", status), ("reason", reason)):
        col = pa.array(new, type=pa.string())
        rows = (rows.set_column(rows.column_names.index(name), name, col) if name in rows.column_names
                else rows.append_column(name, col))
    return rows
