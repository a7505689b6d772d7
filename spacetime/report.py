"""The curation report: one self-contained HTML file describing one version of a dataset's `clips` table.

    write_report(root, version) -> <root>/report_v<N>.html
      #summary        dataset root, version, lineage (every version up to N), counts by status
      #funnel         sources -> clips -> each threshold in turn -> passed filters -> after dedup (kept)
      #histograms     one PNG per score column, stacked by status, the spec's thresholds drawn on it
      #contact-sheet  one card per clip: thumbnail, file + frame range, status badge, reason, key scores
      #duplicates     each clip that has near-duplicates, followed by them
      #rejected       rejected sources and why

Nothing is fetched when the file is opened: images are base64 data URIs, the CSS is inline, and there
is no script. Every string from the table (file names, reasons, lineage) is HTML-escaped, because a file
name is whatever the footage owner chose. `render_check` opens the file in headless Chromium, when one
is installed, to prove it renders.

Frame ranges are 0-based, end exclusive, in the source video; times are seconds.
"""
import base64
import datetime as dt
import html
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import store
from pipeline.schema import STATUSES
from pipeline.spec import ClipSpec, DatasetSpec, FilterSpec

SECTION_IDS = ("summary", "funnel", "histograms", "contact-sheet", "duplicates", "rejected")
STATUS_COLOURS = {"kept": "#2e7d32", "filtered": "#ef6c00", "duplicate": "#1565c0", "rejected": "#c62828",
                  "other": "#616161"}  # "other": a row with no (or an unknown) status
# Score columns that get a histogram, in display order, with the FilterSpec fields that threshold them.
HISTOGRAMS = {
    "motion": ("min_motion",),
    "blur": ("max_blur",),
    "sharpness": (),
    "brightness": ("min_brightness", "max_brightness"),
    "contrast": (),
    "text_ratio": ("max_text_ratio",),
    "aesthetic": ("min_aesthetic",),
}
CARD_SCORES = ("motion", "blur", "brightness", "text_ratio", "aesthetic")
MAX_CARDS = 400
MAX_DUP_GROUPS = 100
MAX_DUPS_SHOWN = 24  # per group; a clip repeated hundreds of times needs no hundred cards to show it
THUMB_MAX_SIDE = 192  # thumbnails are re-encoded no larger than this, so 400 cards stay a few MB

esc = html.escape  # quote=True by default: safe inside attribute values too


# --- small formatting helpers -----------------------------------------------------------------

def _num(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _when(t) -> str:
    """Commit time (epoch seconds, or epoch milliseconds as Delta records it) -> UTC text."""
    if t is None:
        return "–"
    t = float(t)
    if t > 1e11:  # Delta's history timestamps are milliseconds
        t /= 1000.0
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _badge(status: Optional[str]) -> str:
    colour = STATUS_COLOURS.get(status or "", "#616161")
    return f'<span class="badge" style="background:{colour}">{esc(status or "none")}</span>'


def _png_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)  # attach the Agg canvas: no pyplot, no global backend state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_uri(data: Optional[bytes]) -> Optional[str]:
    """Thumbnail bytes (JPEG or PNG) -> a small JPEG data URI; None when absent or undecodable."""
    if not data:
        return None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = THUMB_MAX_SIDE / max(h, w)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(jpg.tobytes()).decode("ascii") if ok else None


def _thumb_html(data: Optional[bytes], alt: str) -> str:
    uri = _thumb_uri(data)
    if uri is None:
        return '<div class="thumb placeholder">no thumbnail</div>'
    return f'<img class="thumb" src="{uri}" alt="{esc(alt)}">'


def _frames_text(r: dict) -> str:
    text = f"frames {_num(r.get('start_frame'))}–{_num(r.get('end_frame'))}"
    if r.get("start_s") is not None and r.get("end_s") is not None:
        text += f" ({r['start_s']:.2f}–{r['end_s']:.2f} s)"
    return text


def _finite(values: list) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return a[np.isfinite(a)]


# --- sections ---------------------------------------------------------------------------------

def summary_section(root: Path, version: int, lineage: list[dict], counts: dict, tags: dict) -> str:
    """Dataset root, version, the lineage of every version up to this one, and counts by status."""
    names = [t for t, v in sorted(tags.items()) if v == version]
    rows = []
    for h in lineage:
        cls = ' class="current"' if h["version"] == version else ""
        parent = h.get("parent_version")
        rows.append(
            f"<tr{cls}><td>{h['version']}</td><td>{esc(str(h.get('operation') or h.get('mode') or '–'))}</td>"
            f"<td><code>{esc(str(h.get('spec_hash') or '–'))}</code></td>"
            f"<td><code>{esc(str(h.get('code_version') or '–'))}</code></td>"
            f"<td>{'–' if parent is None else esc(str(parent))}</td>"
            f"<td>{_when(h.get('committed_at') or h.get('timestamp'))}</td></tr>")
    this = next((h for h in lineage if h["version"] == version), {})
    shown = {"version", "timestamp", "operation", "mode", "spec_hash", "code_version", "parent_version",
             "committed_at", "counts"}
    extra = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>"
                    for k, v in this.items() if k not in shown and v is not None)
    badges = " ".join(f"{_badge(s)} {counts.get(s, 0)}" for s in STATUSES)
    return (
        f'<section id="summary"><h1>Curation report</h1>'
        f"<p><b>Dataset root</b>: <code>{esc(str(root))}</code><br><b>Version</b>: {version}"
        f"{' (tags: ' + esc(', '.join(names)) + ')' if names else ''}</p>"
        f'<p class="counts">{badges}</p>'
        f"<h2>Lineage</h2><table><tr><th>version</th><th>operation</th><th>spec hash</th>"
        f"<th>code version</th><th>parent</th><th>committed</th></tr>{''.join(rows)}</table>"
        f"{'<ul class=extra>' + extra + '</ul>' if extra else ''}</section>")


def funnel_steps(table: pa.Table, filters: FilterSpec, min_seconds: float, max_seconds: float) -> list[tuple[str, int]]:
    """(label, count) from sources to kept clips.

    The threshold steps are recomputed from the stored scores with the given thresholds, each applied
    to the survivors of the one before (a missing or NaN score fails, as the filters record it); the
    last two steps are the statuses the table records (passed = kept + duplicate).
    """
    sources = len({u for u in table["source_uri"].to_pylist() if u is not None})
    clips = table.filter(pc.invert(pc.is_null(table["clip_id"])))
    needed = ("start_frame", "end_frame", "fps", "static", *HISTOGRAMS)
    rows = clips.select([c for c in needed if c in clips.column_names]).to_pylist()  # no thumbnails
    steps = [("sources", sources), ("clips", len(rows))]

    def dur(r):
        if r.get("start_frame") is None or r.get("end_frame") is None or not r.get("fps"):
            return None
        return (r["end_frame"] - r["start_frame"]) / r["fps"]

    def length_ok(r):
        d = dur(r)
        return d is not None and min_seconds - 1e-6 <= d <= max_seconds + 1e-6

    tests = [(f"{min_seconds:g} s ≤ duration ≤ {max_seconds:g} s", length_ok)]
    for col, field, op in (("motion", "min_motion", ">="), ("blur", "max_blur", "<="),
                           ("brightness", "min_brightness", ">="), ("brightness", "max_brightness", "<="),
                           ("text_ratio", "max_text_ratio", "<="), ("aesthetic", "min_aesthetic", ">=")):
        t = getattr(filters, field)
        if t is None:
            continue
        sym = "≥" if op == ">=" else "≤"

        def passes(r, col=col, t=t, op=op):
            v = r.get(col)
            if v is None or not math.isfinite(v):
                return False
            return v >= t if op == ">=" else v <= t
        tests.append((f"{col} {sym} {t:g}", passes))
    if filters.drop_static:
        tests.append(("not static", lambda r: not r.get("static")))
    alive = rows
    for label, test in tests:
        alive = [r for r in alive if test(r)]
        steps.append((label, len(alive)))
    counts = store.status_counts(clips)
    steps.append(("passed filters (recorded)", counts["kept"] + counts["duplicate"]))
    steps.append(("after dedup = kept", counts["kept"]))
    return steps


def funnel_section(steps: list[tuple[str, int]]) -> str:
    """Horizontal CSS bars, widths relative to the clip count (sources to their own scale)."""
    top = max([c for _, c in steps] + [1])
    clips = dict(steps).get("clips") or 1
    bars = []
    for label, count in steps:
        pct = "" if label == "sources" else f"{100 * count / clips:.0f}% of clips"
        bars.append(f'<div class="frow"><span class="flabel">{esc(label)}</span>'
                    f'<span class="fbar"><span style="width:{100 * count / top:.1f}%"></span></span>'
                    f'<span class="fcount">{count}</span><span class="fpct">{pct}</span></div>')
    return ('<section id="funnel"><h2>Filter funnel</h2><p class="note">Threshold steps are recomputed '
            "from the stored scores, each applied to the clips that passed the steps above it; the last two "
            f"are the statuses recorded in the table.</p>{''.join(bars)}</section>")


def histogram_section(table: pa.Table, filters: FilterSpec) -> str:
    """One PNG per score column present with at least one finite value, stacked by status."""
    clips = table.filter(pc.invert(pc.is_null(table["clip_id"])))
    figs = []
    for col, fields in HISTOGRAMS.items():
        if col not in clips.column_names:
            continue
        statuses = clips["status"].to_pylist()
        values = clips[col].to_pylist()
        allv = _finite(values)
        if allv.size == 0:
            continue
        lo, hi = float(allv.min()), float(allv.max())
        for f in fields:  # keep the thresholds inside the x range
            t = getattr(filters, f)
            if t is not None:
                lo, hi = min(lo, t), max(hi, t)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 31)
        statuses = [st if st in STATUS_COLOURS else "other" for st in statuses]
        groups = [(s, _finite([v for v, st in zip(values, statuses) if st == s])) for s in STATUS_COLOURS]
        groups = [(s, a) for s, a in groups if a.size]
        fig = Figure(figsize=(4.2, 2.6))
        ax = fig.add_subplot()
        ax.hist([a for _, a in groups], bins=bins, stacked=True, label=[s for s, _ in groups],
                color=[STATUS_COLOURS[s] for s, _ in groups])
        for f in fields:
            t = getattr(filters, f)
            if t is not None:
                ax.axvline(t, color="black", linestyle="--", linewidth=1.2, label=f"{f} = {t:g}")
        missing = len(values) - allv.size
        ax.set_title(f"{col}  (n={allv.size}" + (f", {missing} missing)" if missing else ")"), fontsize=10)
        ax.set_ylabel("clips")
        ax.legend(fontsize=7)
        figs.append(f'<figure><img src="{_png_uri(fig)}" alt="histogram of {esc(col)}"></figure>')
    body = "".join(figs) or '<p class="note">No score columns with values.</p>'
    return f'<section id="histograms"><h2>Score histograms</h2><div class="hgrid">{body}</div></section>'


def _card(r: dict) -> str:
    name = Path(r.get("source_uri") or "?").name
    scores = " · ".join(f"{c} {_num(r.get(c))}" for c in CARD_SCORES if c in r)
    reason = f'<div class="reason">{esc(r["reason"])}</div>' if r.get("reason") else ""
    return (f'<div class="card" style="border-color:{STATUS_COLOURS.get(r.get("status") or "", "#616161")}">'
            f"{_thumb_html(r.get('thumbnail'), name)}"
            f'<div class="name" title="{esc(r.get("source_uri") or "")}">{esc(name)}</div>'
            f'<div class="frames">{_frames_text(r)}</div>{_badge(r.get("status"))}{reason}'
            f'<div class="scores">{esc(scores)}</div></div>')


def contact_sheet_section(table: pa.Table, max_cards: int = MAX_CARDS) -> str:
    """One card per clip: kept first, then filtered, duplicate, rejected; capped at `max_cards`."""
    clips = table.filter(pc.invert(pc.is_null(table["clip_id"])))
    order = {s: i for i, s in enumerate(STATUSES)}
    rows = sorted(clips.to_pylist(), key=lambda r: (order.get(r.get("status"), len(order)),
                                                    r.get("source_uri") or "", r.get("start_frame") or 0))
    note = ""
    if len(rows) > max_cards:
        note = (f'<p class="note">Showing the first {max_cards} of {len(rows)} clips '
                f"({len(rows) - max_cards} not shown).</p>")
    cards = "".join(_card(r) for r in rows[:max_cards])
    return f'<section id="contact-sheet"><h2>Clips</h2>{note}<div class="sheet">{cards}</div></section>'


def duplicates_section(table: pa.Table, max_groups: int = MAX_DUP_GROUPS) -> str:
    """Each clip that others duplicate (their `dup_of` = its clip_id), followed by those duplicates."""
    rows = table.filter(pc.invert(pc.is_null(table["clip_id"]))).to_pylist()
    by_id = {r["clip_id"]: r for r in rows}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("dup_of"):
            groups.setdefault(r["dup_of"], []).append(r)
    out = []
    for target, dups in sorted(groups.items())[:max_groups]:
        head = by_id.get(target)
        head_html = (_card(head) if head else
                     f'<div class="card"><div class="thumb placeholder">not in this version</div>'
                     f'<div class="name">{esc(target)}</div></div>')
        more = (f'<span class="note">+{len(dups) - MAX_DUPS_SHOWN} more</span>'
                if len(dups) > MAX_DUPS_SHOWN else "")
        out.append(f'<div class="dupgroup">{head_html}<span class="arrow">⟵</span>'
                   f"{''.join(_card(d) for d in dups[:MAX_DUPS_SHOWN])}{more}</div>")
    note = "" if len(groups) <= max_groups else f'<p class="note">Showing {max_groups} of {len(groups)} groups.</p>'
    body = "".join(out) or '<p class="note">No near-duplicates.</p>'
    return f'<section id="duplicates"><h2>Duplicate groups</h2>{note}{body}</section>'


def rejected_section(table: pa.Table) -> str:
    """Sources that produced no clips (clip_id null, status rejected), with the reason."""
    rej = table.filter(pc.and_(pc.is_null(table["clip_id"]), pc.equal(table["status"], "rejected")))
    rows = "".join(f"<tr><td><code>{esc(r['source_uri'] or '?')}</code></td><td>{esc(r['reason'] or '')}</td></tr>"
                   for r in rej.select(["source_uri", "reason"]).to_pylist())
    body = (f"<table><tr><th>source</th><th>reason</th></tr>{rows}</table>" if rows
            else '<p class="note">No rejected sources.</p>')
    return f'<section id="rejected"><h2>Rejected sources</h2>{body}</section>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#212121;background:#fafafa}
section{margin-bottom:32px} h1{margin-top:0} code{font-size:12px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
tr.current{background:#fff3c4} .note{color:#616161;font-size:13px}
.badge{color:#fff;border-radius:8px;padding:1px 7px;font-size:12px;display:inline-block}
.counts .badge{margin-left:10px}
.frow{display:flex;align-items:center;gap:8px;margin:3px 0;font-size:13px}
.flabel{width:260px;text-align:right} .fcount{width:50px;text-align:right} .fpct{width:100px;color:#616161}
.fbar{flex:0 0 600px;background:#eee;height:16px} .fbar span{display:block;height:100%;background:#455a64}
.hgrid{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;background:#fff;border:1px solid #ddd}
.sheet{display:flex;flex-wrap:wrap;gap:8px}
.card{width:200px;background:#fff;border:2px solid #ccc;border-radius:4px;padding:4px;font-size:12px;
      overflow-wrap:anywhere}
.thumb{width:192px;height:108px;object-fit:contain;background:#222;display:block}
.placeholder{background:#9e9e9e;color:#fff;display:flex;align-items:center;justify-content:center}
.name{font-weight:600;margin-top:2px} .frames,.scores{color:#555} .reason{color:#b71c1c;margin:2px 0}
.dupgroup{display:flex;align-items:flex-start;gap:8px;margin-bottom:12px;flex-wrap:wrap}
.arrow{font-size:28px;align-self:center;color:#1565c0}
"""


def render_html(table: pa.Table, root: Path, version: int, lineage: list[dict], tags: dict,
                spec: Optional[DatasetSpec | FilterSpec] = None) -> str:
    """The whole report as one HTML string (see the module docstring for its sections)."""
    filters, clip_spec = _thresholds(spec)
    sections = [
        summary_section(root, version, lineage, store.status_counts(table), tags),
        funnel_section(funnel_steps(table, filters, clip_spec.min_seconds, clip_spec.max_seconds)),
        histogram_section(table, filters),
        contact_sheet_section(table),
        duplicates_section(table),
        rejected_section(table),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>spacetime report: {esc(root.name)} v{version}</title><style>{CSS}</style></head>"
            f"<body>{''.join(sections)}</body></html>")


def _thresholds(spec: Optional[DatasetSpec | FilterSpec]) -> tuple[FilterSpec, ClipSpec]:
    if isinstance(spec, DatasetSpec):
        return spec.filters, spec.clips
    return spec or FilterSpec(), ClipSpec()


def recorded_spec(lineage: list[dict], version: int) -> Optional[DatasetSpec]:
    """The spec whose thresholds decided the statuses of `version`: that of the newest curate or
    refilter commit up to it (both record it), through a restore to the version it brought back.
    None when no such commit recorded a spec that still validates (older code)."""
    by_version = {h["version"]: h for h in lineage}
    v = version
    while v in by_version:
        h = by_version[v]
        if h.get("operation") == "restore" and isinstance(h.get("restored_version"), int) and h["restored_version"] < v:
            v = h["restored_version"]
            continue
        if isinstance(h.get("spec"), dict):
            try:
                return DatasetSpec.model_validate(h["spec"])
            except ValueError:  # pydantic's ValidationError: a spec of another code version
                return None
        if h.get("operation") in ("curate", "refilter"):  # it decided statuses, but (older code) kept no spec
            return None
        v -= 1  # a caption commit, say: statuses as its parent decided them
    return None


def write_report(root: str | Path, version: Optional[int | str] = None, out: Optional[str | Path] = None,
                 spec: Optional[DatasetSpec | FilterSpec] = None) -> Path:
    """Write the report of version `version` (number, tag, or None = latest) of `<root>/clips`.

    `spec` gives the thresholds drawn and counted (a DatasetSpec also gives the clip length limits);
    None uses the spec the version was decided by (`recorded_spec`), else the defaults. Returns the
    path written, by default `<root>/report_v<N>.html`.
    Raises ValueError when there is no clips table or no such version.
    """
    root = Path(root).resolve()
    if not store.table_exists(root):
        raise ValueError(f"no clips table under {root}")
    v = store.latest_version(root) if version is None else store.resolve_ref(root, version)
    table = store.read_clips(root, v)
    if "embedding" in table.column_names:  # the one heavy column the report never shows
        table = table.drop_columns(["embedding"])
    lineage = [h for h in store.history(root) if h["version"] <= v]
    if spec is None:  # a version refiltered with new thresholds must not be drawn against the defaults
        spec = recorded_spec(lineage, v)
    page = render_html(table, root, v, lineage, store.read_tags(root), spec)
    out = Path(out) if out is not None else root / f"report_v{v}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    try:
        os.replace(tmp, out)  # never leave a half-written report under the final name
    except OSError:  # out is a directory, say: no stray temp file either
        tmp.unlink(missing_ok=True)
        raise
    return out


# --- retrain report -------------------------------------------------------------------------

RETRAIN_SECTION_IDS = ("lineage", "funnel", "captions", "samples", "losses", "scaling")


def _video_uri(path: Path) -> Optional[str]:
    return f"data:video/mp4;base64,{base64.b64encode(path.read_bytes()).decode()}" if path.is_file() else None


def _loss_plot(curves: dict[str, list[float]]) -> str:
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot(111)
    for name, losses in curves.items():
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return f'<img alt="loss curves" src="{_png_uri(fig)}">'


def write_retrain_report(run_dir: str | Path, previous_run: Optional[str | Path] = None,
                         out: Optional[str | Path] = None, scaling_png: Optional[str | Path] = None) -> Path:
    """One self-contained HTML page for a retrain run: lineage (manifest), dataset funnel, caption
    samples (teacher vs ours), the fixed prompts' samples after (and before, from `previous_run`),
    loss curves, and the scaling study plot when given."""
    run = Path(run_dir).resolve()
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    lin = stages.get("_lineage", {}).get("outputs", {})
    root = Path(lin["dataset"])
    v = lin["dataset_version"]
    table = store.read_clips(root, v)
    if "embedding" in table.column_names:
        table = table.drop_columns(["embedding"])
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(o.get('outputs', {}), default=str)[:400])}</td>"
                   f"<td>{esc(str(o.get('seconds', '')))} s</td></tr>" for k, o in stages.items() if k != "_lineage")
    lineage = (f'<section id="lineage"><h1>spacetime retrain: {esc(run.name)}</h1>'
               f"<p>dataset {esc(str(root))} version {v} · captioner {esc(str(lin.get('captioner')))} · VAE "
               f"{esc(str(lin.get('vae_sha')))} · latents version {lin.get('latents_version')} · DiT "
               f"{esc(str(lin.get('dit_checkpoint_sha')))} (fine-tuned from {esc(str(lin.get('from_checkpoint')))})</p>"
               f"<table><tr><th>stage</th><th>outputs</th><th>time</th></tr>{rows}</table></section>")
    # the thresholds that decided this version (the run's --spec), not the defaults
    filters, clip_spec = _thresholds(recorded_spec([h for h in store.history(root) if h["version"] <= v], v))
    funnel = funnel_section(funnel_steps(table, filters, clip_spec.min_seconds, clip_spec.max_seconds))
    caps = [r for r in table.to_pylist() if r["status"] == "kept" and r.get("caption_dense")][:8]
    cap_rows = "".join(f"<tr><td>{_thumb_html(r.get('thumbnail'), 'clip')}</td><td><b>teacher:</b> "
                       f"{esc(r.get('caption_teacher_dense') or '')}<br><b>ours:</b> {esc(r['caption_dense'])}</td></tr>"
                       for r in caps)
    captions = f'<section id="captions"><h2>Caption samples</h2><table>{cap_rows}</table></section>'
    prev_stages = {}
    if previous_run and (Path(previous_run) / "manifest.json").is_file():
        prev_stages = json.loads((Path(previous_run) / "manifest.json").read_text())["stages"]
    after = stages.get("sample", {}).get("outputs", {}).get("samples", [])
    before = prev_stages.get("sample", {}).get("outputs", {}).get("samples", [])
    prompts = stages.get("sample", {}).get("inputs", {}).get("prompts", [])
    cells = []
    for i, p in enumerate(prompts):
        vids = []
        for label, lst in (("before", before), ("after", after)):
            uri = _video_uri(Path(lst[i])) if i < len(lst) else None
            vids.append(f"<figure><video controls loop autoplay muted src=\"{uri}\" width=\"192\"></video>"
                        f"<figcaption>{label}</figcaption></figure>" if uri else f"<figure><figcaption>{label}: none"
                        f"</figcaption></figure>")
        cells.append(f"<div class=\"dupgroup\"><p style=\"width:260px\">{esc(p)}</p>{''.join(vids)}</div>")
    samples = f'<section id="samples"><h2>Fixed prompts, before vs after</h2>{"".join(cells)}</section>'
    curves = {"this run": stages.get("train", {}).get("outputs", {}).get("losses", [])}
    if prev_stages:
        curves["previous run"] = prev_stages.get("train", {}).get("outputs", {}).get("losses", [])
    losses = f'<section id="losses"><h2>Loss curves</h2>{_loss_plot(curves)}</section>'
    scaling = '<section id="scaling"><h2>Scaling study</h2><p>not run</p></section>'
    if scaling_png and Path(scaling_png).is_file():
        uri = "data:image/png;base64," + base64.b64encode(Path(scaling_png).read_bytes()).decode()
        scaling = f'<section id="scaling"><h2>Scaling study</h2><img alt="scaling" src="{uri}"></section>'
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>spacetime retrain {esc(run.name)}'
            f"</title><style>{CSS}</style></head><body>{lineage}{funnel}{captions}{samples}{losses}{scaling}</body></html>")
    out = Path(out) if out else run / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# --- rendering check --------------------------------------------------------------------------

def find_chromium() -> Optional[str]:
    """Path of a Chromium binary, or None."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_check(html_path: str | Path, expect_ids: tuple[str, ...] = SECTION_IDS, timeout_s: float = 90.0) -> bool:
    """Render the file in headless Chromium (1280x2000 window): True when the screenshot is not blank
    and the DOM holds every id in `expect_ids`. Raises FileNotFoundError when no Chromium is installed.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary (/usr/bin/chromium, chromium, chromium-browser)")
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory() as tmp:
        base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                f"--user-data-dir={tmp}/profile", "--window-size=1280,2000"]
        png = Path(tmp) / "shot.png"
        try:  # one launch does both: writes the screenshot and prints the DOM
            dom = subprocess.run([*base, f"--screenshot={png}", "--dump-dom", url],
                                 capture_output=True, timeout=timeout_s).stdout
        except subprocess.TimeoutExpired:
            return False
        if not png.is_file() or png.stat().st_size == 0:
            return False
        img = cv2.imread(str(png), cv2.IMREAD_COLOR)
        # Blank (one colour, e.g. an error page's white) fails; a rendered report differs from its
        # background colour over far more than 1% of the window.
        if img is None or (img != img[:1, :1]).any(axis=2).mean() < 0.01:
            return False
    text = dom.decode("utf-8", "replace")
    return all(f'id="{i}"' in text for i in expect_ids)
