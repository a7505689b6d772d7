"""The curation graph: sources -> Ray Data streaming stages -> one Delta commit.

    sources ─► AnalyzeSource (actor pool, CPU):  probe → sha256 → ONE decode feeding the shot detector
               and every scorer → clips planned from shots → all clips of the source cut in one ffmpeg pass
            ─► EmbedClips (actor pool, GPU when the spec asks): CLIP embedding + aesthetic per clip
            ─► driver: rows of a finished source are staged (atomic parquet) → at the end filter,
               dedup against the committed table, append as one Delta commit, clear staging.

Resume: a source whose sha256 is committed or staged is skipped inside the analysis stage (after
hashing, before decoding). A run killed at any point leaves only staged sources and media files;
the rerun reuses them and commits exactly the clip set of an uninterrupted run.

Retry: a source rejected for a reason that may pass (`store.transient`: timeouts, a failed analysis
or transcode), or with some clips whose transcode failed, counts as done like any other, unless
`retry_rejected` is given; either way a newer result for its path (or clip) replaces that rejection
in the commit that adds it (`store.commit`).
"""
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import store
from pipeline.clips import clip_id, media_path, plan_clips, reference_uri, transcode_clips
from pipeline.decode import decode_for_analysis, pick_frames
from pipeline.shots import ShotDetector, shots_from_boundaries
from pipeline.sources import Source, expand_sources
from pipeline.spec import DatasetSpec, spec_from_dict

log = logging.getLogger("spacetime.curate")


def display_uri(path: str) -> str:
    """A path as table text: undecodable bytes of a non-UTF-8 name become \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _uri_key(uri: str) -> str:
    return "uri-" + hashlib.sha256(uri.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def rejected_row(uri: str, reason: str, sha: Optional[str] = None, key: Optional[str] = None) -> dict:
    # Staged under its own key: a rejected file's sha may equal a good file's (no clips to collide).
    # the reason may quote a manifest entry's undecodable name, which is no Arrow string either
    return {"source_uri": display_uri(uri), "source_sha256": sha, "status": "rejected", "reason": display_uri(reason),
            "_key": key or "rej-" + _uri_key(uri)}


ROW_TEMPLATE = {**{name: None for name in store.CLIPS_SCHEMA.names},
                "frames": [], "thumbnail": None, "layout": None, "_key": None, "_skip": False, "_n": 1}


class EmbedClips:
    """map_batches stage: pipeline.embed.ClipEmbedder, imported inside the actor. The driver only
    names this class, so a `curate` never pays open_clip's import (~5 s: torchvision, transformers)."""

    def __init__(self, threads: int = 0, **kwargs):
        import torch

        from pipeline.embed import ClipEmbedder

        if threads:  # more than Ray's share of the node: worth it where other stages leave cores idle
            torch.set_num_threads(threads)
        self.embed = ClipEmbedder(**kwargs)

    def __call__(self, batch):
        return self.embed(batch)


class AnalyzeSource:
    """flat_map stage: one source path -> its clip rows (or one rejected row, or one skip marker)."""

    def __init__(self, root: str, spec: dict, sources: list, done: "Done", run: str = ""):
        self.root, self.spec = root, DatasetSpec.model_validate(spec)
        # Paths travel by index: a non-UTF-8 file name can't be an Arrow string in a Ray block.
        self.sources = sources
        self.done = done
        self.run = run  # this curate run's id: it tags the temp files of its transcodes
        # What the analysed rows depend on: a resume under another spec analyses again.
        self.analysis_hash = self.spec.spec_hash("analysis", "shots", "clips", "embedding")

    def _seen(self, uri: str, sha: Optional[str]) -> Optional[list[dict]]:
        """Skip marker if this (content, path) is committed; a duplicate-source row if only the content is."""
        if (sha, display_uri(uri)) in self.done.pairs:
            return [{"_skip": True, "source_uri": display_uri(uri)}]
        if sha and sha in self.done.clip_source:
            return [_dup_row(uri, self.done.clip_source[sha], sha)]
        return None

    def __call__(self, item: dict) -> list[dict]:
        uri, reject = self.sources[item["i"]]
        fingerprint = {} if reject else _fingerprint(uri)
        if reject:
            rows = [rejected_row(uri, reject)]
        else:
            try:
                rows = self._analyze(uri)
            except Exception as e:  # errors are data: the source becomes a row, the run goes on
                log.exception("analysis failed for %s", uri)
                rows = [rejected_row(uri, f"analysis failed: {type(e).__name__}: {e}"[:500])]
        # Same keys on every row (Ray builds blocks from them); `_n` lets the driver know when a
        # source is complete.
        return [{**ROW_TEMPLATE, **r, **({} if r.get("_skip") else fingerprint), "_n": len(rows)} for r in rows]

    def _analyze(self, uri: str) -> list[dict]:
        from pipeline.probe import probe, sha256_file

        spec = self.spec
        info = probe(uri, timeout_s=min(60.0, spec.analysis.timeout_s))
        if not info.ok:
            try:
                sha = sha256_file(uri) if os.path.isfile(uri) else None
            except OSError:
                sha = None
            return self._seen(uri, sha) or [rejected_row(uri, info.reason, sha)]
        sha = sha256_file(uri)
        seen = self._seen(uri, sha)
        if seen:
            return seen
        key = f"{sha}.{_uri_key(uri)}.{self.analysis_hash}"
        kept = store.load_analysed(self.root, key)  # analysed by a killed run, never staged
        if kept is not None:
            return kept.to_pylist()
        rows = self._decode_and_cut(uri, sha, info)
        if not any(r.get("status") == "rejected" for r in rows):  # errors may be transient: not kept
            store.save_analysed(self.root, key, pa.Table.from_pylist(rows))
        return rows

    def _decode_and_cut(self, uri: str, sha: str, info) -> list[dict]:
        from pipeline.dedup import EdgeLayout
        from pipeline.scores import clip_scores, default_analyzers

        spec = self.spec
        shot_detector = ShotDetector(info.fps, spec.shots.content_threshold, spec.shots.adaptive_threshold,
                                     spec.shots.fade_threshold, spec.shots.min_shot_frames)
        scorers = default_analyzers()
        layout = EdgeLayout()
        dec = decode_for_analysis(uri, [shot_detector, layout, *scorers], rotation=info.rotation,
                                  short_side=spec.analysis.short_side, threads=spec.analysis.threads,
                                  timeout_s=spec.analysis.timeout_s)
        if dec.num_frames < 2:
            return [rejected_row(uri, dec.error or f"only {dec.num_frames} decodable frame(s)", sha)]
        fps = info.fps if info.fps and info.fps > 0 else dec.num_frames / max(dec.pts_s[-1], 1e-6)
        shots = shots_from_boundaries(shot_detector.boundaries(), dec.num_frames)
        plans = plan_clips(shots, fps, spec.clips.max_seconds, spec.clips.trim_frames)
        ids = [clip_id(sha, p.start_frame, p.end_frame) for p in plans]

        if spec.clips.mode == "transcode":
            jobs = [(p.start_frame, p.end_frame, media_path(self.root, cid)) for p, cid in zip(plans, ids)]
            # the decode's frame times spare transcode a demux; a decode cut short by an error lacks the tail's
            errors = transcode_clips(uri, jobs, spec.clips.crf, spec.clips.preset, spec.analysis.timeout_s,
                                     run=self.run, pts_s=None if dec.error else dec.pts_s)
            uris = [(str(out), errors[out]) for _, _, out in jobs]
        else:
            uris = [(reference_uri(display_uri(uri), p.start_frame, p.end_frame), None) for p in plans]

        rows = []
        for p, cid, (curi, err) in zip(plans, ids, uris):
            t0 = dec.pts_s[p.start_frame] if p.start_frame < len(dec.pts_s) else p.start_frame / fps
            frames = pick_frames(dec.thumbs, p.start_frame, p.end_frame, spec.embedding.frames_per_clip)
            row = {"clip_id": cid, "source_uri": display_uri(uri), "source_sha256": sha, "_key": sha,
                   "start_frame": p.start_frame, "end_frame": p.end_frame,
                   "shot_start_frame": p.shot_start_frame, "shot_end_frame": p.shot_end_frame,
                   "start_s": t0, "end_s": t0 + (p.end_frame - p.start_frame) / fps, "fps": fps,
                   "width": info.width, "height": info.height, "rotation": info.rotation,
                   "clip_uri": None if err else curi, "frames": frames,
                   "layout": layout.clip_vector(p.start_frame, p.end_frame),
                   "thumbnail": frames[len(frames) // 2] if frames else None,
                   **clip_scores(scorers, p.start_frame, p.end_frame)}
            if err:
                row.update(status="rejected", reason=f"transcode failed: {err}")
            rows.append(row)
        return rows


@dataclass
class CurateResult:
    version: Optional[int]
    counts: dict                       # status -> rows written by this run
    sources: int                       # sources given
    skipped: int                       # already committed (or staged) sources
    new_rows: int
    rejected: list = field(default_factory=list)   # (source_uri, reason) of this run


@dataclass
class Done:
    """What earlier runs committed or staged: (sha256, source_uri) pairs, the source whose clips
    each content hash already produced (a later copy under another name is a duplicate), and each
    source's fingerprint (size, mtime_ns) -> sha256 as it was when a worker hashed it."""
    pairs: set = field(default_factory=set)
    clip_source: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)
    # what `add` reads of the committed table: not its thumbnails or embeddings
    COLUMNS = ["source_sha256", "source_uri", "clip_id", "source_size", "source_mtime_ns", "status", "reason"]

    def add(self, t: pa.Table, retry_rejected: bool = False) -> None:
        """retry_rejected: a source (content and path) with any transient rejection is not done, so
        it is curated again: one that only failed, or one some of whose clips failed to transcode
        (its other clips are committed already and are not written again; `store.not_committed`)."""
        if retry_rejected:
            pairs = list(zip(t["source_sha256"].to_pylist(), t["source_uri"].to_pylist()))
            retry = {p for p, f in zip(pairs, store.transient_mask(t)) if f}
            t = t.filter(pa.array([p not in retry for p in pairs], pa.bool_()))
        for sha, uri, cid in zip(*(t[c].to_pylist() for c in ("source_sha256", "source_uri", "clip_id"))):
            self.pairs.add((sha, uri))
            if sha and cid:
                self.clip_source.setdefault(sha, uri)
        if "source_size" in t.column_names and "source_mtime_ns" in t.column_names:
            cols = (t[c].to_pylist() for c in ("source_uri", "source_size", "source_mtime_ns", "source_sha256"))
            for uri, size, mtime, sha in zip(*cols):
                if size is not None and mtime is not None and sha:
                    self.fingerprints[uri] = (size, mtime, sha)

    def unchanged(self, uri: str) -> bool:
        """Whether this path is done and, by size and mtime, still the file that was hashed (the
        make/rsync test: a same-size rewrite that keeps the mtime slips through; curate --rehash)."""
        shown = display_uri(uri)
        known = self.fingerprints.get(shown)
        if known is None or (known[2], shown) not in self.pairs:
            return False
        now = _fingerprint(uri)
        return bool(now) and (now["source_size"], now["source_mtime_ns"]) == known[:2]


def _fingerprint(uri: str) -> dict:
    """Size and mtime of a source, taken before it is hashed (so a later change shows)."""
    try:
        st = os.stat(uri)
    except OSError:
        return {}
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def read_captions(captions_file: str) -> list[dict]:
    """The entries of a JSON/CSV captions file; ValueError naming the file if it is not one. `curate`
    reads it before any work: it is applied only at the commit, after every source was analysed."""
    import csv

    p = Path(captions_file)
    try:
        if p.suffix.lower() == ".csv":
            with p.open(newline="") as f:
                entries = list(csv.DictReader(f))
        else:
            entries = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read captions file {captions_file}: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(f"captions file {captions_file}: expected a list of {{source, start_frame, end_frame, ...}}")
    for i, e in enumerate(entries):
        try:
            ok = bool(e["source"]) and int(e["start_frame"]) <= int(e["end_frame"])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"captions file {captions_file}: entry {i} needs a source and integer "
                             f"start_frame <= end_frame: {str(e)[:200]}")
    return entries


def check_weights(spec: DatasetSpec, fields: tuple = ("pretrained", "aesthetic_weights")) -> None:
    """ValueError for a weights file the spec names and this machine lacks: said now, in one line,
    rather than by a Ray actor's traceback once every source has been decoded and cut."""
    for name in fields:
        path = getattr(spec.embedding, name)
        if path and not Path(path).is_file():
            raise ValueError(f"embedding.{name}: no such file: {path}")


def import_captions(table: pa.Table, captions_file: str) -> pa.Table:
    """Fill caption_teacher_short/dense from a JSON/CSV list of {source, start_frame, end_frame, ...}.

    A caption applies to the clip of the same source whose frame range it overlaps most, if it covers
    at least half the clip. An absolute `source` names one file; a relative one ("cam1/0001.mp4", or a
    bare file name) names every source whose path ends with it, the longest such match winning.
    """
    entries = read_captions(captions_file)
    by_path: dict[str, list] = {}
    by_tail: dict[tuple, list] = {}  # relative source -> its path components
    for e in entries:
        src = Path(str(e["source"]))
        if src.is_absolute():
            by_path.setdefault(str(src.resolve()), []).append(e)
        else:
            by_tail.setdefault(src.parts, []).append(e)
    short, dense = table["caption_teacher_short"].to_pylist(), table["caption_teacher_dense"].to_pylist()
    for i, r in enumerate(table.select(["source_uri", "start_frame", "end_frame", "clip_id"]).to_pylist()):
        if not r["clip_id"]:
            continue
        # the path as listed (a symlink farm names its links) first, then where it resolves to
        paths = (Path(os.path.abspath(r["source_uri"])), Path(r["source_uri"]).resolve())
        tails = (p.parts[-k:] for p in paths for k in range(len(p.parts), 0, -1))
        cands = (next((by_path[str(p)] for p in paths if str(p) in by_path), None)
                 or next((by_tail[t] for t in tails if t in by_tail), []))
        best, best_ov = None, 0
        for e in cands:
            ov = min(r["end_frame"], int(e["end_frame"])) - max(r["start_frame"], int(e["start_frame"]))
            if ov > best_ov:
                best, best_ov = e, ov
        if best is not None and best_ov >= 0.5 * (r["end_frame"] - r["start_frame"]):
            short[i], dense[i] = best.get("caption_short"), best.get("caption_dense")
    table = table.set_column(table.schema.get_field_index("caption_teacher_short"), "caption_teacher_short",
                             pa.array(short, pa.string()))
    return table.set_column(table.schema.get_field_index("caption_teacher_dense"), "caption_teacher_dense",
                            pa.array(dense, pa.string()))


def decide(new: pa.Table, committed: pa.Table, spec: DatasetSpec) -> pa.Table:
    """Filter by the spec's thresholds, then mark near-duplicates (of new or already-kept clips)."""
    from pipeline.dedup import mark_duplicates
    from pipeline.filters import apply_filters

    new = apply_filters(new, spec.filters, spec.clips.min_seconds, spec.clips.max_seconds)
    kept_before = committed.filter(pc.equal(committed["status"], "kept")) if committed.num_rows else None
    feature = spec.dedup.feature
    if feature == "auto":
        feature = "embedding" if spec.embedding.pretrained else "layout"
    if feature == "layout":
        if "layout" not in new.column_names:
            log.warning("no layout column (older version?): dedup skipped")
            return new
        if kept_before is not None and "layout" not in kept_before.column_names:
            kept_before = None
        return mark_duplicates(new, spec.dedup, kept_before, column="layout", threshold=spec.dedup.layout_threshold)
    return mark_duplicates(new, spec.dedup, kept_before)


def _rows_to_table(rows: list[dict]) -> pa.Table:
    drop = {"frames", "_key", "_skip", "_n"}
    clean = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    extra = {"thumbnail": pa.binary(), "layout": pa.list_(pa.float32()), "embed_error": pa.string(),
             "source_size": pa.int64(), "source_mtime_ns": pa.int64()}
    keys = {k for r in clean for k in r}
    arrays, names = [], []
    for f in store.CLIPS_SCHEMA:
        arrays.append(pa.array([r.get(f.name) for r in clean], f.type))
        names.append(f.name)
    for k in sorted(keys - set(names)):
        arrays.append(pa.array([r.get(k) for r in clean], extra.get(k)))
        names.append(k)
    return pa.Table.from_arrays(arrays, names=names)


def _stage_source(root: str, staged: dict, rows: list[dict]) -> None:
    """Stage one finished source. Two files with identical bytes in one run would give identical
    clip ids: the smaller path keeps the clips, the other becomes a 'identical content' row."""
    key = rows[0]["_key"]
    if key in staged and rows[0]["clip_id"]:
        other = staged[key]["source_uri"][0].as_py()
        mine = rows[0]["source_uri"]
        keep, dup = (rows, other) if mine < other else (None, mine)
        if keep is not None:  # this path wins: the staged one becomes the duplicate
            staged.pop(key)
            # so do copies staged earlier as duplicates of it: they name this path now, which keeps the clips
            # (a third copy finishing before the smallest path pointed at a row that has none)
            earlier = [t["source_uri"][0].as_py() for k, t in staged.items()
                       if k.startswith("dup-") and t["source_sha256"][0].as_py() == key]
            for uri in [other] + earlier:
                _stage_source(root, staged, [{**_dup_row(uri, mine, key), "_n": 1}])
        else:
            rows = [{**_dup_row(dup, other, key), "_n": 1}]
            key = rows[0]["_key"]
    staged[key] = _rows_to_table(rows)
    store.stage(root, key, staged[key])


def _dup_row(uri: str, original: str, sha: str) -> dict:
    return {**ROW_TEMPLATE, **rejected_row(uri, f"identical content to {original} (sha256 {sha[:12]})", sha,
                                           key="dup-" + _uri_key(uri))}


class RunInfo(NamedTuple):
    """One curate run: when it started (its GC spares newer files) and its lease id (tags its temp files)."""
    started: float
    id: str


def curate(source_args: list[str], root: str, spec: DatasetSpec, captions: Optional[str] = None,
           progress: Optional[Callable[[int, int, str], None]] = None, ray_address: Optional[str] = None,
           rehash: bool = False, retry_rejected: bool = False, exclude: tuple = ()) -> CurateResult:
    """Curate sources into the `clips` table under `root`; returns what this run wrote.

    A source already committed or staged under the same path, whose size and mtime are those it
    had when it was hashed, is skipped on the driver: a re-run or resume over finished sources
    starts no Ray work at all. rehash=True sends every source to the workers to be hashed again.
    retry_rejected=True curates again the sources with transient rejections (`store.transient`):
    whole-source failures and single clips that failed to transcode; their new rows replace those
    rejections in this run's commit. `exclude`: other dataset roots the sources must not reach into
    (besides `root` itself), such as the root a rebuild re-curates."""
    started = time.time()
    if captions:
        read_captions(captions)  # a bad file fails now, not after the whole run at its commit
    if ray_address is None and not os.environ.get("RAY_ADDRESS"):  # on a cluster the workers' files count
        check_weights(spec)
    root = str(Path(root).resolve())
    Path(root).mkdir(parents=True, exist_ok=True)
    lease = store.acquire_lease(root)
    try:
        return _curate(source_args, root, spec, captions, progress, ray_address, RunInfo(started, lease.stem), rehash,
                       retry_rejected, exclude)
    finally:
        store.release_lease(lease)


def _curate(source_args, root, spec, captions, progress, ray_address, run: RunInfo, rehash=False,
            retry_rejected=False, exclude: tuple = ()) -> CurateResult:
    import ray

    sources: list[Source] = expand_sources(source_args, exclude=[root, *exclude])
    version = store.latest_version(root)  # _finish decides against this same version
    committed = store.read_clips(root, version, columns=Done.COLUMNS)
    staged = store.load_staged(root)
    if retry_rejected:  # a killed run's staged sources with transient rejections are retried, not committed
        listed = {display_uri(s.uri) for s in sources}
        staged = {k: t for k, t in staged.items() if not (any(store.transient_mask(store.conform(t)))
                                                          and set(t["source_uri"].to_pylist()) <= listed)}
    done = Done()
    for t in [committed, *staged.values()]:
        done.add(store.conform(t), retry_rejected)
    # unchanged finished sources are skipped here, without hashing them again or starting Ray
    run_sources = sources if rehash else [s for s in sources if s.reject or not done.unchanged(s.uri)]
    skipped = len(sources) - len(run_sources)
    if skipped and progress:
        progress(skipped, len(sources), f"{skipped} unchanged source(s) already done")
    if not run_sources:
        return _finish(root, staged, version, sources, skipped, captions, spec, source_args, run)

    if not ray.is_initialized():
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws one bar over sources instead
    ctx.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    res = spec.resources
    pending: dict[str, list] = {}
    items = [{"i": i} for i in range(len(run_sources))]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(AnalyzeSource, fn_constructor_kwargs=dict(
        root=root, spec=spec.model_dump(mode="json"), sources=[(s.uri, s.reject) for s in run_sources],
        done=done, run=run.id),
        # no more analysis actors than sources: an idle one would hold CPU the embed stage could use
        compute=ray.data.ActorPoolStrategy(size=min(res.analyze.concurrency, len(run_sources))),
        num_cpus=res.analyze.num_cpus)
    ds = ds.map_batches(EmbedClips, fn_constructor_kwargs=dict(
        model=spec.embedding.model, pretrained=spec.embedding.pretrained,
        aesthetic_weights=spec.embedding.aesthetic_weights, threads=res.embed.threads),
        batch_size=res.embed.batch_size, compute=ray.data.ActorPoolStrategy(size=res.embed.concurrency),
        num_cpus=res.embed.num_cpus, num_gpus=res.embed.num_gpus, batch_format="pyarrow")
    finished = skipped
    # Blocks as they finish, with no prefetch: `iter_rows` holds each block back until the next one
    # is ready (prefetch 1), which kept every source one embed batch longer from being staged.
    rows = (row for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
            for row in block.to_pylist())
    for row in rows:
        if row.get("_skip"):
            skipped += 1
            finished += 1
            if progress:
                progress(finished, len(sources), f"skip {Path(row['source_uri']).name} (already committed)")
            continue
        # Clips of one source arrive together from flat_map, but batches may split them: stage a
        # source once all its rows are here (the analysis stage tags each with the row count).
        uri = row["source_uri"]
        pending.setdefault(uri, []).append(row)
        if len(pending[uri]) == int(row["_n"]):
            _stage_source(root, staged, pending.pop(uri))
            finished += 1
            if progress:
                progress(finished, len(sources), Path(uri).name)
    for uri, rows in pending.items():  # should not happen; never lose rows silently
        log.warning("source %s ended with %d partial rows; staging what arrived", uri, len(rows))
        _stage_source(root, staged, rows)
    return _finish(root, staged, version, sources, skipped, captions, spec, source_args, run)


def _finish(root, staged, version, sources, skipped, captions, spec, source_args, run: RunInfo) -> CurateResult:
    """Decide (filters, dedup) over everything staged against committed `version` and commit it as
    one new version; then clear the staging area and collect garbage."""
    if not staged:
        return CurateResult(None, {}, len(sources), skipped, 0)
    new = pa.concat_tables(_drop_stale_rejections([store.conform(t) for t in staged.values()]),
                           promote_options="permissive")
    committed = store.read_clips(root, version, columns=[
        "clip_id", "source_uri", "source_sha256", "status", "reason", "aesthetic", "embedding", "layout"])
    # A run killed between its commit and clearing its staging left rows the table already holds
    staged_rows, new = new, store.not_committed(new, committed)
    # so did a retried source that failed the same way again: it writes nothing, yet it is rejected
    written = set(zip(*(new[c].to_pylist() for c in ("clip_id", "source_uri", "source_sha256"))))
    again = [(u, r) for c, u, h, r, f in zip(*(staged_rows[c].to_pylist() for c in (
             "clip_id", "source_uri", "source_sha256", "reason")), store.transient_mask(staged_rows))
             if f and (c, u, h) not in written]
    counts, new_version = store.status_counts(new), None
    if new.num_rows:
        new = new.sort_by([("source_uri", "ascending"), ("start_frame", "ascending")])
        if captions:
            new = import_captions(new, captions)
        new = _stamp(decide(new, committed, spec), spec)
        counts = store.status_counts(new)
        new_version = store.commit(root, new, "append", {
            "operation": "curate", "spec_hash": spec.spec_hash(), "spec_name": spec.name,
            "sources": len(sources), "sources_skipped": skipped, "new_counts": counts,
            "embedding_model": spec.embedding.model, "embedding_weights": spec.embedding.pretrained,
            # enough to rebuild this version from scratch (`spacetime datasets rebuild`), from any cwd
            "captions_imported": _absolute(captions) if captions else None,
            "spec": spec.model_dump(mode="json"), "source_args": [_absolute(a) for a in source_args]})
    store.clear_staging(root)
    store.collect_garbage(root, older_than=store.oldest_live_start(root, run.started), run=run.id)
    if new_version is None:
        return CurateResult(None, {}, len(sources), skipped, 0, again)
    rej = pc.filter(new, pc.equal(new["status"], "rejected")).select(["source_uri", "reason"]).to_pylist()
    return CurateResult(new_version, counts, len(sources), skipped, new.num_rows,
                        [(r["source_uri"], r["reason"]) for r in rej] + again)


def _stamp(rows: pa.Table, spec: DatasetSpec) -> pa.Table:
    """Fill the contract's spec_hash and code_version columns (DESIGN.md) of rows this commit decided:
    a table grown by runs under several specs says which spec decided each row."""
    for name, value in (("spec_hash", spec.spec_hash()), ("code_version", store.code_version())):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array([value] * rows.num_rows, pa.string()))
    return rows


def _drop_stale_rejections(tables: list[pa.Table]) -> list[pa.Table]:
    """Staged sources (one table each) less those that are only transient rejections of a path that
    also staged another result: a killed run's failure, retried by its resume (`store.commit` does
    the same against the committed table)."""
    only_failed = [t.num_rows > 0 and all(store.transient_mask(t)) for t in tables]
    ok_uris = {u for t, f in zip(tables, only_failed) if not f for u in t["source_uri"].to_pylist()}
    return [t for t, f in zip(tables, only_failed) if not (f and t["source_uri"][0].as_py() in ok_uris)]


def _absolute(arg: str) -> str:
    """A local path, directory, manifest or glob as an absolute one; a URI (s3://...) as it is."""
    return arg if "://" in arg else os.path.abspath(arg)


def rebuild(root: str, version: int, out_root: str, progress=None) -> dict:
    """Re-curate every source that versions <= `version` were curated from, with each commit's own
    recorded spec, into a fresh root; compare the clip sets. Returns {"same", "missing", "extra", ...}."""
    root = str(Path(root).resolve())
    if store.table_exists(out_root):  # its clips would count as rebuilt: `--out` the root itself said "identical"
        raise ValueError(f"{out_root} already holds a clips table: rebuild into a fresh root")
    # read first: a version that does not exist (or was vacuumed) failed only after curating every source
    want = set(store.read_clips(root, version, columns=["clip_id"])["clip_id"].drop_null().to_pylist())
    curates = _curates_behind(store.history(root), version)
    if not curates:
        raise ValueError(f"{root}: no curate commits up to version {version}")
    # every commit's spec and sources checked before the first is re-curated (a spec recorded by older
    # code may not validate now: one line naming the version, not pydantic's, and no half-built root)
    specs = []
    for h in curates:
        if "spec" not in h or "source_args" not in h:
            raise ValueError(f"{root} version {h['version']} does not record its spec and sources (older code)")
        specs.append(spec_from_dict(h["spec"], f"{root} version {h['version']}'s recorded spec"))
    for h, spec in zip(curates, specs):
        # the original run skipped `root` inside its source directories; so must this one, or the rebuild
        # curates root's own media/ clips as new sources and reports them as extra
        curate(h["source_args"], out_root, spec, h.get("captions_imported"), progress, exclude=(root,))
    got = set(store.read_clips(out_root, columns=["clip_id"])["clip_id"].drop_null().to_pylist())
    return {"same": want == got, "clips": len(want), "missing": sorted(want - got), "extra": sorted(got - want),
            "rebuilt_version": store.latest_version(out_root)}


def _curates_behind(history: list[dict], version: int) -> list[dict]:
    """The curate commits whose clips `version` holds, oldest first: a restore of version r holds r's
    state, so the curates between r and the restore are not behind it (rebuilding them too reported
    their clips as "extra" in a version that had dropped them)."""
    by_version = {h["version"]: h for h in history}
    out, v = [], version
    while v in by_version:
        h = by_version[v]
        if h.get("operation") == "restore" and isinstance(h.get("restored_version"), int) and h["restored_version"] < v:
            v = h["restored_version"]
            continue
        if h.get("operation") == "curate":
            out.append(h)
        v -= 1
    return out[::-1]


def score_aesthetic(embeddings: list, weights: str) -> list:
    """Aesthetic head over cached CLIP embeddings (None where a clip has none)."""
    import numpy as np
    import torch

    from pipeline.embed import AestheticHead

    head = AestheticHead.load(weights).eval()
    ok = [i for i, e in enumerate(embeddings) if e is not None]
    out: list = [None] * len(embeddings)
    if ok:
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray([embeddings[i] for i in ok], dtype=np.float32))
            for i, v in zip(ok, head(x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).tolist()):
                out[i] = v
    return out


def aesthetic_labels_from_ground_truth(table: pa.Table, gt: dict) -> tuple[list, list]:
    """(clip_ids, labels): 0 for clips cut from shots the demo generator marked low quality, else 1."""
    bad = {}
    for v in gt["videos"]:
        for s in v["shots"]:
            bad.setdefault(v["file"], []).append((s["start_frame"], s["end_frame"],
                                                  bool(set(s["defects"]) & {"blur", "dark"})))
    ids, labels = [], []
    for r in table.select(["clip_id", "source_uri", "start_frame", "end_frame", "embedding"]).to_pylist():
        if not r["clip_id"] or r["embedding"] is None:
            continue
        mid = (r["start_frame"] + r["end_frame"]) // 2
        for s, e, is_bad in bad.get(Path(r["source_uri"]).name, []):
            if s <= mid < e:
                ids.append(r["clip_id"])
                labels.append(0.0 if is_bad else 1.0)
    return ids, labels


def _rows_of(t: pa.Table, columns: list[str]) -> list[str]:
    """The rows of `t`'s `columns` (null where it has no such column) as sorted text, a NaN score
    equal to itself: to tell whether two tables hold the same rows."""
    cols = (t[c].to_pylist() if c in t.column_names else [None] * t.num_rows for c in columns)
    return sorted(repr(r) for r in zip(*cols))


def refilter(root: str, spec: DatasetSpec) -> tuple[Optional[int], dict]:
    """Re-decide every clip's status from cached scores under new thresholds; one overwrite commit.
    Returns (new version, counts by status); version None when every decision came out as the latest
    version has it (same spec too): like a curate with nothing new, that commits nothing.

    No video is opened: statuses are a pure function of the stored score columns and embeddings.
    """
    root = str(Path(root).resolve())
    check_weights(spec, ("aesthetic_weights",))  # the head runs here, on the cached embeddings
    # the version first, then its rows: read the other way round, a commit landing in between became
    # the expected parent of an overwrite computed without its rows, which silently dropped them
    parent = store.latest_version(root)
    # conformed: a version written before a contract column existed (or by another tool) lacks it,
    # and setting the decision columns on it failed with "Invalid column index to set field"
    table = store.conform(store.read_clips(root, parent))
    if table.num_rows == 0:
        raise ValueError(f"no clips table under {root}")
    is_clip = pc.invert(pc.is_null(table["clip_id"]))
    clips = table.filter(is_clip)
    transcode_failed = pc.fill_null(pc.starts_with(clips["reason"], "transcode failed"), False)
    reset = clips.filter(pc.invert(transcode_failed))
    n = reset.num_rows
    for name, val in (("status", pa.nulls(n, pa.string())), ("reason", pa.nulls(n, pa.string())),
                      ("dup_of", pa.nulls(n, pa.string()))):
        reset = reset.set_column(reset.schema.get_field_index(name), name, val)
    if spec.embedding.aesthetic_weights:  # a newly trained head re-scores the cached embeddings
        reset = reset.set_column(reset.schema.get_field_index("aesthetic"), "aesthetic",
                                 pa.array(score_aesthetic(reset["embedding"].to_pylist(),
                                                          spec.embedding.aesthetic_weights), pa.float32()))
    decided = _stamp(decide(reset, reset.slice(0, 0), spec), spec)
    out = pa.concat_tables([decided, clips.filter(transcode_failed), table.filter(pc.invert(is_clip))],
                           promote_options="permissive")
    out = out.sort_by([("source_uri", "ascending"), ("start_frame", "ascending")])
    decisions = ["clip_id", "status", "reason", "dup_of", "aesthetic", "spec_hash"]
    if _rows_of(out, decisions) == _rows_of(table, decisions):
        return None, store.status_counts(table)
    version = store.commit(root, out, "overwrite", {"operation": "refilter", "spec_hash": spec.spec_hash(),
                                                   "spec_name": spec.name, "refiltered_from": parent,
                                                   # the report draws these thresholds for this version
                                                   "spec": spec.model_dump(mode="json")},
                           expect_version=parent)
    return version, store.status_counts(out)
