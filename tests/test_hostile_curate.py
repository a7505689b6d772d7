"""The hostile corpus through the whole curate graph in one run with good files (real Ray, ffmpeg, Delta)."""
import os
from pathlib import Path

import pytest

from pipeline import store
from pipeline.graph import curate, display_uri
from pipeline.spec import DatasetSpec
from tests.hostile import make_hostile_corpus


def test_every_hostile_input_is_curated_or_rejected_with_its_reason(ray_session, tmp_path):
    cases = make_hostile_corpus(tmp_path / "corpus")
    root = tmp_path / "corpus" / "root"
    # A directory argument is walked (not probed), so the "directory named .mp4" case is the probe's test.
    probe_cases = [c for c in cases if c.stage == "probe" and c.path and c.kind != "directory"]
    args = [c.path for c in probe_cases] + [str(root / "manifest.txt"), str(root / "escape_link.mp4")]
    res = curate(args, str(tmp_path / "ds"), DatasetSpec())
    t = store.read_clips(tmp_path / "ds")
    rows: dict[str, list] = {}
    for r in t.to_pylist():
        rows.setdefault(r["source_uri"], []).append(r)
    problems = []
    for c in probe_cases:
        got = rows.get(display_uri(os.path.abspath(c.path)), [])
        if not got:
            problems.append(f"{c.kind}: no row")
        elif c.expect == "rejected":
            ok = len(got) == 1 and got[0]["status"] == "rejected" and got[0]["clip_id"] is None
            if not ok or (c.reason_contains and c.reason_contains not in (got[0]["reason"] or "")):
                problems.append(f"{c.kind}: expected rejected '{c.reason_contains}', got "
                                f"{[(g['status'], g['reason']) for g in got]}")
        elif got[0]["reason"] and got[0]["reason"].startswith("identical content to "):
            # Byte-identical copies under other names: one path keeps the clips, the rest point at it.
            original = got[0]["reason"][len("identical content to "):].rsplit(" (sha256", 1)[0]
            if not all(r["clip_id"] for r in rows.get(original, [{"clip_id": None}])):
                problems.append(f"{c.kind}: duplicate of {original}, which has no clips")
        else:
            if not all(g["clip_id"] and g["status"] != "rejected" for g in got):
                problems.append(f"{c.kind}: expected curated, got {[(g['status'], g['reason']) for g in got]}")
            if c.rotation in (90, 270) and not all(g["width"] < g["height"] for g in got):
                problems.append(f"{c.kind}: rotated video not portrait")
    assert not problems, "\n".join(problems)
    escapes = [r for r in t.to_pylist() if r["reason"] and "escapes its root" in r["reason"]]
    assert len(escapes) >= 2  # the manifest's escaping entries and the escaping symlink
    assert res.rejected and res.counts["rejected"] == len(res.rejected)
    # Nothing valid was lost: every clip row has its transcoded file on disk, ids are unique.
    clips = [r for r in t.to_pylist() if r["clip_id"]]
    assert clips and all(Path(r["clip_uri"]).is_file() for r in clips)
    assert len({r["clip_id"] for r in clips}) == len(clips)
