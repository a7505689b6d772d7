"""Integration tests of `curate`: real Ray, real ffmpeg, real Delta tables, generated footage.

One module-scoped run of the demo footage through the whole graph feeds most assertions; the
resume, rerun and refilter tests reuse its dataset root.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pyarrow.compute as pc
import pytest

from pipeline import store
from pipeline.graph import curate, refilter
from pipeline.shots import boundary_f1
from pipeline.spec import DatasetSpec
from pipeline.synthetic import generate_footage, write_captions_file

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    out = tmp_path_factory.mktemp("footage")
    gt = generate_footage(out, seed=0, videos=4)
    return out, json.loads(Path(gt).read_text()), write_captions_file(gt, out / "captions.json")


@pytest.fixture(scope="module")
def curated(ray_session, footage, tmp_path_factory):
    src, gt, captions = footage
    root = tmp_path_factory.mktemp("ds")
    res = curate([str(src)], str(root), DatasetSpec(), captions=str(captions))
    return root, res, store.read_clips(root), gt


def _by_file(table):
    rows = {}
    for r in table.to_pylist():
        rows.setdefault(Path(r["source_uri"]).name, []).append(r)
    return rows


def test_split_quality_f1(curated):
    root, res, table, gt = curated
    rows = _by_file(table)
    tp = pred = truth = 0
    for v in gt["videos"]:
        starts = sorted({r["shot_start_frame"] for r in rows[v["file"]]} - {0})
        m = boundary_f1(starts, v["boundaries"], tolerance=2)
        tp, pred, truth = tp + m["tp"], pred + m["predicted"], truth + m["truth"]
    p, r = tp / pred, tp / truth
    f1 = 2 * p * r / (p + r)
    assert f1 >= 0.95, (p, r)


def test_table_contract_and_clip_files(curated):
    root, res, table, gt = curated
    assert set(store.CLIPS_SCHEMA.names) <= set(table.column_names)
    assert res.version == 0 and store.latest_version(root) == 0
    ids = table["clip_id"].to_pylist()
    assert len(ids) == len(set(ids)) and None not in ids
    for r in table.to_pylist():
        assert 0 <= r["start_frame"] < r["end_frame"] <= r["shot_end_frame"]
        assert r["shot_start_frame"] <= r["start_frame"]
        assert abs((r["end_s"] - r["start_s"]) * r["fps"] - (r["end_frame"] - r["start_frame"])) < 1e-6
        assert r["status"] in ("kept", "filtered", "duplicate")
        assert r["spec_hash"] is None or r["spec_hash"]  # lineage lives in the commit info
    # Every detected shot has at least one row; clips tile each shot.
    for name, rs in _by_file(table).items():
        shots = {(r["shot_start_frame"], r["shot_end_frame"]) for r in rs}
        for s, e in shots:
            covered = sum(r["end_frame"] - r["start_frame"] for r in rs if r["shot_start_frame"] == s)
            assert covered == e - s
    # Transcoded clips hold exactly the clip's frames (frame-accurate, not keyframe-snapped).
    for r in table.to_pylist()[:6]:
        with av.open(r["clip_uri"]) as c:
            n = sum(1 for _ in c.decode(video=0))
        assert n == r["end_frame"] - r["start_frame"]
    h = store.history(root)[-1]
    assert h["operation"] == "curate" and h["spec_hash"] == DatasetSpec().spec_hash() and h["parent_version"] is None
    assert sum(h["counts"].values()) == table.num_rows


def test_teacher_captions_imported(curated):
    root, res, table, gt = curated
    with_caps = [r for r in table.to_pylist() if r["caption_teacher_dense"]]
    assert len(with_caps) >= 0.9 * table.num_rows
    truth = {(v["file"], s["start_frame"]): s["caption_short"] for v in gt["videos"] for s in v["shots"]}
    for r in with_caps:
        key = (Path(r["source_uri"]).name, r["shot_start_frame"])
        if key in truth:
            assert r["caption_teacher_short"] == truth[key]


def test_scores_filters_and_dedup_on_demo(curated):
    root, res, table, gt = curated
    rows = _by_file(table)

    def rows_of(pred):
        out = []
        for v in gt["videos"]:
            for s in v["shots"]:
                if pred(s):
                    mid = (s["start_frame"] + s["end_frame"]) // 2
                    out += [r for r in rows[v["file"]] if r["start_frame"] <= mid < r["end_frame"]]
        return out

    dark = rows_of(lambda s: "dark" in s["defects"])
    blurred = rows_of(lambda s: "blur" in s["defects"])
    static = rows_of(lambda s: "static" in s["defects"])
    assert dark and all(r["status"] == "filtered" and "brightness" in r["reason"] for r in dark)
    assert blurred and all(r["status"] == "filtered" and "blur" in r["reason"] for r in blurred)
    assert static and all(r["static"] for r in static)
    texted = rows_of(lambda s: s["text"] and not s["defects"])
    plain = rows_of(lambda s: not s["text"] and not s["defects"])
    assert min(r["text_ratio"] for r in texted) > sorted(r["text_ratio"] for r in plain)[len(plain) // 2]
    # The near-duplicate shot is marked as a duplicate of its twin (or its twin of it).
    dup_shots = [(v["file"], s) for v in gt["videos"] for s in v["shots"] if s["duplicate_of"]]
    assert dup_shots
    by_id = {r["clip_id"]: r for r in table.to_pylist()}
    for file, s in dup_shots:
        twin_file = s["duplicate_of"]["file"]
        twin = next(v for v in gt["videos"] if v["file"] == twin_file)["shots"][s["duplicate_of"]["shot"]]
        mine = [r for r in rows[file] if r["shot_start_frame"] == s["start_frame"]]
        theirs = {r["clip_id"] for r in rows[twin_file] if r["shot_start_frame"] == twin["start_frame"]}
        marked = [r for r in mine if r["status"] == "duplicate"] + \
                 [by_id[c] for c in theirs if by_id[c]["status"] == "duplicate"]
        assert marked, "near-duplicate shot not detected"
        for r in marked:
            assert r["dup_of"] in theirs | {x["clip_id"] for x in mine}
    kept = table.filter(pc.equal(table["status"], "kept"))
    assert kept.num_rows >= table.num_rows // 3


def test_rerun_is_a_noop(curated, footage, monkeypatch):
    """Unchanged sources are skipped on the driver by (size, mtime) without starting Ray work; a
    touched one goes to a worker, is re-hashed, and is still skipped (same content, same path)."""
    import ray.data
    root, res, table, gt = curated
    src, _, _ = footage
    assert table["source_size"].null_count == 0 and table["source_mtime_ns"].null_count == 0
    real_from_items = ray.data.from_items

    def no_ray(*a, **k):
        raise AssertionError("a re-run over unchanged sources started Ray work")
    monkeypatch.setattr(ray.data, "from_items", no_ray)
    again = curate([str(src)], str(root), DatasetSpec())
    assert again.version is None and again.skipped == len(gt["videos"])
    first = src / gt["videos"][0]["file"]
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    sent = []
    monkeypatch.setattr(ray.data, "from_items", lambda items, **k: sent.append(len(items)) or real_from_items(items, **k))
    try:
        again = curate([str(src)], str(root), DatasetSpec())
    finally:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sent == [1] and again.version is None and again.skipped == len(gt["videos"])
    assert store.latest_version(root) == 0


def test_refilter_uses_cached_scores_without_decoding(curated, tmp_path):
    root, res, table, gt = curated
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "media")  # nothing left to decode: refilter must not need it
    strict = DatasetSpec.model_validate({"filters": {"min_motion": 10.0}})
    v, counts = refilter(str(copy), strict)
    assert v == 1 and counts["kept"] == 0 and counts["filtered"] >= table.num_rows - counts["duplicate"]
    after = store.read_clips(copy)
    assert "min_motion" in after.filter(pc.equal(after["status"], "filtered"))["reason"][0].as_py()
    assert store.read_clips(copy, 0).num_rows == table.num_rows  # time travel: the old version is intact
    assert store.history(copy)[-1]["operation"] == "refilter"
    v2, counts2 = refilter(str(copy), DatasetSpec())
    assert counts2 == store.status_counts(table)
    assert store.diff(copy, 0, v2)["status_changed"] == {}


def test_reference_mode_writes_no_media(ray_session, footage, tmp_path):
    src, gt, _ = footage
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(src / gt["videos"][0]["file"], one)
    spec = DatasetSpec.model_validate({"clips": {"mode": "reference"}})
    curate([str(one)], str(tmp_path / "ds"), spec)
    t = store.read_clips(tmp_path / "ds")
    assert not (tmp_path / "ds" / "media").exists()
    assert all("#frames=" in u for u in t["clip_uri"].to_pylist())


def _clip_ids(root):
    t = store.read_clips(root)
    ids = [c for c in t["clip_id"].to_pylist() if c]
    return ids


@pytest.mark.slow  # ~90 s on 2 cores; the default suite kills and resumes in test_reliability.py
def test_sigkill_midrun_then_resume_gives_identical_clip_set(curated, footage, tmp_path):
    root, res, table, gt = curated
    src, _, captions = footage
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "spacetime.cli", "curate", str(src), "--dataset", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # Kill once the first source is staged (mid-run), or after a deadline.
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((killed / "_staging").glob("*.parquet")) if (killed / "_staging").exists() else False:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.table_exists(killed) or store.latest_version(killed) is not None
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = _clip_ids(killed)
    assert len(ids) == len(set(ids))
    assert set(ids) == set(table["clip_id"].to_pylist())
    assert not (killed / "_staging").exists()
    referenced = set(store.read_clips(killed)["clip_uri"].to_pylist())
    on_disk = {str(p) for p in (killed / "media").rglob("*") if p.is_file()}
    assert on_disk == referenced  # no orphans, no partial files


def test_a_version_rebuilds_from_its_recorded_spec_and_sources(curated, tmp_path):
    from pipeline.graph import rebuild

    root, res, table, gt = curated
    r = rebuild(str(root), 0, str(tmp_path / "rebuilt"))
    assert r["same"] and r["clips"] == table.num_rows, (r["missing"][:3], r["extra"][:3])


def test_cli_start_and_curate_driver_do_not_import_the_model_stack():
    # torch + open_clip cost ~5 s to import and Ray's job SDK ~0.9 s: the embed actors and the model
    # commands import them where they run, so `spacetime --help` (3.0 s -> 0.4 s) and every curate
    # driver (a cold resume ~7 s shorter) start without them.
    code = ("import sys, spacetime.cli, pipeline.graph; "
            "print([m for m in ('torch', 'open_clip', 'transformers', 'ray.job_submission') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_analysed_sources_are_not_decoded_again(curated, footage, tmp_path, monkeypatch):
    """A run killed while its embed stage lags the analysis resumes from the analysed rows kept under
    <root>/_analysed (clip files already on disk): no second decode. Another spec, or a clip file
    gone meanwhile, analyses again; a commit clears them (the module's run left none)."""
    from pipeline import graph

    root, *_ = curated
    src, gt, _ = footage
    assert not store.analysed_dir(root).exists()
    video = str(src / gt["videos"][0]["file"])
    spec = DatasetSpec().model_dump(mode="json")

    def analyse(s=spec):
        return graph.AnalyzeSource(str(tmp_path), s, [(video, None)], graph.Done())({"i": 0})

    first = analyse()
    assert len(first) >= 2 and all(r["clip_id"] and r["frames"] for r in first)
    assert len(list(store.analysed_dir(tmp_path).glob("*.parquet"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(graph, "decode_for_analysis", no_decode)
    again = analyse()
    assert [(r["clip_id"], r["clip_uri"], r["frames"], r["layout"]) for r in again] == \
           [(r["clip_id"], r["clip_uri"], r["frames"], r["layout"]) for r in first]
    assert [r["motion"] for r in again] == pytest.approx([r["motion"] for r in first], nan_ok=True)

    other = {**spec, "shots": {**spec["shots"], "min_shot_frames": 6}}
    assert "decoded again" in analyse(other)[0]["reason"]  # another spec: analysed again (and refused here)
    os.remove(first[0]["clip_uri"])
    assert "decoded again" in analyse()[0]["reason"]  # a clip file gone: analysed again
    store.clear_staging(tmp_path)
    assert not store.analysed_dir(tmp_path).exists()


def test_captions_go_to_the_source_they_name(tmp_path):
    """Two cameras' files share a name: a caption for /d/cam1/0001.mp4 is not cam2's. A relative
    source names every file whose path ends with it, the longest match first."""
    import pyarrow as pa

    from pipeline.graph import import_captions

    d = tmp_path.resolve()
    t = store.conform(pa.Table.from_pylist([{"clip_id": f"c{i}", "source_uri": str(d / cam / "0001.mp4"),
                                             "start_frame": 0, "end_frame": 50}
                                            for i, cam in enumerate(["cam1", "cam2", "cam3"])]))
    caps = [{"source": str(d / "cam1" / "0001.mp4"), "caption_short": "one"},
            {"source": "cam3/0001.mp4", "caption_short": "three"}]

    def imported(caps):
        (tmp_path / "caps.json").write_text(json.dumps([{**c, "start_frame": 0, "end_frame": 50} for c in caps]))
        return import_captions(t, str(tmp_path / "caps.json"))["caption_teacher_short"].to_pylist()
    assert imported(caps) == ["one", None, "three"]
    assert imported(caps + [{"source": "0001.mp4", "caption_short": "any"}]) == ["one", "any", "three"]
    # a symlink farm (git-annex, DVC): the listed link's own path names it, not only its blob's
    (d / "blobs").mkdir()
    (d / "blobs" / "abc123.mp4").write_bytes(b"")
    (d / "cam9").mkdir()
    (d / "cam9" / "0009.mp4").symlink_to(d / "blobs" / "abc123.mp4")
    t = store.conform(pa.Table.from_pylist([{"clip_id": "c9", "source_uri": str(d / "cam9" / "0009.mp4"),
                                             "start_frame": 0, "end_frame": 50}]))
    assert imported([{"source": "cam9/0009.mp4", "caption_short": "linked"}]) == ["linked"]
    assert imported([{"source": str(d / "blobs" / "abc123.mp4"), "caption_short": "blob"}]) == ["blob"]


def _committed_source(tmp_path):
    """A dataset root whose table holds clip c0 of v.mp4 with the size and mtime it has: a curate of
    v.mp4 skips it on the driver, without opening it or starting Ray."""
    import pyarrow as pa

    v = tmp_path / "v.mp4"
    v.write_bytes(b"never opened")
    st = v.stat()
    row = {"clip_id": "c0", "source_uri": str(v), "source_sha256": "s", "start_frame": 0, "end_frame": 24,
           "start_s": 0.0, "end_s": 1.0, "fps": 24.0, "status": "kept", "thumbnail": b"jpeg",
           "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
    store.commit(tmp_path / "ds", pa.Table.from_pylist([row]), "append", {"operation": "curate"})
    return tmp_path / "ds", row


def test_a_rerun_with_nothing_to_do_reads_only_what_it_needs(tmp_path, monkeypatch):
    """Deciding what is done needs ids, paths, hashes and fingerprints, not thumbnails or embeddings."""
    root, row = _committed_source(tmp_path)
    read = []
    real = store.arrow_table
    monkeypatch.setattr(store, "arrow_table", lambda dt, columns=None: read.append(columns) or real(dt, columns))
    res = curate([row["source_uri"]], str(root), DatasetSpec())
    assert res.version is None and res.skipped == 1
    assert read and all(c is not None and not {"thumbnail", "embedding"} & set(c) for c in read), read


def test_a_dataset_root_inside_the_sources_is_not_curated_again(tmp_path, monkeypatch):
    """`spacetime curate footage --dataset footage/ds`: the rerun walked into footage/ds/media and
    curated the dataset's own clips as new sources (6 new rows from one video's 4 clips). A directory
    or glob source now skips the root it curates into; the rerun does nothing."""
    import ray.data
    from typer.testing import CliRunner

    from spacetime.cli import app

    root, row = _committed_source(tmp_path)
    clip = root / "media" / "c0" / "c0.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"a clip of v.mp4")
    monkeypatch.setattr(ray.data, "from_items", _no_work)
    for source in (str(tmp_path), str(tmp_path / "**" / "*.mp4")):
        r = CliRunner().invoke(app, ["curate", source, "--dataset", str(root)])
        assert r.exit_code == 0 and "nothing new: all 1 source(s)" in r.output, r.output
    assert store.latest_version(root) == 0


def test_curate_at_an_address_where_no_ray_listens_fails_at_once(tmp_path):
    """`curate --address 127.0.0.1:1` (a typo, a cluster not up yet) sat for minutes in ray.init's
    retries before its error. Nothing listening there is one line, exit 2, before any work."""
    import socket
    import time

    from typer.testing import CliRunner

    from spacetime.cli import app

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "v.mp4").write_bytes(b"not read")
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        t0 = time.monotonic()
        r = CliRunner().invoke(app, ["curate", str(tmp_path / "v.mp4"), "--dataset", str(tmp_path / "ds"),
                                     "--address", address])
        assert r.exit_code == 2 and f"no Ray cluster answers at --address {address}" in r.output, r.output
        assert time.monotonic() - t0 < 10 and not (tmp_path / "ds").exists()


def test_rebuild_checks_the_version_and_the_out_root_before_any_work(tmp_path, monkeypatch):
    """`datasets rebuild --version 5` of a table at version 0 curated every source into --out, then
    failed; `--out` the table's own root "rebuilt" nothing and compared the table with itself."""
    import pyarrow as pa
    from typer.testing import CliRunner

    import pipeline.graph as graph
    from spacetime.cli import app

    root = tmp_path / "ds"
    store.commit(root, pa.Table.from_pylist([{"clip_id": "c0", "source_uri": "/v.mp4", "status": "kept"}]), "append",
                 {"operation": "curate", "spec": DatasetSpec().model_dump(mode="json"), "source_args": ["/v.mp4"]})
    monkeypatch.setattr(graph, "curate", _no_work)
    (tmp_path / "a-file").write_text("x")  # --out a file: a FileExistsError traceback
    store.commit(root, pa.Table.from_pylist([{"clip_id": "c1", "source_uri": "/w.mp4", "status": "kept"}]), "append",
                 {"operation": "curate", "spec": {"filters": {"max_blurr": 1}}, "source_args": ["/w.mp4"]})
    r = CliRunner().invoke(app, ["datasets", "rebuild", str(root), "--version", "1", "--out", str(tmp_path / "new")])
    assert r.exit_code == 2 and "version 1's recorded spec: invalid spec: filters.max_blurr" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1  # one line, and version 0 was not re-curated before it
    store.tag(root, "v1.0", 0)  # a tag works where a number does (as in show, diff, checkout, report)
    for version, out, says in ((5, tmp_path / "new", "version 5 not found"), (0, root, "rebuild into a fresh root"),
                               (0, tmp_path / "a-file", "is not a directory"), ("v1.0", root, "into a fresh root"),
                               ("v2.0", tmp_path / "new", "unknown tag 'v2.0'")):
        r = CliRunner().invoke(app, ["datasets", "rebuild", str(root), "--version", str(version), "--out", str(out)])
        assert r.exit_code == 2 and says in r.output and r.exception.__class__ is SystemExit, r.output
    assert not (tmp_path / "new").exists()


def test_a_rebuild_does_not_curate_the_rebuilt_roots_own_clips(tmp_path, monkeypatch):
    """`curate footage --dataset footage/ds` skips footage/ds; its rebuild into another root walked
    footage/ds/media and curated the dataset's own clips as new sources ("N extra", exit 1)."""
    import pyarrow as pa

    import pipeline.graph as graph

    footage = tmp_path / "footage"
    footage.mkdir()
    (footage / "v.mp4").write_bytes(b"x")
    root = footage / "ds"
    (root / "media" / "c0").mkdir(parents=True)
    (root / "media" / "c0" / "c0.mp4").write_bytes(b"a clip of v.mp4")
    store.commit(root, pa.Table.from_pylist([{"clip_id": "c0", "source_uri": str(footage / "v.mp4"), "status": "kept"}]),
                 "append", {"operation": "curate", "spec": DatasetSpec().model_dump(mode="json"),
                            "source_args": [str(footage)]})
    seen = []

    def sources_then_stop(*a, **k):
        seen.extend(s.uri for s in graph_expand(*a, **k))
        raise KeyboardInterrupt  # (not an Exception: nothing on the way may swallow it)

    graph_expand = graph.expand_sources
    monkeypatch.setattr(graph, "expand_sources", sources_then_stop)
    with pytest.raises(KeyboardInterrupt):
        graph.rebuild(str(root), 0, str(tmp_path / "rebuilt"))
    assert seen == [str(footage / "v.mp4")]


def test_a_restored_version_rebuilds_from_the_curates_it_holds(tmp_path, monkeypatch):
    """Version 2 restores version 0, dropping version 1's clips: its rebuild re-curated version 1's
    sources too and reported their clips as "extra" (exit 1) for a version that rebuilds exactly."""
    import pyarrow as pa

    import pipeline.graph as graph

    root = tmp_path / "ds"
    spec = DatasetSpec().model_dump(mode="json")
    for cid in ("a", "b"):
        store.commit(root, pa.Table.from_pylist([{"clip_id": cid, "source_uri": f"/{cid}.mp4", "status": "kept"}]),
                     "append", {"operation": "curate", "spec": spec, "source_args": [f"/{cid}.mp4"]})
    store.restore(root, 0)
    curated = []

    def fake_curate(args, out, *a, **k):  # each source gives the clip named after it
        curated.extend(args)
        store.commit(out, pa.Table.from_pylist([{"clip_id": p.strip("/.mp4"), "source_uri": p, "status": "kept"}
                                                for p in args]), "append", {"operation": "curate"})

    monkeypatch.setattr(graph, "curate", fake_curate)
    r = graph.rebuild(str(root), 2, str(tmp_path / "rebuilt"))
    assert r["same"] and curated == ["/a.mp4"], (r, curated)
    assert graph.rebuild(str(root), 1, str(tmp_path / "rebuilt1"))["same"] and curated[1:] == ["/a.mp4", "/b.mp4"]


def test_a_resume_after_its_commit_says_nothing_was_written(tmp_path):
    """Killed between its commit and clearing its staging: the rerun finds every staged row in the
    table, makes no version and says so (it printed "committed version 0 ...: 1 new rows")."""
    import pyarrow as pa
    from typer.testing import CliRunner

    from spacetime.cli import app

    root, row = _committed_source(tmp_path)
    store.stage(root, "s", pa.Table.from_pylist([row]))
    r = CliRunner().invoke(app, ["curate", row["source_uri"], "--dataset", str(root)])
    assert r.exit_code == 0 and "nothing new" in r.output and "committed version" not in r.output, r.output
    assert store.latest_version(root) == 0 and not store.staging_dir(root).exists()


def test_a_commit_records_absolute_sources_and_captions(tmp_path, monkeypatch):
    """`datasets rebuild` may run from another directory: relative arguments are recorded absolute."""
    import pyarrow as pa

    root, row = _committed_source(tmp_path)
    store.stage(root, "s", pa.Table.from_pylist([{**row, "clip_id": "c1", "start_frame": 24, "end_frame": 48}]))
    (tmp_path / "caps.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    res = curate(["v.mp4", "*.mp4"], "ds", DatasetSpec(), captions="caps.json")
    assert res.version == 1 and res.new_rows == 1
    h = store.history(root)[-1]
    assert h["source_args"] == [os.path.join(os.getcwd(), "v.mp4"), os.path.join(os.getcwd(), "*.mp4")]
    assert h["captions_imported"] == os.path.join(os.getcwd(), "caps.json")


def test_a_timed_out_source_is_retried_only_when_asked_and_its_new_rows_replace_it(ray_session, footage, tmp_path):
    """A probe that times out (a real one: a limit no probe meets) leaves a rejected row carrying the
    file's sha256. A plain rerun skips it; --retry-rejected curates it again, and that commit adds its
    clips and drops the old rejection (the version before still has it). A permanent rejection stays."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    src, gt, _ = footage
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    video = shutil.copy(src / gt["videos"][0]["file"], tmp_path / "a")
    (tmp_path / "b" / "junk.mp4").write_bytes(b"not a video at all " * 64)
    root = tmp_path / "ds"
    hurried = DatasetSpec.model_validate({"analysis": {"timeout_s": 1e-6}})
    curate([str(tmp_path / "a")], str(root), hurried)
    (row,) = store.read_clips(root).to_pylist()
    assert row["reason"].startswith("probe timed out") and row["source_sha256"]

    again = curate([str(tmp_path / "a"), str(tmp_path / "b")], str(root), DatasetSpec())
    assert again.skipped == 1 and again.version == 1
    t = store.read_clips(root)
    (junk,) = [r for r in t.to_pylist() if r["source_uri"].endswith("junk.mp4")]
    assert junk["status"] == "rejected" and not store.transient(junk["status"], junk["reason"])
    assert [r["reason"] for r in t.to_pylist() if r["source_uri"] == video] == [row["reason"]]

    r = CliRunner().invoke(app, ["curate", str(tmp_path / "a"), str(tmp_path / "b"), "--dataset", str(root),
                                 "--retry-rejected"])
    assert r.exit_code == 0, r.output
    t = store.read_clips(root)
    mine = [r for r in t.to_pylist() if r["source_uri"] == video]
    assert mine and all(r["clip_id"] and r["status"] != "rejected" for r in mine)
    assert [r["reason"] for r in t.to_pylist() if r["source_uri"].endswith("junk.mp4")] == [junk["reason"]]
    h = store.history(root)[-1]
    assert h["version"] == 2 and h["superseded_sources"] == 1 and h["rows_added"] == len(mine)
    assert sum(h["counts"].values()) == t.num_rows
    assert row["reason"] in store.read_clips(root, 1)["reason"].to_pylist()  # history keeps it
    done = curate([str(tmp_path / "a"), str(tmp_path / "b")], str(root), DatasetSpec(), retry_rejected=True)
    assert done.version is None and done.skipped == 2  # nothing transient left: nothing retried


LOSE_LAST_OUTPUT = """#!/bin/bash
# the real ffmpeg, then the last of several outputs is lost: one clip's transcode fails, the rest land
"$REAL_FFMPEG" "$@"; rc=$?
outs=(); for a in "$@"; do [[ "$a" == *.partial.* ]] && outs+=("$a"); done
(( ${#outs[@]} > 1 )) && rm -f "${outs[-1]}"
exit $rc
"""


def test_retry_rejected_redoes_the_failed_clips_of_an_otherwise_good_source(ray_session, footage, tmp_path,
                                                                            monkeypatch):
    """One clip whose transcode failed is a rejected row with its clip_id beside the source's good
    clips. That source counted as done, so `--retry-rejected` never cut the clip again. Now it does:
    one commit adds the clip and removes its failure; the committed clips are not written again."""
    import imageio_ffmpeg

    from benchmarks.reliability import start_curate

    src, gt, _ = footage
    (tmp_path / "a").mkdir()
    video = shutil.copy(src / gt["videos"][0]["file"], tmp_path / "a")
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(LOSE_LAST_OUTPUT)
    wrapper.chmod(0o755)
    root, log = tmp_path / "ds", tmp_path / "run.log"
    monkeypatch.setenv("REAL_FFMPEG", imageio_ffmpeg.get_ffmpeg_exe())
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(wrapper))  # its own Ray: the workers inherit it
    assert start_curate([video], root, log).wait(timeout=600) == 3, log.read_text()[-3000:]
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE")
    before = store.read_clips(root).to_pylist()
    (failed,) = [r for r in before if r["status"] == "rejected"]
    assert failed["clip_id"] and failed["reason"] == "transcode failed: ffmpeg wrote no output"
    assert len(before) > 1 and not failed["clip_uri"]

    assert curate([video], str(root), DatasetSpec()).version is None  # a plain rerun leaves it
    res = curate([video], str(root), DatasetSpec(), retry_rejected=True)
    assert res.version == 1 and res.new_rows == 1 and not res.rejected
    after = {r["clip_id"]: r for r in store.read_clips(root).to_pylist()}
    assert len(after) == len(before) and set(after) == {r["clip_id"] for r in before}
    redone = after[failed["clip_id"]]
    assert redone["status"] != "rejected" and Path(redone["clip_uri"]).is_file()
    h = store.history(root)[-1]
    assert h["rows_added"] == 1 and h["superseded_sources"] == 1 and h["counts"]["rejected"] == 0
    assert curate([video], str(root), DatasetSpec(), retry_rejected=True).version is None


def _source_rows(uri, status, reason=None, ids=(None,), sha="s"):
    import pyarrow as pa

    return pa.Table.from_pylist([{"clip_id": c, "source_uri": uri, "source_sha256": sha, "status": status,
                                  "reason": reason} for c in ids])


def test_a_newer_result_for_a_path_supersedes_its_transient_rejections(tmp_path):
    """Sha-less "analysis failed" rows are retried by any rerun, and transcode failures carry the
    clip ids a retry cuts again: either way the commit that adds the path's new rows removes the old
    failures, in one commit. The same failure again writes nothing; permanent rejections stay."""
    import pyarrow as pa

    root = tmp_path / "ds"
    failed = _source_rows("/a.mp4", "rejected", "analysis failed: TimeoutError: slow", sha=None)
    store.commit(root, failed, "append", {})
    store.commit(root, _source_rows("/b.mp4", "rejected", "transcode failed: ffmpeg timed out after 1s", ["b0", "b1"]),
                 "append", {})
    store.commit(root, _source_rows("/c.mp4", "rejected", "not a video"), "append", {})
    assert store.commit(root, failed, "append", {}) == 2  # already committed: no version
    v = store.commit(root, pa.concat_tables([_source_rows("/a.mp4", "kept", ids=["a0"]),
                                             _source_rows("/b.mp4", "kept", ids=["b0", "b1"]),
                                             _source_rows("/c.mp4", "kept", ids=["c0"], sha="other")]), "append", {})
    assert v == 3
    rows = {(r["source_uri"], r["clip_id"], r["status"]) for r in store.read_clips(root).to_pylist()}
    assert rows == {("/a.mp4", "a0", "kept"), ("/b.mp4", "b0", "kept"), ("/b.mp4", "b1", "kept"),
                    ("/c.mp4", None, "rejected"), ("/c.mp4", "c0", "kept")}
    assert store.history(root)[-1]["counts"]["rejected"] == 1
    d = store.diff(root, 2, 3)  # the failures it replaced are in the diff, not only the clips it added
    assert d["rejected_sources_removed"] == ["/a.mp4", "/b.mp4"] and d["rejected_sources_added"] == []


def test_a_source_missing_at_first_is_curated_in_place_of_its_rejection(ray_session, footage, tmp_path):
    """A path that did not exist yet (a mount not up, a copy still running) got a permanent "missing file"
    row; once the file was there a rerun curated it, and the old rejection stayed beside its new clips.
    The clips now replace it, in the commit that adds them."""
    src, gt, _ = footage
    video = tmp_path / "late.mp4"
    root = tmp_path / "ds"
    first = curate([str(video)], str(root), DatasetSpec())
    (row,) = store.read_clips(root).to_pylist()
    assert first.version == 0 and row["reason"] == "missing file" and row["clip_id"] is None
    shutil.copy(src / gt["videos"][0]["file"], video)
    again = curate([str(video)], str(root), DatasetSpec())
    rows = store.read_clips(root).to_pylist()
    assert again.version == 1 and rows and all(r["clip_id"] for r in rows), [r["reason"] for r in rows]
    assert store.history(root)[-1]["superseded_sources"] == 1


def test_a_retry_replaces_exactly_what_it_redid(tmp_path):
    """A retry that fails again on some clips keeps those failures (it replaced only the clips it cut);
    a clip re-cut under another path replaces its failure there too (no clip_id twice); a permanent
    verdict on a timed-out source replaces the timeout."""
    import pyarrow as pa

    root = tmp_path / "ds"
    timeout = "transcode failed: ffmpeg timed out after 1s"
    store.commit(root, _source_rows("/a.mp4", "rejected", timeout, ["a0", "a1"]), "append", {})
    store.commit(root, pa.concat_tables([_source_rows("/a.mp4", "kept", ids=["a0"]),
                                         _source_rows("/a.mp4", "rejected", timeout, ["a1"])],
                                        promote_options="permissive"), "append", {})
    rows = {(r["clip_id"], r["status"]) for r in store.read_clips(root).to_pylist()}
    assert rows == {("a0", "kept"), ("a1", "rejected")}
    store.commit(root, _source_rows("/moved/a.mp4", "kept", ids=["a1"]), "append", {})
    rows = sorted((r["clip_id"], r["source_uri"], r["status"]) for r in store.read_clips(root).to_pylist())
    assert rows == [("a0", "/a.mp4", "kept"), ("a1", "/moved/a.mp4", "kept")]

    store.commit(root, _source_rows("/p.mp4", "rejected", "probe timed out after 60s"), "append", {})
    store.commit(root, _source_rows("/p.mp4", "rejected", "not a video"), "append", {})
    reasons = [r["reason"] for r in store.read_clips(root).to_pylist() if r["source_uri"] == "/p.mp4"]
    assert reasons == ["not a video"]


def test_a_killed_runs_staged_failure_is_dropped_when_its_retry_staged_clips():
    from pipeline.graph import _drop_stale_rejections

    failed = store.conform(_source_rows("/a.mp4", "rejected", "probe timed out after 1 s"))
    clips = store.conform(_source_rows("/a.mp4", "kept", ids=["a0"]))
    other = store.conform(_source_rows("/b.mp4", "rejected", "analysis failed: OSError"))
    assert _drop_stale_rejections([failed, clips, other]) == [clips, other]


def _no_work(*a, **k):
    raise AssertionError("curation work started")


def test_a_bad_captions_file_or_missing_weights_fail_before_any_work(tmp_path, monkeypatch):
    """Captions are applied at the commit and the weights load in a Ray actor: a bad file or a typo'd
    path failed with a traceback after every source was decoded and cut. Now: one line, at once."""
    from typer.testing import CliRunner

    import pipeline.graph as graph
    from spacetime.cli import app

    monkeypatch.setattr(graph, "_curate", _no_work)
    (tmp_path / "v.mp4").write_bytes(b"x")
    run = lambda *args: CliRunner().invoke(app, ["curate", str(tmp_path / "v.mp4"), "--dataset", str(tmp_path / "ds"),
                                                 *args])
    for text in ("", "{not json", '[{"source": "v.mp4"}]', '{"source": "v.mp4"}'):
        (tmp_path / "caps.json").write_text(text)
        r = run("--captions", str(tmp_path / "caps.json"))
        assert r.exit_code == 2 and "captions file" in r.output and r.exception.__class__ is SystemExit, r.output
    for key in ("pretrained", "aesthetic_weights"):
        (tmp_path / "spec.yaml").write_text(f"embedding:\n  {key}: {tmp_path / 'none.safetensors'}\n")
        r = run("--spec", str(tmp_path / "spec.yaml"))
        assert r.exit_code == 2 and f"embedding.{key}: no such file" in r.output, r.output
        assert r.exception.__class__ is SystemExit
    (tmp_path / "file").write_bytes(b"")
    r = CliRunner().invoke(app, ["curate", str(tmp_path / "v.mp4"), "--dataset", str(tmp_path / "file")])
    assert r.exit_code == 2 and "not a directory" in r.output and r.exception.__class__ is SystemExit


def test_filter_with_missing_aesthetic_weights_is_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from spacetime.cli import app

    root, _ = _committed_source(tmp_path)
    (tmp_path / "spec.yaml").write_text(f"embedding:\n  aesthetic_weights: {tmp_path / 'head.safetensors'}\n")
    r = CliRunner().invoke(app, ["filter", "--dataset", str(root), "--spec", str(tmp_path / "spec.yaml")])
    assert r.exit_code == 2 and "no such file" in r.output and r.exception.__class__ is SystemExit, r.output
    assert store.latest_version(root) == 0


@pytest.mark.parametrize("text, says", [("{not json", "cannot read labels file"),
                                         ('{"c0": "good"}', "scores must be finite numbers"),
                                         ('{"c0": NaN}', "scores must be finite numbers")])
def test_train_aesthetic_with_bad_labels_is_one_error_line(tmp_path, text, says):
    """A labels file that is not JSON, or whose scores are not numbers, ended in a traceback."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    root, _ = _committed_source(tmp_path)
    (tmp_path / "labels.json").write_text(text)
    r = CliRunner().invoke(app, ["train-aesthetic", "--dataset", str(root), "--labels", str(tmp_path / "labels.json"),
                                 "--out", str(tmp_path / "head.safetensors")])
    assert r.exit_code == 2 and says in r.output and r.exception.__class__ is SystemExit, r.output


def test_train_aesthetic_out_that_is_a_dir_or_in_a_new_dir(tmp_path):
    """--out naming a directory ended in a SafetensorError traceback after training; a file in a
    directory that does not exist yet did too (other commands create their --out's parents)."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    root, row = _committed_source(tmp_path)
    (tmp_path / "labels.json").write_text('{"c0": 1}')
    args = ["train-aesthetic", "--dataset", str(root), "--labels", str(tmp_path / "labels.json"), "--out"]
    r = CliRunner().invoke(app, [*args, str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output and r.exception.__class__ is SystemExit, r.output
    import pyarrow as pa
    rows = [{**row, "clip_id": f"c{i}", "embedding": [float(i % 2), 1.0, 0.5]} for i in range(4)]
    root2 = tmp_path / "ds2"
    store.commit(root2, pa.Table.from_pylist(rows), "append", {"operation": "curate"})
    (tmp_path / "labels.json").write_text(json.dumps({f"c{i}": i % 2 for i in range(4)}))
    out = tmp_path / "new" / "dir" / "head.safetensors"
    r = CliRunner().invoke(app, ["train-aesthetic", "--dataset", str(root2), "--labels", str(tmp_path / "labels.json"),
                                 "--out", str(out), "--epochs", "2"])
    assert r.exit_code == 0 and out.is_file(), (r.output, r.exception)


def test_rows_record_the_spec_and_code_that_decided_them(tmp_path):
    """DESIGN.md's clips contract has spec_hash and code_version columns: a curate commit and a
    refilter fill them for the rows they decide (they were always null)."""
    import pyarrow as pa

    from pipeline.graph import RunInfo, _finish

    root, row = _committed_source(tmp_path)
    assert store.read_clips(root)["spec_hash"].to_pylist() == [None]
    spec = DatasetSpec()
    staged = {"s": pa.Table.from_pylist([{**row, "clip_id": "c1", "start_frame": 24, "end_frame": 48}])}
    res = _finish(str(root), staged, 0, [row["source_uri"]], 0, None, spec, [row["source_uri"]], RunInfo(0.0, "r"))
    t = store.read_clips(root, res.version)
    new = [r for r in t.to_pylist() if r["clip_id"] == "c1"]
    assert [(r["spec_hash"], r["code_version"]) for r in new] == [(spec.spec_hash(), store.code_version())]
    strict = DatasetSpec.model_validate({"filters": {"max_blur": 0.1}})
    version, _ = refilter(str(root), strict)
    assert set(store.read_clips(root, version)["spec_hash"].to_pylist()) == {strict.spec_hash()}


def test_a_filter_of_a_table_that_lacks_later_contract_columns(tmp_path):
    """A version written before some contract columns existed (or by another tool) has no spec_hash,
    code_version or static column: `filter` crashed with "Invalid column index to set field"."""
    import pyarrow as pa
    from deltalake import write_deltalake

    root = tmp_path / "ds"
    older = pa.schema([f for f in store.CLIPS_SCHEMA if f.name not in ("spec_hash", "code_version", "static")])
    rows = [{"clip_id": f"c{i}", "source_uri": "/a.mp4", "start_frame": 48 * i, "end_frame": 48 * i + 48, "fps": 24.0,
             "status": "kept", "motion": 0.5, "blur": 0.2, "brightness": 0.5} for i in range(2)]
    write_deltalake(store.clips_path(root), pa.Table.from_pylist(rows, schema=older))
    version, counts = refilter(str(root), DatasetSpec.model_validate({"filters": {"min_motion": 0.6}}))
    assert version == 1 and counts["filtered"] == 2
    assert set(store.read_clips(root, 1)["status"].to_pylist()) == {"filtered"}


def test_a_filter_that_changes_no_decision_commits_nothing(tmp_path):
    """`spacetime filter` with the spec that decided the latest version wrote a new version identical to
    it (a curate with nothing new writes none). Now it says so and commits nothing."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    root, _ = _committed_source(tmp_path)
    assert refilter(str(root), DatasetSpec())[0] == 1  # stamps the spec that decided the row: a change
    version, counts = refilter(str(root), DatasetSpec())
    assert version is None and counts == store.status_counts(store.read_clips(root))
    r = CliRunner().invoke(app, ["filter", "--dataset", str(root)])
    assert r.exit_code == 0 and "nothing changed: version 1" in r.output, r.output
    (tmp_path / "spec.yaml").write_text("filters:\n  min_motion: 0.5\n")  # same status, another spec
    r = CliRunner().invoke(app, ["filter", "--dataset", str(root), "--spec", str(tmp_path / "spec.yaml")])
    assert r.exit_code == 0 and "committed version 2" in r.output, r.output
    assert store.latest_version(root) == 2


def test_a_filter_never_drops_rows_a_concurrent_writer_committed(tmp_path, monkeypatch):
    """`filter` read the table, then took the latest version as the parent its overwrite expected: a
    curate committing in between became that parent, and the overwrite (computed without its rows)
    deleted them. Now the table moved under the refilter, which says so and writes nothing."""
    import pyarrow as pa

    root, row = _committed_source(tmp_path)
    real = store.read_clips

    def read_while_another_run_commits(*a, **k):
        t = real(*a, **k)
        if store.latest_version(root) == 0:
            store.commit(root, pa.Table.from_pylist([{**row, "clip_id": "c1", "source_uri": "/w.mp4"}]), "append",
                         {"operation": "curate"})
        return t
    monkeypatch.setattr(store, "read_clips", read_while_another_run_commits)
    with pytest.raises(store.TableMoved):
        refilter(str(root), DatasetSpec())
    assert store.latest_version(root) == 1 and "c1" in real(root)["clip_id"].to_pylist()


def test_a_retry_that_fails_again_is_still_reported_rejected(tmp_path, monkeypatch):
    """`curate --retry-rejected` whose source times out again writes nothing (the table holds that
    failure), but said "nothing new: all already committed" and exited 0. It is reported, exit 3."""
    import pyarrow as pa

    from pipeline.graph import RunInfo, _finish

    failed = {"clip_id": None, "source_uri": "/v.mp4", "source_sha256": "s", "status": "rejected",
              "reason": "probe timed out after 1 s"}
    store.commit(tmp_path, pa.Table.from_pylist([failed]), "append", {"operation": "curate"})
    res = _finish(str(tmp_path), {"k": pa.Table.from_pylist([failed])}, 0, ["/v.mp4"], 0, None, DatasetSpec(),
                  ["/v.mp4"], RunInfo(0.0, "r"))
    assert res.version is None and res.rejected == [("/v.mp4", failed["reason"])]
    assert store.latest_version(tmp_path) == 0

    from typer.testing import CliRunner

    import pipeline.graph as graph
    from spacetime.cli import app

    monkeypatch.setattr(graph, "curate", lambda *a, **k: res)
    (tmp_path / "v.mp4").write_bytes(b"x")
    r = CliRunner().invoke(app, ["curate", str(tmp_path / "v.mp4"), "--dataset", str(tmp_path), "--retry-rejected"])
    assert r.exit_code == 3 and "rejected again" in r.output and "probe timed out" in r.output, r.output


def test_retry_rejected_without_captions_warns_when_earlier_runs_imported_some(tmp_path, monkeypatch):
    """The retried clips' new rows carry teacher captions only when --captions is given again: a retry
    without it silently left them uncaptioned while their siblings had captions. It now says so."""
    import pyarrow as pa
    from typer.testing import CliRunner

    import pipeline.graph as graph
    from spacetime.cli import app

    root = tmp_path / "ds"
    (tmp_path / "v.mp4").write_bytes(b"x")
    store.commit(root, pa.Table.from_pylist([{"clip_id": "c0", "source_uri": "/v.mp4", "status": "kept"}]), "append",
                 {"operation": "curate", "captions_imported": "/data/captions.json"})
    monkeypatch.setattr(graph, "curate", lambda *a, **k: graph.CurateResult(None, {}, 1, 1, 0))
    run = lambda *extra: CliRunner().invoke(app, ["curate", str(tmp_path / "v.mp4"), "--dataset", str(root), *extra])
    r = run("--retry-rejected")
    assert r.exit_code == 0 and "warning" in r.output and "/data/captions.json" in r.output, r.output
    assert "captions" not in run().output and "captions" not in run("--retry-rejected", "--captions",
                                                                     str(tmp_path / "v.mp4")).output
