"""Unit tests of the pure curation pieces: spec validation, sources, clip planning, the Delta store."""
import os

import pyarrow as pa
import pytest

from pipeline import store
from pipeline.clips import clip_id, plan_clips
from pipeline.shots import boundary_f1, merge_cuts, shots_from_boundaries
from pipeline.sources import expand_sources
from pipeline.spec import DatasetSpec, SpecError, load_spec


def test_demo_spec_is_the_default():
    assert load_spec("datasets/demo.yaml").spec_hash() == DatasetSpec().spec_hash()


@pytest.mark.parametrize("text, field", [
    ("clips:\n  max_seconds: -1\n", "clips.max_seconds"),
    ("filters:\n  max_blurr: 0.5\n", "filters.max_blurr"),
    ("clips:\n  mode: copy\n", "clips.mode"),
    ("clips:\n  min_seconds: 5\n  max_seconds: 2\n", "clips"),
    # NaN passed every clip through the threshold (each comparison is false); .inf failed every source's clip plan
    ("filters:\n  max_blur: .nan\n", "filters.max_blur"),
    ("clips:\n  max_seconds: .inf\n", "clips.max_seconds"),
    # a preset typo failed every clip's transcode after the whole analysis; an inverted range filtered every clip
    ("clips:\n  preset: veryfst\n", "clips.preset"),
    ("filters:\n  min_brightness: 0.9\n  max_brightness: 0.1\n", "filters"),
])
def test_spec_errors_name_the_field(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_spec_missing_and_not_yaml(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory, not a YAML file"):  # it said "not found" of a dir
        load_spec(tmp_path)
    (tmp_path / "x.yaml").write_text("a: [1,")
    with pytest.raises(SpecError, match="not valid YAML: line 1, column 7: expected") as e:
        load_spec(tmp_path / "x.yaml")
    assert "\n" not in str(e.value)  # pyyaml's own text spans five lines
    (tmp_path / "latin1.yaml").write_bytes("name: café\n".encode("latin-1"))  # a traceback before
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(tmp_path / "latin1.yaml")


@pytest.mark.parametrize("text, key", [
    ("filters:\n  max_blur: 0.5\nclips:\n  crf: 23\nfilters:\n  min_motion: 0.2\n", "'filters'"),
    ("filters:\n  max_blur: 0.5\n  max_blur: 0.9\n", "'max_blur'"),
])
def test_a_key_given_twice_is_an_error_not_the_last_one_winning(tmp_path, text, key):
    """YAML loaders keep the last of two equal keys: the first `filters:` section's max_blur 0.5 was
    silently dropped. Merge keys (`<<: *base`) still override as YAML says."""
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    with pytest.raises(SpecError, match=f"duplicate key {key}"):
        load_spec(p)
    p.write_text("filters:\n  <<: {max_blur: 0.5, min_motion: 0.1}\n  max_blur: 0.4\n")
    assert (load_spec(p).filters.max_blur, load_spec(p).filters.min_motion) == (0.4, 0.1)


def test_manifest_paths_cannot_escape_root(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mp4").write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    (root / "link.mp4").symlink_to(outside)
    (root / "list.txt").write_text("sub/a.mp4\n../secret.mp4\n/etc/passwd\nlink.mp4\n# comment\n\ns3://bucket/x.mp4\n")
    got = {s.uri: s.reject for s in expand_sources([str(root / "list.txt")])}
    assert got[str(root / "sub" / "a.mp4")] is None
    assert "escapes its root" in got["../secret.mp4"]
    assert "escapes its root" in got["/etc/passwd"]
    assert "escapes its root" in got["link.mp4"]
    assert "unsupported URI scheme" in got["s3://bucket/x.mp4"]


def test_a_manifest_path_with_dot_dot_names_the_file_once(tmp_path):
    """"sub/../a.mp4" in a manifest was a second uri for a.mp4 beside the directory walk's: the file
    was curated twice and its second row rejected as identical content to itself (exit status 3).
    A ".." after a symlinked directory still names the file the OS opens."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "deep" / "er").mkdir(parents=True)
    (root / "a.mp4").write_bytes(b"x")
    (root / "deep" / "a.mp4").write_bytes(b"y")
    (root / "link").symlink_to(root / "deep" / "er")
    (root / "list.txt").write_text("a.mp4\nsub/../a.mp4\n./sub/../a.mp4\nlink/../a.mp4\n")
    got = [s.uri for s in expand_sources([str(root / "list.txt"), str(root)])]
    assert got == sorted({str(root / "a.mp4"), str(root / "deep" / "a.mp4"), str(root / "link" / ".." / "a.mp4")})
    assert all(open(u, "rb").read() == b"y" for u in got if "link" in u)  # the file the OS opens


def test_directory_and_glob_sources_are_sorted_and_unique(tmp_path):
    for name in ("b.mp4", "a.MOV", "c.txt.bak", "d.mkv"):
        (tmp_path / name).write_bytes(b"x")
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path)  # a symlink loop must not trap the walk
    got = expand_sources([str(tmp_path), str(tmp_path / "*.mp4")])
    assert [os.path.basename(s.uri) for s in got] == ["a.MOV", "b.mp4", "d.mkv"]
    assert expand_sources([str(tmp_path / "*.webm")])[0].reject == "glob matched no files"


def test_clip_planning_splits_long_shots_and_keeps_short_ones():
    shots = shots_from_boundaries([10, 250], 300)
    assert shots == [(0, 10), (10, 250), (250, 300)]
    plans = plan_clips(shots, fps=24, max_seconds=4.0)
    assert all(p.end_frame - p.start_frame <= 96 for p in plans)
    assert plans[0].start_frame == 0 and plans[0].end_frame == 10          # the short shot keeps a clip
    assert [p.start_frame for p in plans if p.shot_start_frame == 10] == [10, 90, 170]
    assert sum(p.end_frame - p.start_frame for p in plans) == 300


def test_clip_id_is_deterministic_and_range_specific():
    assert clip_id("ab", 0, 10) == clip_id("ab", 0, 10)
    assert len({clip_id("ab", 0, 10), clip_id("ab", 0, 11), clip_id("ac", 0, 10)}) == 3


def test_cut_merging_and_f1():
    assert merge_cuts([10, 11, 12, 50, 80, 81, 0, 500], 4, 100) == [11, 50, 80]
    m = boundary_f1([10, 52, 90], [11, 50, 70], tolerance=2)
    assert m["tp"] == 2 and abs(m["f1"] - 2 / 3) < 1e-9


def _rows(n, status="kept", start=0):
    return pa.table({"clip_id": [f"id{start + i}" for i in range(n)], "source_uri": ["/x.mp4"] * n,
                     "start_frame": list(range(start, start + n)), "status": [status] * n})


def test_store_versions_lineage_time_travel_diff_and_tags(tmp_path):
    root = tmp_path / "ds"
    assert store.read_clips(root).num_rows == 0
    v0 = store.commit(root, _rows(3), "append", {"operation": "curate", "spec_hash": "s0"})
    v1 = store.commit(root, _rows(2, "filtered", start=3), "append", {"operation": "curate", "spec_hash": "s1"})
    assert (v0, v1) == (0, 1)
    assert store.read_clips(root, 0).num_rows == 3 and store.read_clips(root).num_rows == 5
    h = store.history(root)
    assert [x["operation"] for x in h] == ["curate", "curate"]
    assert h[1]["parent_version"] == 0 and h[1]["spec_hash"] == "s1"
    assert h[1]["counts"]["kept"] == 3 and h[1]["counts"]["filtered"] == 2 and h[1]["code_version"]
    assert set(store.read_clips(root).schema.names) >= set(store.CLIPS_SCHEMA.names)
    d = store.diff(root, 0, 1)
    assert d["added"] == ["id3", "id4"] and d["removed"] == []
    t = store.read_clips(root)
    flipped = t.set_column(t.schema.get_field_index("status"), "status", pa.array(["filtered"] * 5))
    store.commit(root, flipped, "overwrite", {"operation": "refilter"})
    assert len(store.diff(root, 1, 2)["status_changed"]) == 3
    reasons = flipped.set_column(flipped.schema.get_field_index("reason"), "reason",
                                 pa.array(["blur 0.9 > max_blur 0.85"] * 5))
    store.commit(root, reasons, "overwrite", {"operation": "refilter"})  # filtered still, now for a reason
    d = store.diff(root, 2, 3)
    assert d["status_changed"] == {} and d["reason_changed"] == {f"id{i}": (None, "blur 0.9 > max_blur 0.85")
                                                                 for i in range(5)}
    assert store.tag(root, "v1-release", 1) == 1
    assert store.resolve_ref(root, "v1-release") == 1
    with pytest.raises(ValueError, match="already names"):
        store.tag(root, "v1-release", 0)
    with pytest.raises(ValueError, match="unknown tag"):
        store.resolve_ref(root, "nope")
    v4 = store.restore(root, 1)
    assert store.status_counts(store.read_clips(root, v4)) == store.status_counts(store.read_clips(root, 1))
    with pytest.raises(ValueError, match="not found"):
        store.read_clips(root, 99)


def test_a_script_reading_a_table_exits_cleanly(tmp_path):
    # deltalake's threaded pyarrow scan made a plain script (no ray imported) abort at exit with
    # SIGABRT "terminate called without an active exception" in 7 of 10 runs here; read on one thread
    import subprocess
    import sys

    root = tmp_path / "ds"
    store.commit(root, _rows(40), "append", {"operation": "curate"})
    script = f"from pipeline.store import read_clips\nassert read_clips({str(root)!r}).num_rows == 40\n"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for _ in range(6):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, (r.returncode, r.stderr[-500:])


def test_staging_is_atomic_and_reloadable(tmp_path):
    store.stage(tmp_path, "abc", _rows(2))
    (tmp_path / "_staging" / ".abc.dead.tmp").write_bytes(b"partial")  # a killed writer's leftover
    got = store.load_staged(tmp_path)
    assert list(got) == ["abc"] and got["abc"].num_rows == 2
    store.clear_staging(tmp_path)
    assert not (tmp_path / "_staging").exists()


def test_a_copied_root_keeps_its_media(tmp_path):
    """Rows name media by absolute path; in a copy of the root those still point at the original.
    GC must not delete the copy's files, and staged rows are re-pointed at the copy's own files."""
    import shutil
    import time

    old, new = tmp_path / "old", tmp_path / "new"
    f = old / "media" / "id" / "id0.mp4"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"clip")
    committed = _rows(1).append_column("clip_uri", pa.array([str(f.resolve())]))
    store.commit(old, committed, "append", {"operation": "curate"})
    g = old / "media" / "id" / "id1.mp4"
    g.write_bytes(b"staged clip")
    store.stage(old, "src", _rows(1, start=1).append_column("clip_uri", pa.array([str(g.resolve())])))
    shutil.copytree(old, new)
    shutil.rmtree(old)
    assert store.load_staged(new)["src"]["clip_uri"][0].as_py() == str((new / "media" / "id" / "id1.mp4").resolve())
    assert store.collect_garbage(new, older_than=time.time() + 60) == []
    assert (new / "media" / "id" / "id0.mp4").is_file() and (new / "media" / "id" / "id1.mp4").is_file()
    (new / "media" / "id" / "id9.mp4").write_bytes(b"orphan")  # named by nothing: still collected
    assert [p.name for p in store.collect_garbage(new, older_than=time.time() + 60)] == ["id9.mp4"]


def test_gc_removes_this_runs_partials_of_any_age(tmp_path):
    """A killed worker's temp transcode is tagged with its run: that run's GC removes it even though
    it is newer than the run's start; another live run's fresh temp files are left alone."""
    import time

    out = tmp_path / "media" / "ab" / "abc.mp4"
    out.parent.mkdir(parents=True)
    mine, theirs = store.partial_name(out, "run1"), store.partial_name(out, "run2")
    mine.write_bytes(b"torn")
    theirs.write_bytes(b"being written")
    started = time.time() - 60  # both files are newer than this run's start
    assert store.collect_garbage(tmp_path, older_than=started, run="run1") == [mine]
    assert theirs.is_file()


def test_analysed_rows_of_a_copied_root_name_its_own_media(tmp_path):
    """A root copied after a killed run: its kept analysis must name the copy's clip files, never the
    original's; with the copy's file gone it is analysed again (None), even though the original's exists."""
    import shutil

    old, new = tmp_path / "old", tmp_path / "new"
    f = old / "media" / "ab" / "abc.mp4"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"clip")
    store.save_analysed(old, "k", pa.table({"clip_id": ["abc"], "clip_uri": [str(f.resolve())]}))
    shutil.copytree(old, new)
    assert store.load_analysed(old, "k")["clip_uri"][0].as_py() == str(f.resolve())
    assert store.load_analysed(new, "k")["clip_uri"][0].as_py() == str((new / "media" / "ab" / "abc.mp4").resolve())
    (new / "media" / "ab" / "abc.mp4").unlink()
    assert store.load_analysed(new, "k") is None


def test_gc_and_diff_after_a_vacuum(tmp_path):
    """`datasets vacuum --apply` removes the data files of old versions: GC (run after every curate
    commit) must skip those versions instead of raising, and diff says why it can't read them."""
    import time

    from typer.testing import CliRunner

    from spacetime.cli import app

    media = tmp_path / "media" / "id"
    media.mkdir(parents=True)
    old, kept = media / "id0.mp4", media / "id1.mp4"
    old.write_bytes(b"named only by version 0")
    kept.write_bytes(b"named by version 1")
    store.commit(tmp_path, _rows(1).append_column("clip_uri", pa.array([str(old)])), "append", {"operation": "curate"})
    store.commit(tmp_path, _rows(1, start=1).append_column("clip_uri", pa.array([str(kept)])), "overwrite",
                 {"operation": "refilter"}, expect_version=0)
    assert len(store.vacuum(tmp_path, 0, dry_run=False)) == 1
    assert store.collect_garbage(tmp_path, older_than=time.time() + 60) == [old]
    assert kept.is_file()
    with pytest.raises(ValueError, match="version 0 can no longer be read.*vacuum"):
        store.diff(tmp_path, 0, 1)
    with pytest.raises(ValueError, match="version 0 can no longer be read"):  # it was tagged all the same
        store.tag(tmp_path, "old", 0)
    assert store.read_tags(tmp_path) == {}
    r = CliRunner().invoke(app, ["datasets", "diff", str(tmp_path), "0", "1"])
    assert r.exit_code == 2 and "can no longer be read" in r.output and r.exception.__class__ is SystemExit


def test_list_log_and_show_after_a_vacuum(tmp_path):
    """`vacuum --apply` logs two commits of its own ("VACUUM START", "VACUUM END") with no lineage:
    `datasets list` then printed the latest version with no counts at all, and `log`/`show` called
    them operation None. The counts are the table's; the operation is Delta's own name."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    root = tmp_path / "ds"
    store.commit(root, _rows(2), "append", {"operation": "curate"})
    store.commit(root, _rows(1, "filtered", start=2), "overwrite", {"operation": "refilter"}, expect_version=0)
    store.vacuum(root, 0, dry_run=False)
    assert [h["operation"] for h in store.history(root)] == ["curate", "refilter", "VACUUM START", "VACUUM END"]
    r = CliRunner().invoke(app, ["datasets", "list", str(tmp_path)])
    assert r.exit_code == 0 and "version 3  kept=0 filtered=1 duplicate=0 rejected=0" in r.output, r.output
    r = CliRunner().invoke(app, ["datasets", "show", str(root)])
    assert r.exit_code == 0 and "version 3: 1 rows; operation VACUUM END" in r.output, r.output


def test_list_of_a_directory_that_is_not_there_is_an_error(tmp_path):
    """A mistyped directory printed "no datasets under ..." with exit 0, as if it had been searched."""
    from typer.testing import CliRunner

    from spacetime.cli import app
    (tmp_path / "notes.txt").write_text("mine")
    for where in (tmp_path / "missing", tmp_path / "notes.txt"):
        r = CliRunner().invoke(app, ["datasets", "list", str(where)])
        assert r.exit_code == 2 and "is not a directory" in r.output and r.exception.__class__ is SystemExit, r.output
    r = CliRunner().invoke(app, ["datasets", "list", str(tmp_path)])
    assert r.exit_code == 0 and "no datasets under" in r.output, r.output


def test_vacuum_refuses_to_break_a_tagged_version(tmp_path):
    """A tag pins a release: vacuum that would delete its files is refused (one error line in the CLI)
    unless --drop-tagged; untagged old versions go as before."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    store.commit(tmp_path, _rows(1), "append", {"operation": "curate"})
    store.commit(tmp_path, _rows(1, start=1), "overwrite", {"operation": "refilter"}, expect_version=0)
    store.tag(tmp_path, "release-1", 0)
    with pytest.raises(ValueError, match="release-1 \\(version 0\\)"):
        store.vacuum(tmp_path, 0, dry_run=True)
    r = CliRunner().invoke(app, ["datasets", "vacuum", str(tmp_path), "--retain-hours", "0", "--apply"])
    assert r.exit_code == 2 and "--drop-tagged" in r.output, r.output
    assert store.read_clips(tmp_path, 0).num_rows == 1  # still readable
    r = CliRunner().invoke(app, ["datasets", "vacuum", str(tmp_path), "--retain-hours", "0", "--apply", "--drop-tagged"])
    assert r.exit_code == 0 and "deleted 1 file" in r.output, r.output
    store.commit(tmp_path, _rows(1, start=2), "overwrite", {"operation": "refilter"},
                 expect_version=store.latest_version(tmp_path))  # (vacuum logs commits of its own)
    assert len(store.vacuum(tmp_path, 0, dry_run=False)) == 1  # version 1 is untagged


def test_vacuum_spares_the_files_of_a_live_curate(tmp_path):
    """A curate writes its data files, then commits them: `vacuum --apply --retain-hours 0` in between
    deleted them, and the commit named files that were gone. While a run's lease is live, a vacuum whose
    window is shorter than the run's age is refused (a dry run still lists)."""
    store.commit(tmp_path, _rows(1), "append", {"operation": "curate"})
    store.commit(tmp_path, _rows(1, start=1), "overwrite", {"operation": "refilter"}, expect_version=0)
    lease = store.acquire_lease(tmp_path)  # this process: a live run
    try:
        assert len(store.vacuum(tmp_path, 0, dry_run=True)) == 1
        with pytest.raises(ValueError, match="curate run into .* is live"):
            store.vacuum(tmp_path, 0, dry_run=False)
        assert store.read_clips(tmp_path, 0).num_rows == 1  # nothing deleted
        assert len(store.vacuum(tmp_path, 1, dry_run=False)) == 0  # a window past the run's age is safe
    finally:
        store.release_lease(lease)
    assert len(store.vacuum(tmp_path, 0, dry_run=False)) == 1


def test_identical_copies_all_name_the_path_that_keeps_the_clips(tmp_path):
    """Byte-identical files in one run: the smallest path keeps the clips, the others point at it,
    whatever order they finish in (b, c, a used to leave c naming b, which had become a duplicate)."""
    from pipeline.graph import ROW_TEMPLATE, _stage_source

    def clip_rows(uri):
        return [{**ROW_TEMPLATE, "clip_id": "cid0", "source_uri": uri, "source_sha256": "s" * 64, "_key": "s" * 64,
                 "status": "kept", "start_frame": 0, "end_frame": 10}]
    staged = {}
    for uri in ("/v/b.mp4", "/v/c.mp4", "/v/a.mp4"):
        _stage_source(str(tmp_path), staged, clip_rows(uri))
    rows = [r for t in store.load_staged(tmp_path).values() for r in t.to_pylist()]
    assert sorted(r["source_uri"] for r in rows if r["clip_id"]) == ["/v/a.mp4"]
    dups = {r["source_uri"]: r["reason"] for r in rows if not r["clip_id"]}
    assert set(dups) == {"/v/b.mp4", "/v/c.mp4"}
    assert all(reason.startswith("identical content to /v/a.mp4 ") for reason in dups.values()), dups


def test_show_log_and_diff_take_tags(tmp_path):
    from typer.testing import CliRunner

    from spacetime.cli import app

    store.commit(tmp_path, _rows(1), "append", {"operation": "curate"})
    store.commit(tmp_path, _rows(1, start=1), "append", {"operation": "curate"})
    store.tag(tmp_path, "first", 0)
    r = CliRunner().invoke(app, ["datasets", "diff", str(tmp_path), "first", "1"])
    assert r.exit_code == 0 and "version 0 -> 1: +1 clips" in r.output, r.output
    r = CliRunner().invoke(app, ["datasets", "show", str(tmp_path), "--version", "first"])
    assert r.exit_code == 0 and "version 0: 1 rows" in r.output, r.output
    r = CliRunner().invoke(app, ["datasets", "show", str(tmp_path), "--version", "nope"])
    assert r.exit_code == 2 and "unknown tag 'nope'" in r.output, r.output
    r = CliRunner().invoke(app, ["datasets", "log", str(tmp_path), "--version", "first"])  # as DESIGN.md names it
    assert r.exit_code == 0 and "version 0 " in r.output and "version 1 " not in r.output, r.output
    assert '"operation": "curate"' in r.output and '"parent_version"' in r.output, r.output  # the whole lineage
    for ref, msg in (("nope", "unknown tag 'nope'"), ("7", "version 7 of")):
        r = CliRunner().invoke(app, ["datasets", "log", str(tmp_path), "--version", ref])
        assert r.exit_code == 2 and msg in r.output, r.output
    r = CliRunner().invoke(app, ["datasets", "show", str(tmp_path), "--status", "keep"])  # printed no rows
    assert r.exit_code == 2 and "--status keep: expected one of kept, filtered" in r.output, r.output
    r = CliRunner().invoke(app, ["datasets", "show", str(tmp_path), "--limit", "-1"])  # printed no rows either
    assert r.exit_code == 2 and "--limit" in r.output, r.output


def test_gc_reads_each_data_file_once(tmp_path, monkeypatch):
    """GC needs the clip_uri of every version: it reads each data file once, not each version's rows."""
    import time

    import pyarrow.parquet as pq

    for i in range(4):
        store.commit(tmp_path, _rows(1, start=i), "append", {"operation": "curate"})
    (tmp_path / "media").mkdir()
    reads = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda f, **k: reads.append(f) or real(f, **k))
    store.collect_garbage(tmp_path, older_than=time.time())
    assert len(reads) == len(set(reads)) == 4  # one file per append; versions 0..3 name 10 in all


def test_gc_reads_absolute_file_uris_in_the_log(tmp_path):
    """A log may name a data file by absolute file:// URI (a shallow clone, another writer): GC still reads
    its clip_uris (it used to join the URI onto the table dir, find nothing, and delete the clips' media);
    a remote URI is refused rather than counted as naming nothing."""
    import json
    import time
    from pathlib import Path

    clip = tmp_path / "media" / "id" / "id0.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"clip")
    store.commit(tmp_path, _rows(1).append_column("clip_uri", pa.array([str(clip)])), "append", {"operation": "curate"})
    table = Path(store.clips_path(tmp_path))
    log = next((table / "_delta_log").glob("*.json"))
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    for a in lines:
        if "add" in a:
            a["add"]["path"] = (table / a["add"]["path"]).as_uri()
    log.write_text("\n".join(json.dumps(a) for a in lines) + "\n")
    assert store.collect_garbage(tmp_path, older_than=time.time() + 60) == [] and clip.is_file()
    for a in lines:
        if "add" in a:
            a["add"]["path"] = "s3://bucket/clips/part-0.parquet"
    log.write_text("\n".join(json.dumps(a) for a in lines) + "\n")
    with pytest.raises(ValueError, match="outside the local disk"):
        store.collect_garbage(tmp_path, older_than=time.time() + 60)
    assert clip.is_file()


def test_a_file_named_like_a_glob_is_a_file(tmp_path):
    f = tmp_path / "Title [abc123].mp4"  # yt-dlp's naming
    f.write_bytes(b"x")
    assert expand_sources([str(f)]) == [expand_sources([str(tmp_path)])[0]]
    assert expand_sources([str(f)])[0].reject is None
    assert expand_sources([str(tmp_path / "*[0-9]].mp4")])[0].uri == str(f)  # still a glob when no such file


def test_manifest_names_that_are_not_utf8_round_trip(tmp_path):
    """A Latin-1 name in a manifest opens as the same bytes (it read as a missing 'caf?.mp4'); a
    rejected one still makes a row whose text is valid UTF-8."""
    from pipeline.graph import rejected_row

    name = b"caf\xe9.mp4"
    (tmp_path / os.fsdecode(name)).write_bytes(b"x")
    (tmp_path / "list.txt").write_bytes(name + b"\n../" + name + b"\n")
    escaped, s = expand_sources([str(tmp_path / "list.txt")])
    assert s.reject is None and os.fsencode(s.uri) == os.fsencode(str(tmp_path)) + b"/" + name
    assert os.path.isfile(s.uri)
    row = pa.Table.from_pylist([rejected_row(escaped.uri, escaped.reject)]).to_pylist()[0]
    assert row["source_uri"] == "../caf\\xe9.mp4" and "escapes its root" in row["reason"]


def test_a_tag_that_is_a_number_is_refused(tmp_path):
    """`checkout 5` / `report --version 5` read version 5: a tag named "5" could never be reached."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    store.commit(tmp_path, _rows(1), "append", {"operation": "curate"})
    with pytest.raises(ValueError, match="a number names a version"):
        store.tag(tmp_path, "5", 0)
    r = CliRunner().invoke(app, ["datasets", "tag", str(tmp_path), "12"])
    assert r.exit_code == 2 and "a number names a version" in r.output
    assert store.read_tags(tmp_path) == {}
    assert store.tag(tmp_path, "v5", 0) == 0 and store.resolve_ref(tmp_path, "v5") == 0


def test_concurrent_tags_are_all_kept_and_stay_immutable(tmp_path, monkeypatch):
    """Two `datasets tag` runs at once each wrote back the tags they had read plus their own: one tag
    was lost although both printed "tagged", or a name was re-pointed to another version."""
    import threading
    import time

    root = tmp_path / "ds"
    store.commit(root, _rows(1), "append", {"operation": "curate"})
    store.commit(root, _rows(1, start=1), "append", {"operation": "curate"})
    real = store.read_tags
    monkeypatch.setattr(store, "read_tags", lambda r: (real(r), time.sleep(0.3))[0])  # both read before either writes
    errors = []

    def tag(name, version):
        try:
            store.tag(root, name, version)
        except ValueError as e:
            errors.append(str(e))

    for jobs in ([("a", 0), ("b", 1)], [("same", 0), ("same", 1)]):
        threads = [threading.Thread(target=tag, args=job) for job in jobs]
        [t.start() for t in threads]
        [t.join() for t in threads]
    tags = real(root)
    assert {k: tags[k] for k in ("a", "b")} == {"a": 0, "b": 1}
    assert len(errors) == 1 and "already names version" in errors[0] and errors[0].endswith(str(tags["same"]))
    assert [p.name for p in root.iterdir() if p.suffix == ".tmp"] == []


def test_a_root_whose_path_deltalake_would_misread_is_refused_up_front(tmp_path, monkeypatch):
    """deltalake percent-decodes local paths: curating into ".../My%20Videos/ds" wrote version 0, then
    every read (the next curate, `datasets log`) failed with "File not found: .../My Videos/ds/...".
    Now curate refuses that root before any work, in one line; other commands and `list` say why."""
    import ray.data
    from typer.testing import CliRunner

    from spacetime.cli import app

    (tmp_path / "v.mp4").write_bytes(b"x")
    bad = tmp_path / "My%20Videos" / "ds"
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("curation work started"))
    r = CliRunner().invoke(app, ["curate", str(tmp_path / "v.mp4"), "--dataset", str(bad)])
    assert r.exit_code == 2 and "%XX" in r.output and r.exception.__class__ is SystemExit, r.output
    assert not (bad / "clips").exists()
    (bad / "clips" / "_delta_log").mkdir(parents=True)  # (made by an older version of this code)
    r = CliRunner().invoke(app, ["datasets", "log", str(bad)])
    assert r.exit_code == 2 and "%XX" in r.output and r.exception.__class__ is SystemExit, r.output
    good = tmp_path / "good"
    store.commit(good, _rows(2), "append", {"operation": "curate"})
    r = CliRunner().invoke(app, ["datasets", "list", str(tmp_path)])
    assert r.exit_code == 0 and "unreadable" in r.output and "kept=2" in r.output, r.output


def test_a_glob_matching_directories_walks_them(tmp_path):
    """`curate 'footage/day*'`: the matched day directories' videos are sources, not silently dropped."""
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
        (tmp_path / day / "a.mp4").write_bytes(b"x")
        (tmp_path / day / "notes.json").write_bytes(b"{}")
    (tmp_path / "day2" / "CLIP0001.MTS").write_bytes(b"x")  # a camera's AVCHD file is footage too
    got = [s.uri for s in expand_sources([str(tmp_path / "day*")])]
    assert got == [str(tmp_path / "day1" / "a.mp4"), str(tmp_path / "day2" / "CLIP0001.MTS"),
                   str(tmp_path / "day2" / "a.mp4")]


def test_datasets_commands_refuse_bad_output_and_retention_in_one_line(tmp_path):
    """A missing --out directory and a negative retention are user mistakes: an error line, no traceback."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    store.commit(tmp_path, _rows(1), "append", {"operation": "curate"})
    run = CliRunner().invoke
    r = run(app, ["datasets", "checkout", str(tmp_path), "0", "--out", str(tmp_path / "no" / "v0.parquet")])
    assert r.exit_code == 2 and "cannot write" in r.output and r.exception.__class__ is SystemExit, r.output
    r = run(app, ["datasets", "vacuum", str(tmp_path), "--retain-hours", "-1"])
    assert r.exit_code == 2 and r.exception.__class__ is SystemExit, r.output
    r = run(app, ["report", str(tmp_path), "--out", str(tmp_path)])  # a directory
    assert r.exit_code == 2 and "cannot write the report" in r.output and r.exception.__class__ is SystemExit
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp"))  # no stray temp file beside it


def test_a_manifest_with_a_bom_or_file_uris_names_its_files(tmp_path):
    """A manifest saved by a Windows editor starts with a UTF-8 BOM, and a file:// URI percent-encodes
    its path: both named a missing file ("\\ufeffa.mp4", "my%20clip.mp4") instead of the one listed."""
    for name in ("a.mp4", "my clip.mp4", os.fsdecode(b"caf\xe9.mp4")):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfa.mp4\r\nfile://" + str(tmp_path).encode()
                                        + b"/my%20clip.mp4\nfile://localhost" + str(tmp_path).encode() + b"/caf%E9.mp4\n")
    got = expand_sources([str(tmp_path / "list.txt")])
    assert all(s.reject is None and os.path.isfile(s.uri) for s in got) and len(got) == 3, got
