"""The dataset root on disk: the Delta `clips` table, its lineage, and the resume staging area.

Layout under a dataset root:
  clips/            Delta table (DESIGN.md contract, pipeline/schema.py)
  media/xx/<id>.mp4 transcoded clips (`clips: transcode`)
  _staging/<key>.parquet  per-source results of an unfinished curate run (atomic renames)

Every write is ONE Delta commit whose commit info carries the lineage under the key "spacetime":
operation, spec hash, code version, parent version, row counts by status, and anything else the
caller adds (model hashes). Concurrent writers: a commit that loses the race is retried on the new
table state a few times, then fails cleanly; Delta never leaves the table half-written.
"""
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from pipeline.schema import CLIPS_SCHEMA, STATUSES

LINEAGE_KEY = "spacetime"


def clips_path(root: str | Path) -> str:
    """<root>/clips. A ValueError for a path deltalake cannot open: it percent-decodes local paths
    (file URIs too), so under ".../My%20Videos/ds" the first commit wrote a table that every later
    read looked for under ".../My Videos/ds" ("File not found"), after a whole curate run."""
    path = Path(root) / "clips"
    if re.search("%[0-9A-Fa-f]{2}", os.path.abspath(path)):
        raise ValueError(f"dataset root {root}: Delta Lake cannot use a path containing a %XX sequence "
                         f"(it reads it as an escaped character); rename that directory")
    return str(path)


def code_version() -> str:
    """Package version + a hash of this package's source, so edits without a version bump still show.

    A submitted Ray job has no .git; the submitter passes its commit in SPACETIME_CODE_VERSION.
    """
    if os.environ.get("SPACETIME_CODE_VERSION"):
        return os.environ["SPACETIME_CODE_VERSION"]
    try:
        ver = metadata.version("spacetime")
    except metadata.PackageNotFoundError:
        ver = "0+unknown"
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return f"{ver}+{h.hexdigest()[:10]}"


def table_exists(root: str | Path) -> bool:
    return DeltaTable.is_deltatable(clips_path(root))


def latest_version(root: str | Path) -> Optional[int]:
    return DeltaTable(clips_path(root)).version() if table_exists(root) else None


def arrow_table(dt, columns: Optional[list[str]] = None) -> pa.Table:
    """The Delta snapshot `dt` as one Arrow table, scanned on the calling thread: pyarrow's threaded
    scan through deltalake's Python filesystem handler makes a process that never imported ray abort
    at exit most of the time ("terminate called without an active exception"; delta-rs#2184,
    apache/arrow#34314). Measured no slower (1.3 GB table: 0.8 s either way)."""
    return dt.to_pyarrow_dataset().to_table(columns=columns, use_threads=False)


def read_clips(root: str | Path, version: Optional[int] = None, columns: Optional[list[str]] = None) -> pa.Table:
    """The clips table at `version` (Delta time travel; None = latest). Empty table if none exists.
    `columns`: read only these, those of them the version has (extras such as layout came later)."""
    if not table_exists(root):
        if version is not None:
            raise ValueError(f"no clips table under {root}")
        return CLIPS_SCHEMA.empty_table()
    try:
        dt = DeltaTable(clips_path(root), version=version)
    except Exception as e:  # deltalake raises a generic error for a missing version
        raise ValueError(f"{root}: version {version} not found ({e})") from None
    if columns is not None:
        have = {f.name for f in dt.schema().fields}
        columns = [c for c in columns if c in have]
    try:
        return arrow_table(dt, columns)
    except FileNotFoundError as e:  # its log entry is there, its data files were vacuumed
        raise ValueError(f"{root}: version {dt.version()} can no longer be read: its data files were "
                         f"removed (datasets vacuum): {str(e).splitlines()[0]}") from None


def conform(table: pa.Table) -> pa.Table:
    """Cast to the contract schema: contract columns first, in order, missing ones null; extras kept."""
    n = table.num_rows
    cols, fields = [], []
    for f in CLIPS_SCHEMA:
        cols.append(table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type))
        fields.append(f)
    for name in table.column_names:
        if name not in CLIPS_SCHEMA.names:
            cols.append(table[name])
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def status_counts(table: pa.Table) -> dict[str, int]:
    if table.num_rows == 0:
        return {s: 0 for s in STATUSES}
    vc = pc.value_counts(table["status"]).to_pylist()
    counts = {s: 0 for s in STATUSES}
    counts.update({d["values"]: d["counts"] for d in vc if d["values"] is not None})
    return counts


class TableMoved(ValueError):
    """An overwrite prepared from version N found the table at a later version: re-run it."""


def commit(root: str | Path, table: pa.Table, mode: str, lineage: dict, retries: int = 8,
           expect_version: Optional[int] = None) -> int:
    """Write `table` as one Delta commit (mode 'append' or 'overwrite'); returns the new version.

    `lineage` is recorded in the commit info with the parent version and status counts of the whole
    table after the commit. The commit is made against the snapshot those were computed from, with
    Delta's own silent retry turned off: a concurrent commit that wins the race makes ours fail and
    start over on the new state, so the recorded parent and counts are always the true ones.

    Appends are idempotent: a row whose clip_id is already committed (ids derive from content and
    frame range, so it is the same clip), or a rejected-source row (clip_id null) whose source_uri
    and sha256 already have one, is not written again. That happens when a run commits staged rows a
    concurrent or earlier run committed too. If nothing new is left, no version is made and the
    current one is returned. An append also supersedes: the transient rejections (`transient`) of
    each path it adds rows for are removed by the same commit (a Delta merge instead of a plain
    append), so a retried source never keeps its old failure next to its new clips.

    An overwrite is the caller's full new state computed from some version: pass that as
    `expect_version`, and a table that moved on meanwhile raises TableMoved instead of silently
    dropping the rows another writer added.
    """
    path = clips_path(root)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table = conform(table)
    for attempt in range(retries + 1):
        parent = latest_version(root)
        if expect_version is not None and parent != expect_version:
            raise TableMoved(f"{root}: the table moved from version {expect_version} to {parent} while this "
                             f"{lineage.get('operation', 'write')} was prepared; run it again")
        snapshot = DeltaTable(path, version=parent) if parent is not None else None
        new, counts, gone = table, status_counts(table), []
        if parent is not None and mode == "append":
            have = arrow_table(snapshot, ["clip_id", "source_uri", "source_sha256", "status", "reason"])
            new = not_committed(table, have)
            if new.num_rows == 0:
                return parent
            stale = superseded(have, new)
            gone = sorted({u for u, f in zip(have["source_uri"].to_pylist(), stale) if f})
            have = have.filter(pa.array([not f for f in stale], pa.bool_()))
            counts = {s: a + b for (s, a), b in zip(status_counts(have).items(), status_counts(new).values())}
        info = {"parent_version": parent, "code_version": code_version(), "rows_written": new.num_rows,
                "counts": counts, "committed_at": time.time(), **lineage,
                **({"superseded_sources": len(gone)} if gone else {})}
        props = CommitProperties(custom_metadata={LINEAGE_KEY: json.dumps(info, default=str)}, max_commit_retries=0)
        try:
            if snapshot is None:  # creating the table: if another writer created it meanwhile, start over
                write_deltalake(path, new, mode="error", commit_properties=props)
                return 0
            if gone:
                _append_superseding(snapshot, new, props)
            else:
                write_deltalake(snapshot, new, mode=mode, schema_mode="merge", commit_properties=props)
            return parent + 1
        except (CommitFailedError, DeltaError) as e:
            lost_race = isinstance(e, CommitFailedError) or (snapshot is None and table_exists(root))
            if not lost_race or attempt == retries:
                raise
            time.sleep(0.1 * (attempt + 1) * (1 + random.random()))  # jitter: two losers don't collide again
    raise RuntimeError("unreachable")


# Rejections whose cause may pass (a slow disk or a busy machine timing out, a crash in one stage):
# a newer result for the same path supersedes them (`commit`), and `curate --retry-rejected` tries
# them again. Every other rejection is about the file itself (not a video, too small, escapes its
# root, identical to another source) and is final.
# reasons that may pass on a rerun; a "missing file" may be there next time (a mount not up yet, a copy
# still running): when it is, its clips replace the rejection instead of sitting beside it
TRANSIENT_REASONS = ("probe timed out", "analysis failed", "transcode failed", "missing file")


def transient(status: Optional[str], reason: Optional[str]) -> bool:
    return status == "rejected" and bool(reason) and reason.startswith(TRANSIENT_REASONS)


def transient_mask(t: pa.Table) -> list[bool]:
    return [transient(s, r) for s, r in zip(t["status"].to_pylist(), t["reason"].to_pylist())]


def _sql(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def superseded(have: pa.Table, new: pa.Table) -> list[bool]:
    """Which rows of `have` the rows of `new` replace: a transient rejection of a clip `new` holds (by
    clip_id, whatever its path), or a transient rejection of a whole source (no clip_id) at a path `new`
    has rows for. A clip whose failure `new` repeats is not in `new` (not_committed), so it stays."""
    ids = {c for c in new["clip_id"].to_pylist() if c is not None}
    uris = set(new["source_uri"].to_pylist())
    return [f and (c in ids if c is not None else u in uris)
            for f, c, u in zip(transient_mask(have), have["clip_id"].to_pylist(), have["source_uri"].to_pylist())]


def _append_superseding(snapshot: DeltaTable, new: pa.Table, props: CommitProperties) -> None:
    """Add `new` and delete the rows it supersedes (`superseded`) in ONE commit: a Delta merge whose
    join matches nothing, so every new row is inserted and the old rows go by predicate (only the
    data files holding them are rewritten)."""
    reasons = " OR ".join(f"starts_with(t.reason, {_sql(r)})" for r in TRANSIENT_REASONS)
    ids = sorted({c for c in new["clip_id"].to_pylist() if c is not None})
    uris = sorted(set(new["source_uri"].to_pylist()))
    which = ([f"t.clip_id IN ({', '.join(map(_sql, ids))})"] if ids else []) + \
        [f"(t.clip_id IS NULL AND t.source_uri IN ({', '.join(map(_sql, uris))}))"]
    stale = f"t.status = 'rejected' AND ({reasons}) AND ({' OR '.join(which)})"
    (snapshot.merge(new, predicate="false", source_alias="s", target_alias="t", merge_schema=True,
                    commit_properties=props)
     .when_not_matched_insert_all().when_not_matched_by_source_delete(stale).execute())


def not_committed(table: pa.Table, have: pa.Table) -> pa.Table:
    """Rows of `table` not already in `have`: clips by clip_id, rejected-source rows by uri + sha256.
    A clip `have` holds only as a transient rejection (its transcode failed) counts as committed
    for another such failure, not for the clip a retry cut (which supersedes it)."""
    cids, failed = have["clip_id"].to_pylist(), transient_mask(have)
    ids = {c for c, f in zip(cids, failed) if c is not None and not f}
    failed_ids = {c for c, f in zip(cids, failed) if c is not None and f}
    sources = list(zip(*(have[k].to_pylist() for k in ("source_uri", "source_sha256"))))
    rejected = {us for c, us, f in zip(cids, sources, failed) if c is None and not f}
    failed_sources = {us for c, us, f in zip(cids, sources, failed) if c is None and f}
    # a failure the table already records is not written again; anything else replaces it (superseded)
    keep = [cid not in ids and not (f and cid in failed_ids) if cid is not None
            else (uri, sha) not in rejected and not (f and (uri, sha) in failed_sources)
            for cid, uri, sha, f in zip(*(table[k].to_pylist() for k in ("clip_id", "source_uri", "source_sha256")),
                                        transient_mask(table))]
    return table.filter(pa.array(keep, pa.bool_()))


_DELTA_KEYS = {"timestamp", "operation", "operationParameters", "engineInfo", "operationMetrics", "clientVersion",
               "version", "readVersion", "isolationLevel", "isBlindAppend", "userMetadata", "txnId"}


def history(root: str | Path) -> list[dict]:
    """Versions oldest-first: {version, timestamp, operation, mode, rows_added, **lineage}. A commit
    that records no lineage (the "VACUUM START"/"VACUUM END" pair `vacuum` adds, another tool's
    write) has Delta's own operation name."""
    if not table_exists(root):
        return []
    out = []
    for h in DeltaTable(clips_path(root)).history():
        lineage = json.loads(h.get(LINEAGE_KEY, "{}"))
        # Other writers of the table (captioner/) can't import this module: they record flat keys,
        # "spacetime.operation" plus plain ones, with JSON-encoded values.
        for k, v in h.items():
            if k in _DELTA_KEYS or k == LINEAGE_KEY:
                continue
            key = k.removeprefix("spacetime.")
            try:
                lineage.setdefault(key, json.loads(v) if isinstance(v, str) else v)
            except json.JSONDecodeError:
                lineage.setdefault(key, v)
        metrics = h.get("operationMetrics") or {}  # an append's, or a superseding merge's
        out.append({"version": h["version"], "timestamp": h.get("timestamp"), "operation": h.get("operation"),
                    "mode": (h.get("operationParameters") or {}).get("mode"),
                    "rows_added": metrics.get("num_added_rows", metrics.get("num_target_rows_inserted")), **lineage})
    return sorted(out, key=lambda r: r["version"])


def diff(root: str | Path, a: int, b: int) -> dict:
    """What changed from version a to b: clips added/removed, status changes, reason changes under the
    same status, caption changes, and the
    sources with rejected rows that b has and a had not (`rejected_sources_added`) or a had and b has
    not (`rejected_sources_removed`: a retry that replaced a failure, a restore)."""
    cols = ["clip_id", "status", "reason", "caption_short", "caption_dense", "source_uri"]
    ta, tb = (read_clips(root, v) for v in (a, b))
    rows_a = {r["clip_id"]: r for r in ta.select([c for c in cols if c in ta.column_names]).to_pylist() if r["clip_id"]}
    rows_b = {r["clip_id"]: r for r in tb.select([c for c in cols if c in tb.column_names]).to_pylist() if r["clip_id"]}
    rej = lambda t: sorted(set(pc.filter(t["source_uri"], pc.equal(t["status"], "rejected")).to_pylist()))
    common = rows_a.keys() & rows_b.keys()
    status_changed = {k: (rows_a[k]["status"], rows_b[k]["status"]) for k in common
                      if rows_a[k]["status"] != rows_b[k]["status"]}
    caption_changed = sorted(k for k in common if any(rows_a[k].get(c) != rows_b[k].get(c)
                                                      for c in ("caption_short", "caption_dense")))
    # the same status for another reason (a refilter that filters a clip on other thresholds now)
    reason_changed = {k: (rows_a[k].get("reason"), rows_b[k].get("reason")) for k in common
                      if k not in status_changed and rows_a[k].get("reason") != rows_b[k].get("reason")}
    return {"from": a, "to": b,
            "added": sorted(rows_b.keys() - rows_a.keys()), "removed": sorted(rows_a.keys() - rows_b.keys()),
            "status_changed": status_changed, "reason_changed": reason_changed, "caption_changed": caption_changed,
            "rejected_sources_added": sorted(set(rej(tb)) - set(rej(ta))),
            "rejected_sources_removed": sorted(set(rej(ta)) - set(rej(tb)))}


# --- resume staging -------------------------------------------------------------------------

def staging_dir(root: str | Path) -> Path:
    return Path(root) / "_staging"


def stage(root: str | Path, key: str, table: pa.Table) -> Path:
    """Persist one finished source's rows; atomic (write temp, then rename)."""
    return _write_atomic(staging_dir(root), key, table)


def _write_atomic(d: Path, key: str, table: pa.Table) -> Path:
    final = d / f"{key}.parquet"
    for attempt in range(3):
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, final)
            return final
        except FileNotFoundError:  # a concurrent run's clear_staging removed our temp file or the directory
            if attempt == 2:
                raise
    raise RuntimeError("unreachable")


def load_staged(root: str | Path) -> dict[str, pa.Table]:
    d = staging_dir(root)
    if not d.is_dir():
        return {}
    out = {}
    for p in sorted(d.glob("*.parquet")):
        try:
            out[p.stem] = _rebase_media(pq.read_table(p), root)
        except Exception:  # a torn file can't exist (atomic rename) unless the disk lied: redo that source
            p.unlink(missing_ok=True)
    return out


def media_key(path: str | Path) -> str:
    """A media file's name within its dataset root: <root>/media/ab/<clip_id>.mp4 -> "ab/<clip_id>.mp4".
    Unique per clip, and the same in a copy of the root, where absolute paths are not."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def _rebase_media(t: pa.Table, root: str | Path) -> pa.Table:
    """Staged rows of a root that was copied or moved name the old root's media: point each at this
    root's copy of the file where it has one, so the commit names files that live here."""
    if "clip_uri" not in t.column_names:
        return t
    media = Path(root).resolve() / "media"
    uris = t["clip_uri"].to_pylist()
    rebased = [str(media / media_key(u)) if u and "#frames=" not in u and Path(u).parent.parent != media
               and (media / media_key(u)).is_file() else u for u in uris]
    if rebased == uris:
        return t
    i = t.column_names.index("clip_uri")
    return t.set_column(i, "clip_uri", pa.array(rebased, t.schema.field(i).type))


def analysed_dir(root: str | Path) -> Path:
    return Path(root) / "_analysed"


def save_analysed(root: str | Path, key: str, table: pa.Table) -> Path:
    """Persist one source's analysed rows (scores, thumbnails, clip files already on disk) before
    they are embedded: a run killed while its embed stage lags behind the analysis resumes from
    here instead of decoding those sources again. Atomic, like `stage`; removed at each commit."""
    return _write_atomic(analysed_dir(root), key, table)


def load_analysed(root: str | Path, key: str) -> Optional[pa.Table]:
    """The rows `save_analysed` kept under `key`, or None (never saved, cleared, unreadable, or
    naming a clip file this root does not hold: a copied root's rows are re-pointed at its own
    copies, as staged rows are, and a file collected meanwhile means the source is analysed again)."""
    try:
        t = _rebase_media(pq.read_table(analysed_dir(root) / f"{key}.parquet"), root)
    except (OSError, pa.ArrowInvalid):  # missing, or removed by a concurrent run's commit meanwhile
        return None
    media = Path(root).resolve() / "media"
    uris = t["clip_uri"].to_pylist() if "clip_uri" in t.column_names else []
    files = [Path(u) for u in uris if u and "#frames=" not in u]
    return t if all(p.parent.parent == media and p.is_file() for p in files) else None


def clear_staging(root: str | Path) -> None:
    shutil.rmtree(analysed_dir(root), ignore_errors=True)  # a concurrent run's entries only cost it a redo
    d = staging_dir(root)
    if d.is_dir():
        for p in d.iterdir():
            p.unlink(missing_ok=True)
        try:
            d.rmdir()
        except OSError:  # a concurrent run staged a source meanwhile: its file stays for its commit
            pass


def acquire_lease(root: str | Path) -> Path:
    """Mark a curate run as live (pid, host, start) so a concurrent run's GC spares its new files."""
    d = Path(root) / "_runs"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{uuid.uuid4().hex}.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": time.time()}))
    os.replace(tmp, p)
    return p


def release_lease(lease: Path) -> None:
    Path(lease).unlink(missing_ok=True)


def oldest_live_start(root: str | Path, default: float) -> float:
    """Earliest start among live runs' leases (stale ones of dead local pids are removed)."""
    start = default
    for p in (Path(root) / "_runs").glob("*.json"):
        try:
            info = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("host") == os.uname().nodename:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                p.unlink(missing_ok=True)  # a killed run's lease
                continue
            except PermissionError:
                pass
        start = min(start, float(info["started"]))
    return start


_PARTIAL = ".partial."  # marks a temp file in media/: <clip_id>.partial.<run>.<random>.mp4


def partial_name(out: Path, run: str = "") -> Path:
    """A temp file beside `out`, unique per writer (a killed worker's ffmpeg may still be writing while
    Ray retries the task) and tagged with the curate run that wrote it, so that run's garbage
    collection can remove the leftovers of its killed workers (`collect_garbage`)."""
    return out.with_name(f"{out.stem}{_PARTIAL}{run or 'x'}.{uuid.uuid4().hex[:8]}.mp4")


def _data_files(root: str | Path) -> set[str]:
    """Paths of the data files that any version of the clips table names (vacuumed ones included):
    the `add` actions of its log's commits, and of its checkpoints, which stand in for commits that
    log retention removed. Read directly: deltalake loads a snapshot per version at ~10 ms each."""
    table = Path(clips_path(root))
    log = table / "_delta_log"
    paths = set()
    for p in log.glob("*.json"):
        for line in p.read_text().splitlines():  # one action per line
            action = json.loads(line) if line.strip() else {}
            if "add" in action:
                paths.add(action["add"]["path"])
    for p in log.glob("*.checkpoint*.parquet"):
        paths.update(x for x in pq.read_table(p, columns=["add"])["add"].combine_chunks().field("path").to_pylist() if x)
    return {_local_file(table, x) for x in paths}


def _local_file(table: Path, path: str) -> str:
    """A log's data-file path as a local path: relative and percent-encoded (what delta-rs writes), or
    an absolute file:// URI (what a shallow clone or another writer may record). Any other scheme
    is an error: GC would otherwise count that file's clips as unreferenced and delete their media."""
    url = urlparse(path)
    if url.scheme == "file":
        return unquote(url.path)
    if url.scheme and len(url.scheme) > 1:  # (one letter: a Windows drive, not a scheme)
        raise ValueError(f"the clips table names a data file outside the local disk ({path}): "
                         f"media garbage collection needs every version's files readable here")
    return str(table / unquote(path))


def collect_garbage(root: str | Path, older_than: float, run: str | None = None) -> list[Path]:
    """Remove media files that no committed version and no staged row refers to, and temp files.

    Called after each curate commits, with `older_than` = the run's start time: a clip written by a
    killed earlier run was reused by this one (so it is referenced) or is an orphan; files newer than
    our start may belong to a concurrent writer and are left alone. Temp files tagged with `run`
    (`partial_name`) go whatever their age: this run's work is done, so they are the
    leftovers of its killed workers, whose retried tasks wrote their own.
    """
    media = Path(root) / "media"
    if not media.is_dir():
        return []
    referenced = set()
    for f in _data_files(root):  # each file once, however many versions share it
        try:
            uris = pq.read_table(f, columns=["clip_uri"])["clip_uri"].to_pylist()
        except FileNotFoundError:  # vacuumed: the versions that named it can't be read any more
            continue
        referenced.update(media_key(u) for u in uris if u)
    for t in load_staged(root).values():
        if "clip_uri" in t.column_names:
            referenced.update(media_key(u) for u in t["clip_uri"].to_pylist() if u)
    # Matched by name within media/, not by absolute path: in a copied or moved root the rows still
    # name the old location, and its files here must not count as unreferenced
    removed = []
    for p in media.rglob("*"):
        if p.is_file() and ((run and f"{_PARTIAL}{run}." in p.name) or p.stat().st_mtime < older_than and (
                _PARTIAL in p.name or media_key(p) not in referenced)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --- tags, restore, retention ----------------------------------------------------------------

def _tags_path(root: str | Path) -> Path:
    return Path(root) / "tags.json"


def read_tags(root: str | Path) -> dict[str, int]:
    p = _tags_path(root)
    return json.loads(p.read_text()) if p.is_file() else {}


def tag(root: str | Path, name: str, version: Optional[int] = None) -> int:
    """Name a version (default latest). Tags are immutable: re-tagging a name is an error."""
    if not name or "/" in name:
        raise ValueError(f"bad tag name {name!r}")
    if str(name).isdigit():  # resolve_ref reads a number as a version: such a tag could never be used
        raise ValueError(f"bad tag name {name!r}: a number names a version, not a tag")
    latest = latest_version(root)
    v = latest if version is None else version
    if latest is None or v is None or not 0 <= v <= latest:
        raise ValueError(f"version {version} does not exist (latest is {latest})")
    read_clips(root, v, columns=["clip_id"])  # a vacuumed version: ValueError, not a tag nothing can read
    # read-check-write under a lock: two concurrent `datasets tag` runs each wrote the tags they had
    # read plus their own, so one tag was lost, or one name silently re-pointed (tags are immutable);
    # and they shared one temp file, so one of them crashed or the file came out torn
    with open(_tags_path(root).with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tags = read_tags(root)
        if name in tags and tags[name] != v:
            raise ValueError(f"tag {name!r} already names version {tags[name]}")
        tags[name] = v
        tmp = _tags_path(root).with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(tags, indent=2, sort_keys=True))
        os.replace(tmp, _tags_path(root))
    return v


def resolve_ref(root: str | Path, ref: str | int) -> int:
    """A version number or a tag name -> version number."""
    if isinstance(ref, int) or str(ref).isdigit():
        return int(ref)
    tags = read_tags(root)
    if ref not in tags:
        raise ValueError(f"unknown tag {ref!r}; tags: {', '.join(sorted(tags)) or 'none'}")
    return tags[ref]


def restore(root: str | Path, version: int) -> int:
    """Make an old version's rows the latest state, as a new commit (history is kept)."""
    old = read_clips(root, version)
    return commit(root, old, "overwrite", {"operation": "restore", "restored_version": version},
                  expect_version=latest_version(root))


def vacuum(root: str | Path, retain_hours: int, dry_run: bool = True, drop_tagged: bool = False) -> list[str]:
    """Explicit retention: delete data files only versions older than `retain_hours` need. A tagged
    version is a release someone pinned: when it needs any of those files, ValueError naming the tags
    (unless drop_tagged: those tags then stop being readable)."""
    dt = DeltaTable(clips_path(root))
    doomed = {f for f in dt.vacuum(retention_hours=retain_hours, dry_run=True, enforce_retention_duration=False)
              if (Path(clips_path(root)) / unquote(f)).exists()}  # (its list repeats files already vacuumed)
    if doomed and not drop_tagged:
        hit = []
        for name, v in sorted(read_tags(root).items(), key=lambda kv: kv[1]):
            try:
                files = DeltaTable(clips_path(root), version=v).get_add_actions(flatten=True).column("path")
            except Exception:  # noqa: BLE001 - its log is gone already: nothing left to protect
                continue
            if doomed & {p for x in files.to_pylist() for p in (x, unquote(x))}:  # (as logged, or decoded)
                hit.append(f"{name} (version {v})")
        if hit:
            raise ValueError(f"vacuum would delete files that tagged versions need: {', '.join(hit)}; raise "
                             f"--retain-hours past them, or pass --drop-tagged to let those tags go unreadable")
    if not dry_run:
        # a live curate writes its data files before its commit names them; vacuum deletes unnamed files
        # older than the window, so one that has run longer than --retain-hours would lose them
        started = oldest_live_start(root, default=float("inf"))
        if started < time.time() - retain_hours * 3600:
            raise ValueError(f"a curate run into {root} is live (started {(time.time() - started) / 3600:.2f} h ago): "
                             f"vacuum with --retain-hours {retain_hours} could delete the files it is about to "
                             f"commit; vacuum after it finishes, or with --retain-hours above its age")
        dt.vacuum(retention_hours=retain_hours, dry_run=False, enforce_retention_duration=False)
    return sorted(doomed)  # (delta-rs's own list counts files an earlier vacuum deleted)
