"""Captioner quality bar on the demo footage (<= 15 min CPU).

    spacetime footage -> spacetime curate (teacher captions from the ground truth) -> train the
    captioner on the kept clips -> caption the held-out SOURCES -> score against the ground truth

Prints, side by side on the same held-out clips: attribute accuracy (subject / colour / camera
motion) of our captions and of the teacher captions (ratio ours / teacher), and CIDEr / BLEU-4 /
ROUGE-L of ours vs a nearest-caption retrieval baseline (the teacher caption of the training clip
whose CLIP embedding, from the table, is nearest). Bar: attribute accuracy >= 0.90 and CIDEr above
the retrieval baseline.

    python benchmarks/captioner.py [--videos 16] [--steps 1500] [--out bench_out/captioner]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from captioner import decode
from captioner.data import read_clips, training_rows
from captioner.metrics import attribute_accuracy, caption_scores, format_table
from captioner.model import load_captioner
from captioner.train import TrainConfig, prepare, train_captioner


def shot_truths(gt_path) -> dict:
    """(absolute source path, frame) -> ground-truth attributes of the shot holding that frame."""
    gt = json.loads(Path(gt_path).read_text())
    out = {}
    for v in gt["videos"]:
        src = str((Path(gt_path).parent / v["file"]).resolve())
        for s in v["shots"]:
            motion = s["camera_motion"] + (f" {s['direction']}" if s.get("direction") else "")
            out[(src, s["start_frame"], s["end_frame"])] = {
                "subject": s["scene"], "colour": (s["colors"] or [None])[0], "camera": motion}
    return out


def truth_for(truths: dict, source: str, start: int, end: int):
    mid = (start + end) // 2
    for (src, a, z), t in truths.items():
        if src == str(Path(source).resolve()) and a <= mid < z:
            return t
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="bench_out/captioner")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    root, foot = out / "dataset", out / "footage"
    exe = str(Path(sys.executable).parent / "spacetime")
    t0 = time.time()
    if not (foot / "ground_truth.json").is_file():
        subprocess.run([exe, "footage", "--out", str(foot), "--videos", str(args.videos)], check=True)
    if not (root / "clips").is_dir():
        rc = subprocess.run([exe, "curate", str(foot), "--dataset", str(root),
                             "--captions", str(foot / "captions.json")]).returncode
        if rc not in (0, 3):  # 3 = some sources rejected, still a table
            raise SystemExit(f"spacetime curate failed with exit status {rc}")
    t_data = time.time() - t0

    cfg = TrainConfig(preset="small", steps=args.steps, batch_size=16, lr=5e-4, warmup_steps=100,
                      val_fraction=0.25, eval_every=250, ckpt_every=250, log_every=50, seed=0)
    t1 = time.time()
    ckpt = train_captioner(root, None, out / "run", cfg)
    t_train = time.time() - t1

    tok, _, train, val, info = prepare(root, None, out / "run", cfg)
    table, _ = read_clips(root)
    rows = {r["clip_id"]: r for r in training_rows(table).to_pylist()}
    model, tok = load_captioner(ckpt)
    t2 = time.time()
    ours = dict(zip(val.clip_ids, decode.describe(model, tok, val.frames, "dense", "beam", num_beams=3)))
    t_caption = time.time() - t2

    # retrieval baseline: the teacher dense caption of the nearest training clip (table CLIP embedding)
    def emb(cid):
        e = rows[cid].get("embedding")
        return np.asarray(e, np.float32) if e is not None else None
    train_ids = [c for c in train.clip_ids if emb(c) is not None]
    retrieved = {}
    if train_ids:
        bank = np.stack([emb(c) for c in train_ids])
        bank /= np.linalg.norm(bank, axis=1, keepdims=True) + 1e-8
        for cid in val.clip_ids:
            e = emb(cid)
            if e is not None:
                nearest = train_ids[int(np.argmax(bank @ (e / (np.linalg.norm(e) + 1e-8))))]
                retrieved[cid] = rows[nearest]["caption_teacher_dense"]

    refs = {c: [rows[c]["caption_teacher_dense"]] for c in val.clip_ids if rows[c]["caption_teacher_dense"]}
    truths = shot_truths(foot / "ground_truth.json")
    attr = {c: truth_for(truths, rows[c]["source_uri"], rows[c]["start_frame"], rows[c]["end_frame"])
            for c in val.clip_ids}
    ids = [c for c in val.clip_ids if attr[c] is not None and c in refs]
    vocab = {k: sorted({t[k] for t in truths.values() if t[k]}) for k in ("subject", "colour", "camera")}
    results = []
    for name, hyps in (("ours", ours), ("retrieval", retrieved),
                       ("teacher", {c: refs[c][0] for c in ids})):
        if not hyps:
            continue
        r = {"system": name, **caption_scores({c: refs[c] for c in ids}, {c: hyps[c] for c in ids if c in hyps})}
        r.update({f"attr_{k}": v for k, v in attribute_accuracy(
            [hyps[c] for c in ids if c in hyps], [attr[c] for c in ids if c in hyps], vocab).items()})
        results.append(r)
    print(format_table(results))
    by = {r["system"]: r for r in results}
    summary = {"held_out_clips": len(ids), "val_sources": len(info["val_sources"]),
               "attr_all_ours": by["ours"]["attr_all"],
               "attr_ratio_ours_vs_teacher": by["ours"]["attr_all"] / max(by["teacher"]["attr_all"], 1e-8),
               "cider_ratio_ours_vs_retrieval": (by["ours"]["CIDEr"] / max(by["retrieval"]["CIDEr"], 1e-8)
                                                 if "retrieval" in by else None),
               "time_share": {"data": t_data, "train": t_train, "caption": t_caption},
               "pass_attr_0.9": by["ours"]["attr_all"] >= 0.9,
               "pass_cider_over_retrieval": "retrieval" in by and by["ours"]["CIDEr"] > by["retrieval"]["CIDEr"]}
    total = sum(summary["time_share"].values())
    summary["time_share"] = {k: round(v / total, 3) for k, v in summary["time_share"].items()}
    print(json.dumps(summary, indent=2))
    (out / "captioner_bench.json").write_text(json.dumps({"results": results, **summary}, indent=2))


if __name__ == "__main__":
    main()
