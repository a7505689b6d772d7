"""Curation speed, measured side by side in one run on the demo footage. Prints ratios only.

    python benchmarks/curate.py [--videos 8] [--seed 0] [--repeats 3] [--scale 1] [--skip-rss] [--skip-clip]

The demo footage is small (320x180 and its siblings), so an H.264 decode costs ~0.1 ms a frame and
the fixed per-frame analysis work weighs heavily in ratios 1, 2 and 4. `--scale 4` re-encodes the
same footage at 4x the size (1280x720 for 16:9; same ground truth) to measure where production
footage sits. Ratios 1, 2 and 4 print CPU-time ratios beside the wall-time ones: our analysis
decodes on one thread while the calling thread analyses, so it uses up to two cores where
`ffmpeg -threads 1` uses one.

Measured on a 2-core VM (runs of the same code spread ±3%, and about one run in six lands ~10%
high): at demo size ratio 1 1.16-1.20, ratio 2 1.31-1.35, ratio 4 1.38-1.41 (CPU time 2.16-2.29x
single-thread ffmpeg's), ratio 5 7.6-8.7; at --scale 4 ratio 1 0.88 (1.14 against auto-thread
ffmpeg), ratio 4 0.96 (1.23).

1. analysis (probe + one decode + shot detection) ÷ an ffmpeg decode-only pass    (target ≤ 1.3)
2. PySceneDetect `detect()` ÷ our split, and both boundary F1s                    (target ≥ 1.0, F1 ≥ its)
3. clip transcode (one ffmpeg per source, all clips) ÷ plain ffmpeg per clip      (target ≤ 1.1)
   and `clips: reference` (nothing encoded) ÷ plain ffmpeg per clip
4. analysis with every CPU score ÷ the decode-only floor                          (target ≤ 1.5)
5. naive (detect(), then each scorer decoding the file itself at full size) ÷ ours (target ≥ 3)
6. CLIP embedding: time per clip and per frame ÷ our analysis time per clip
7. peak RSS of the analysis over 10× the corpus ÷ over 1×                         (target ≤ 1.2)
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402
import imageio_ffmpeg  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.clips import plan_clips, transcode_clips  # noqa: E402
from pipeline.decode import decode_for_analysis  # noqa: E402
from pipeline.dedup import EdgeLayout  # noqa: E402
from pipeline.probe import probe  # noqa: E402
from pipeline.scores import default_analyzers  # noqa: E402
from pipeline.shots import ShotDetector, boundary_f1, shots_from_boundaries  # noqa: E402
from pipeline.synthetic import generate_footage  # noqa: E402

FF = imageio_ffmpeg.get_ffmpeg_exe()


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return time.perf_counter() - t, out


def cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process, its threads and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def ffmpeg_decode(path, threads):
    subprocess.run([FF, "-v", "error", "-threads", str(threads), "-i", path, "-f", "null", "-"], check=True)


def our_analysis(path, scorers: bool):
    info = probe(path)
    sd = ShotDetector(info.fps)
    extra = [EdgeLayout(), *default_analyzers()] if scorers else []  # what the curate graph runs
    dec = decode_for_analysis(path, [sd, *extra], rotation=info.rotation)
    return sd.boundaries(), dec, info


def scenedetect_detect(path):
    from scenedetect import ContentDetector, detect

    scenes = detect(path, ContentDetector())
    return [s[0].frame_num for s in scenes[1:]]


class _FullSize:
    """Feeds one scorer from its own full-resolution decode: the naive way."""

    def __init__(self, scorer):
        self.scorer = scorer

    def run(self, path):
        with av.open(path) as c:
            for i, f in enumerate(c.decode(video=0)):
                self.scorer.process_frames(i, f.to_ndarray(format="rgb24")[None])


def naive_way(path):
    cuts = scenedetect_detect(path)
    for scorer in default_analyzers():
        _FullSize(scorer).run(path)
    return cuts


def upscale(paths, factor, outdir):
    """Re-encode each video at `factor` x its size (lanczos, same x264 settings as the footage)."""
    outdir.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        dst = outdir / Path(p).name
        subprocess.run([FF, "-v", "error", "-y", "-i", p, "-vf", f"scale=iw*{factor}:ih*{factor}:flags=lanczos",
                        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", str(dst)],
                       check=True)
        out.append(str(dst))
    return out


def plain_ffmpeg_clips(path, ranges, fps, outdir):
    for k, (s, e) in enumerate(ranges):
        subprocess.run([FF, "-v", "error", "-y", "-ss", f"{s / fps:.6f}", "-i", path, "-frames:v", str(e - s),
                        "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
                        "-threads", "1", str(outdir / f"plain_{k}.mp4")], check=True)


def rss_child(paths):
    """Peak RSS (KiB) of a fresh process that analyses `paths` one after another."""
    code = ("import sys, resource; sys.path.insert(0, %r)\n"
            "from benchmarks.curate import our_analysis\n"
            "for p in sys.argv[1:]: our_analysis(p, True)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)") % str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=1, help="re-encode the footage at this multiple of its size")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-clip", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="passes per measurement; the fastest is kept")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    gt = json.loads(Path(generate_footage(tmp / "raw", seed=args.seed, videos=args.videos)).read_text())
    paths = [str(tmp / "raw" / v["file"]) for v in gt["videos"]]
    truth = [v["boundaries"] for v in gt["videos"]]
    frames = sum(v["num_frames"] for v in gt["videos"])
    if args.scale > 1:
        paths = upscale(paths, args.scale, tmp / f"x{args.scale}")
    v0 = gt["videos"][0]
    print(f"corpus: {len(paths)} videos, {frames} frames (demo footage, seed {args.seed}; "
          f"{v0['width'] * args.scale}x{v0['height'] * args.scale} for the first)")

    # Each pass over the corpus runs --repeats times, the passes interleaved, and keeps its fastest
    # time: on a shared machine the minimum is the estimate least disturbed by other load.
    # CPU time (this process's threads + ffmpeg children) is kept beside wall time: our analysis
    # decodes on one thread and analyses on another, so wall time alone hides the work done.
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    results: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, fn, arg in (("ff1", ffmpeg_decode, 1), ("ffa", ffmpeg_decode, 0), ("split", our_analysis, False),
                              ("full", our_analysis, True), ("sd", scenedetect_detect, None)):
            c0 = cpu_s()
            runs = [timed(fn, p, arg) if arg is not None else timed(fn, p) for p in paths]
            t = sum(r[0] for r in runs)
            if t < best.get(name, float("inf")):
                best[name], cpu[name] = t, cpu_s() - c0
            results[name] = runs
    t_ff1, t_ffa, t_split, t_full, t_sd = (best[k] for k in ("ff1", "ffa", "split", "full", "sd"))
    split, full, sd = results["split"], results["full"], results["sd"]

    def f1(preds):
        tp = pr = tr = 0
        for p, t in zip(preds, truth):
            m = boundary_f1(p, t)
            tp, pr, tr = tp + m["tp"], pr + m["predicted"], tr + m["truth"]
        p, r = tp / max(pr, 1), tp / max(tr, 1)
        return 2 * p * r / max(p + r, 1e-9)

    ours_f1, sd_f1 = f1([o[0] for _, o in split]), f1([o for _, o in sd])
    print(f"1. analysis (probe+decode+shots) / ffmpeg decode-only: {t_split / t_ff1:.2f} (single-thread ffmpeg), "
          f"{t_split / t_ffa:.2f} (auto-thread ffmpeg)   target <= 1.3; "
          f"CPU time {cpu['split'] / cpu['ff1']:.2f}, {cpu['split'] / cpu['ffa']:.2f}")
    print(f"2. PySceneDetect detect() / our split: {t_sd / t_split:.2f}   target >= 1.0 (CPU time {cpu['sd'] / cpu['split']:.2f}); "
          f"boundary F1 ours {ours_f1:.3f} vs detect() {sd_f1:.3f}")
    print(f"4. analysis with all CPU scores / ffmpeg decode-only: {t_full / t_ff1:.2f} (single-thread), "
          f"{t_full / t_ffa:.2f} (auto-thread)   target <= 1.5; "
          f"CPU time {cpu['full'] / cpu['ff1']:.2f}, {cpu['full'] / cpu['ffa']:.2f}")

    t_naive = min(sum(timed(naive_way, p)[0] for p in paths) for _ in range(args.repeats))
    print(f"5. naive (detect() + each scorer decoding full-size) / ours: {t_naive / t_full:.2f}   target >= 3")

    # 3. transcode: our one-pass cut vs plain ffmpeg per clip, same settings, same frame ranges.
    t_ours = t_plain = t_ref = 0.0
    nclips = 0
    for p, (_, (bounds, dec, info)) in zip(paths, split):
        plans = plan_clips(shots_from_boundaries(bounds, dec.num_frames), info.fps, 8.0)
        ranges = [(c.start_frame, c.end_frame) for c in plans]
        nclips += len(ranges)
        out = tmp / "clips" / Path(p).stem
        out.mkdir(parents=True, exist_ok=True)
        t_ours += timed(transcode_clips, p, [(s, e, out / f"ours_{k}.mp4") for k, (s, e) in enumerate(ranges)])[0]
        t_plain += timed(plain_ffmpeg_clips, p, ranges, info.fps, out)[0]
        t_ref += timed(lambda: [f"{p}#frames={s}-{e}" for s, e in ranges])[0]
    print(f"3. clip transcode (ours, one ffmpeg per source) / plain ffmpeg per clip: {t_ours / t_plain:.2f}   "
          f"target <= 1.1 ({nclips} clips); clips: reference / plain: {t_ref / t_plain:.4f}")

    if not args.skip_clip:
        from pipeline.embed import ClipEmbedder
        import pyarrow as pa

        emb = ClipEmbedder()
        rows = []
        for _, (bounds, dec, info) in split:
            from pipeline.decode import pick_frames

            for s, e in shots_from_boundaries(bounds, dec.num_frames):
                rows.append(pick_frames(dec.thumbs, s, e, 3))
        batch = pa.table({"frames": pa.array(rows, pa.list_(pa.binary()))})
        emb(batch.slice(0, 2))  # warm-up
        t_emb, _ = timed(emb, batch)
        nframes = sum(len(r) for r in rows)
        per_clip_analysis = t_full / max(len(rows), 1)
        print(f"6. CLIP ViT-B-32 embedding on CPU: {t_emb / len(rows) / per_clip_analysis:.2f}x our CPU analysis "
              f"time per clip; per frame {t_emb / nframes / (t_full / frames):.1f}x our analysis time per frame")

    if not args.skip_rss:
        one = rss_child(paths)
        ten = rss_child(paths * 10)
        print(f"7. peak RSS, analysis of 10x corpus / 1x: {ten / one:.3f}   target <= 1.2")


if __name__ == "__main__":
    main()
