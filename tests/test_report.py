"""The curation report: a real Delta clips table in tmp_path -> one self-contained, escaped HTML file."""
import re

import cv2
import numpy as np
import pyarrow as pa
import pytest

from pipeline import store
from pipeline.spec import DatasetSpec, FilterSpec
from spacetime.report import (SECTION_IDS, contact_sheet_section, find_chromium, funnel_steps, render_check,
                              write_report)

EVIL = "<script>alert('x') & clip.mp4"  # a legal POSIX file name


def _jpeg(colour: tuple[int, int, int], h: int = 72, w: int = 128) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = colour
    cv2.rectangle(img, (10, 10), (60, 50), (255, 255, 255), -1)  # not one flat colour
    return cv2.imencode(".jpg", img)[1].tobytes()


def _row(cid, src, start, end, status, reason=None, motion=1.0, blur=0.3, brightness=0.5, thumb=True,
         dup_of=None, fps=25.0):
    return {"clip_id": cid, "source_uri": f"/footage/{src}", "source_sha256": src * 2, "start_frame": start,
            "end_frame": end, "start_s": start / fps, "end_s": end / fps, "fps": fps, "status": status,
            "reason": reason, "motion": motion, "blur": blur, "sharpness": 40.0 * (1 - blur),
            "brightness": brightness, "contrast": 0.2, "text_ratio": 0.01, "aesthetic": 5.0, "static": False,
            "dup_of": dup_of, "thumbnail": _jpeg((40 * len(cid) % 255, 90, 160)) if thumb else None}


def _clips_table() -> pa.Table:
    rows = [
        _row("k1", "a.mp4", 0, 50, "kept"),
        _row("k2", "a.mp4", 50, 100, "kept"),
        _row("d1", "a.mp4", 100, 150, "duplicate", "near-duplicate of k1 (cosine >= 0.95)", dup_of="k1"),
        _row("f1", "a.mp4", 150, 200, "filtered", "motion 0.01 < min_motion 0.05", motion=0.01),
        _row("k3", EVIL, 0, 50, "kept", thumb=False),
        _row("f2", EVIL, 50, 100, "filtered", "blur 0.97 > max_blur 0.85 <b>", blur=0.97),
        _row("f3", EVIL, 100, 110, "filtered", "duration 0.40 s < min_seconds 1"),
        _row("k4", "c.mp4", 0, 60, "kept"),
        _row("d2", "c.mp4", 60, 120, "duplicate", "near-duplicate of k1 (cosine >= 0.95)", dup_of="k1"),
        _row("f4", "c.mp4", 120, 180, "filtered", "brightness 0.02 < min_brightness 0.08", brightness=0.02),
    ]
    rejected = [{"clip_id": None, "source_uri": "/footage/broken.mp4", "status": "rejected",
                 "reason": "probe error: InvalidDataError: no video stream"},
                {"clip_id": None, "source_uri": "/footage/<b>gone</b>.mp4", "status": "rejected",
                 "reason": "missing file <img src=x onerror=alert(1)>"}]
    cols = {k: [r.get(k) for r in rows + rejected] for k in rows[0]}
    types = {"thumbnail": pa.binary(), "static": pa.bool_(), "dup_of": pa.string(), "reason": pa.string(),
             "clip_id": pa.string()}
    return pa.table({k: pa.array(v, types.get(k)) for k, v in cols.items()})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    table = _clips_table()
    store.commit(root, table, "append", {"operation": "curate", "spec_hash": "x"})
    return root, table


@pytest.fixture(scope="module")
def report(dataset):
    root, _ = dataset
    path = write_report(root)
    return path, path.read_text(encoding="utf-8")


def test_one_self_contained_file(dataset, report):
    root, _ = dataset
    path, page = report
    assert path == root.resolve() / "report_v0.html"
    assert sorted(p.name for p in root.iterdir()) == ["clips", "report_v0.html"]  # nothing beside it
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page  # no JS at all, no external stylesheet
    for sid in SECTION_IDS:
        assert page.count(f'id="{sid}"') == 1


def test_histograms_cards_and_escaping(report):
    _, page = report
    # one PNG per score column present
    for col in ("motion", "blur", "sharpness", "brightness", "contrast", "text_ratio", "aesthetic"):
        assert f'alt="histogram of {col}"' in page
    assert page.count("data:image/png;base64,") == 7
    # every clip's file name, escaped; the hostile one never appears raw
    for name in ("a.mp4", "c.mp4", "&lt;script&gt;alert(&#x27;x&#x27;) &amp; clip.mp4"):
        assert f'<div class="name" title="/footage/{name}">{name}</div>' in page
    assert "<script>" not in page and "<b>gone" not in page and "0.85 <b>" not in page and "<img src=x" not in page
    assert "max_blur 0.85 &lt;b&gt;" in page
    assert "missing file &lt;img src=x onerror=alert(1)&gt;" in page
    # 9 clip thumbnails in the sheet + k1, d1, d2 again in the duplicate group; k3 has none
    assert page.count("data:image/jpeg;base64,") == 9 + 3
    assert "no thumbnail" in page
    # kept cards come before filtered ones, duplicates after filtered
    sheet = page[page.index('id="contact-sheet"'):page.index('id="duplicates"')]
    assert sheet.index(">kept<") < sheet.index(">filtered<") < sheet.index(">duplicate<")
    # the duplicate group shows k1 then both duplicates with the cosine reason
    dups = page[page.index('id="duplicates"'):page.index('id="rejected"')]
    assert dups.count('class="dupgroup"') == 1 and dups.count("cosine &gt;= 0.95") == 2
    rej = page[page.index('id="rejected"'):]
    assert "/footage/broken.mp4" in rej and "no video stream" in rej
    # lineage and counts in the header
    head = page[:page.index('id="funnel"')]
    assert "curate" in head and "<code>x</code>" in head
    assert re.search(r">kept</span> 4\b", head) and re.search(r">rejected</span> 2\b", head)


def test_funnel_counts(dataset):
    _, table = dataset
    steps = dict(funnel_steps(table, FilterSpec(), 1.0, 8.0))
    assert steps["sources"] == 5 and steps["clips"] == 10
    assert steps["1 s ≤ duration ≤ 8 s"] == 9                      # f3 is 0.4 s
    assert steps["motion ≥ 0.05"] == 8 and steps["blur ≤ 0.85"] == 7 and steps["brightness ≥ 0.08"] == 6
    assert steps["passed filters (recorded)"] == 6 and steps["after dedup = kept"] == 4
    # a disabled threshold is no step; an enabled one that nothing passes empties the funnel
    steps = dict(funnel_steps(table, FilterSpec(min_motion=None, min_aesthetic=9.0), 1.0, 8.0))
    assert "motion ≥ 0.05" not in steps and steps["aesthetic ≥ 9"] == 0


def test_spec_thresholds_version_and_cap(dataset, tmp_path):
    root, table = dataset
    spec = DatasetSpec(filters=FilterSpec(min_motion=0.5, max_text_ratio=0.2))
    page = write_report(root, version=0, out=tmp_path / "r.html", spec=spec).read_text()
    assert "motion ≥ 0.5" in page and "text_ratio ≤ 0.2" in page
    assert "Showing the first 3 of 10 clips" in contact_sheet_section(table, max_cards=3)
    with pytest.raises(ValueError, match="no clips table"):
        write_report(tmp_path / "empty")


def test_renders_in_chromium(report):
    if find_chromium() is None:
        pytest.skip("chromium not installed (apt-get install -y chromium) — render check not run")
    path, _ = report
    assert render_check(path)


def test_versions_tags_and_lineage(tmp_path):
    root = tmp_path / "ds"
    table = _clips_table()
    store.commit(root, table, "append", {"operation": "curate", "spec_hash": "x"})
    store.commit(root, table.slice(0, 4), "overwrite", {"operation": "refilter", "spec_hash": "y"})
    store.tag(root, "gold", 0)
    latest = write_report(root)
    assert latest.name == "report_v1.html"
    page = latest.read_text()
    lineage = page[page.index("<h2>Lineage</h2>"):page.index('id="funnel"')]
    # both versions listed, the current one highlighted with its operation, spec hash and parent
    assert '<tr class="current"><td>1</td><td>refilter</td><td><code>y</code></td>' in lineage
    assert re.search(r'<tr class="current">.*?<td>0</td><td>\d{4}-\d\d-\d\d ', lineage)
    assert ">kept</span> 2" in page and ">rejected</span> 0" in page
    old = write_report(root, version="gold").read_text()  # a tag resolves to its version
    assert "(tags: gold)" in old and "<td>refilter</td>" not in old and ">kept</span> 4" in old
    with pytest.raises(ValueError, match="unknown tag"):
        write_report(root, version="nope")


def test_a_refiltered_version_is_drawn_with_the_thresholds_that_decided_it(tmp_path):
    """`filter --spec` with min_motion 2, then `report` with no --spec: the funnel and histograms drew
    the default min_motion 0.05 (most clips "pass" it, yet none is kept). Now the version's own spec."""
    from pipeline.graph import refilter

    store.commit(tmp_path, _clips_table(), "append", {"operation": "curate", "spec": DatasetSpec().model_dump(mode="json")})
    strict = DatasetSpec.model_validate({"filters": {"min_motion": 2.0}})
    v, _ = refilter(str(tmp_path), strict)
    store.commit(tmp_path, store.read_clips(tmp_path), "overwrite", {"operation": "caption"}, expect_version=v)
    page = write_report(tmp_path).read_text(encoding="utf-8")  # the caption commit changed no status
    assert "motion ≥ 0.05" not in page and "motion ≥ 2<" in page
    assert "motion ≥ 0.05" in write_report(tmp_path, 0, tmp_path / "v0.html").read_text(encoding="utf-8")
    restored = store.restore(tmp_path, 0)
    assert "motion ≥ 0.05" in write_report(tmp_path, restored, tmp_path / "r.html").read_text(encoding="utf-8")


def test_the_retrain_report_funnel_uses_the_thresholds_that_decided_its_version(tmp_path):
    """`retrain --spec` with min_motion 2: the retrain report's funnel counted the default min_motion 0.05."""
    import json

    from spacetime.report import write_retrain_report

    strict = DatasetSpec.model_validate({"filters": {"min_motion": 2.0}, "clips": {"min_seconds": 0.5}})
    v = store.commit(tmp_path / "ds", _clips_table(), "append",
                     {"operation": "curate", "spec": strict.model_dump(mode="json")})
    run = tmp_path / "run"
    run.mkdir()
    lineage = {"dataset": str(tmp_path / "ds"), "dataset_version": v}
    (run / "manifest.json").write_text(json.dumps({"stages": {"_lineage": {"outputs": lineage}}}))
    page = write_retrain_report(run).read_text(encoding="utf-8")
    assert "motion ≥ 2<" in page and "0.5 s ≤ duration" in page
    assert "motion ≥ 0.05" not in page
