"""Shot boundaries from the shared decode, with PySceneDetect's own detectors.

`ShotDetector` is a frame consumer: each analysis-size frame goes to PySceneDetect's
AdaptiveDetector (hard cuts, judged against a rolling window so fast camera moves don't fire) and
ThresholdDetector (fades through black, cut placed mid-black), plus our `DissolveDetector` for
cross-fades, which PySceneDetect does not ship. One transition often fires more than one detector
(a fade's edges look like cuts too), so cuts are fused by priority: a fade claims the cuts near it,
then a dissolve claims the cuts near it, then the remaining hard cuts. Shot length is not limited
here — a short shot is still a shot; minimum clip length is a filter.
"""
from collections import deque

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, FrameTimecode, HistogramDetector, ThresholdDetector

from pipeline.decode import halve


class DissolveDetector:
    """Cross-fades: over a window of `window` frames, the middle frame is the average of the ends.

    A dissolve mixes two shots linearly, so frame m ≈ (f[m-k] + f[m+k]) / 2 while the ends differ a
    lot. A hard cut puts the middle frame on one side (error ≈ half the end difference), and camera
    motion over detail makes the average a ghosted blur far from the sharp middle frame. Motion over
    smooth or blurred content can look linear too, so the ends must also differ in colour
    distribution (a camera move stays on one picture; a dissolve changes the picture). Works on tiny
    frames (~48 px wide), so it costs microseconds per frame.
    """

    def __init__(self, window: int = 10, min_diff: float = 15.0, max_ratio: float = 0.8,
                 min_hist: float = 0.3, size: int | None = 48):
        self.k = window // 2
        self.min_diff, self.max_ratio, self.min_hist, self.size = min_diff, max_ratio, min_hist, size
        self.buf: deque = deque(maxlen=2 * self.k + 1)
        self.hits: list[tuple[int, float]] = []

    def process_frame(self, index: int, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        small = frame if self.size is None or w == self.size else cv2.resize(frame, (self.size, max(1, self.size * h // w)),
                                                         interpolation=cv2.INTER_AREA)
        hist = cv2.calcHist([cv2.cvtColor(small, cv2.COLOR_RGB2HSV)], [0, 1, 2], None, [8, 4, 4],
                            [0, 180, 0, 256, 0, 256]).ravel()
        self.buf.append((cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32), hist / max(hist.sum(), 1)))
        if len(self.buf) < self.buf.maxlen:
            return
        (a, ha), (m, _), (b, hb) = self.buf[0], self.buf[self.k], self.buf[-1]
        if float(np.abs(a - b).mean()) < self.min_diff or 0.5 * float(np.abs(ha - hb).sum()) < self.min_hist:
            return
        mid_err = float(np.abs(m - (a + b) / 2).mean())
        nearest_end = min(float(np.abs(m - a).mean()), float(np.abs(m - b).mean()))
        ratio = mid_err / max(nearest_end, 1e-6)
        if ratio < self.max_ratio:
            self.hits.append((index - self.k, ratio))  # the window's centre frame

    def cuts(self) -> list[int]:
        """One cut per run of consecutive hits: where the middle frame is most like the average."""
        runs: list[list[tuple[int, float]]] = []
        for hit in self.hits:
            if runs and hit[0] - runs[-1][-1][0] <= 2 * self.k:
                runs[-1].append(hit)
            else:
                runs.append([hit])
        return [min(r, key=lambda h: h[1])[0] for r in runs]


class ShotDetector:
    """Frame consumer -> shot boundaries. Per frame: one HSV content score (AdaptiveDetector, which
    also gives the ContentDetector's absolute-threshold cuts for free), histogram, fade and
    dissolve detectors, all on one ~36 px copy of the frame, so the per-frame cost stays a
    fraction of the decode."""

    def __init__(self, fps: float, content_threshold: float = 27.0, adaptive_threshold: float = 3.0,
                 fade_threshold: float = 3.0, min_shot_frames: int = 4, claim_frames: int = 12):
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.min_shot_frames = min_shot_frames
        self.content_threshold = content_threshold
        self.small_short_side = 30  # halve the analysis frame while its short side stays >= this
        n = min_shot_frames
        self.adaptive = AdaptiveDetector(adaptive_threshold=adaptive_threshold, min_content_val=content_threshold / 2,
                                         min_scene_len=n, window_width=2)
        self.histogram = HistogramDetector(min_scene_len=n)
        self.fade = ThresholdDetector(threshold=fade_threshold, min_scene_len=n)
        self.dissolve = DissolveDetector(size=None)  # fed the small frame as it is
        self.claim = claim_frames
        self.cuts: dict[str, list[int]] = {"hard": [], "fade": []}
        self.scores: list[float] = []   # content score per frame (HSV mean pixel distance)
        self.levels: list[float] = []   # mean pixel level per frame (0..255), for placing fade cuts
        self.last = -1

    def process_frame(self, index: int, frame: np.ndarray) -> None:
        tc = FrameTimecode(index, fps=self.fps)
        # Every detector scores averages over pixels, so they share one copy of the frame halved
        # to a short side of ~36 px (64x36 for 16:9): exact 2x area halvings take OpenCV's fast path
        # (~20x cheaper than resizing to an arbitrary width). Boundary F1 on the demo footage is the
        # same as at 96 px. PySceneDetect wants BGR: one cvtColor, not a strided copy.
        small = halve(frame, self.small_short_side)
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        self.cuts["hard"] += [c.frame_num for c in self.adaptive.process_frame(tc, bgr)]
        self.scores.append(self.adaptive._frame_score or 0.0)
        self.cuts["hard"] += [c.frame_num for c in self.histogram.process_frame(tc, bgr)]
        self.cuts["fade"] += [c.frame_num for c in self.fade.process_frame(tc, bgr)]
        self.levels.append(float(small.mean()))
        self.dissolve.process_frame(index, small)
        self.last = index

    def boundaries(self) -> list[int]:
        """Sorted frame indices where a new shot starts (0 excluded)."""
        if self.last >= 0:
            end = FrameTimecode(self.last, fps=self.fps)
            self.cuts["hard"] += [c.frame_num for c in self.adaptive.post_process(end)]
            self.cuts["fade"] += [c.frame_num for c in self.fade.post_process(end)]
        fades = [self._black_centre(c) for c in self.cuts["fade"]]
        # ContentDetector's rule on the scores already computed: an absolute jump is a cut.
        content = [i for i, v in enumerate(self.scores) if i > 0 and v >= self.content_threshold]
        # A fade spans fade-out + black + fade-in, so it claims a wider neighbourhood than a dissolve.
        chosen: list[tuple[int, int]] = []  # (frame, claim radius)
        for kind, radius in ((fades, self.claim + self.claim // 2), (self.dissolve.cuts(), self.claim),
                             (self.cuts["hard"] + content, 0)):
            chosen += [(c, radius) for c in kind if all(abs(c - x) > r for x, r in chosen)]
        return merge_cuts([c for c, _ in chosen], self.min_shot_frames, self.last + 1)


    def _black_centre(self, cut: int) -> int:
        """Move a fade cut to the middle of the darkest run near it: ThresholdDetector places it
        between its threshold crossings, which sit off-centre when one side is a dim shot."""
        lo, hi = max(0, cut - self.claim), min(len(self.levels), cut + self.claim + 1)
        window = np.asarray(self.levels[lo:hi])
        if not len(window):
            return cut
        dark = np.flatnonzero(window <= window.min() + 0.5) + lo
        run = dark[np.abs(dark - cut).argmin()]  # the dark run containing / nearest the cut
        start = end = run
        while start - 1 in dark:
            start -= 1
        while end + 1 in dark:
            end += 1
        return int((start + end + 1) // 2)


def merge_cuts(cuts: list[int], min_gap: int, num_frames: int) -> list[int]:
    """Sort, drop out-of-range cuts, and merge cuts within `min_gap` frames into their median."""
    groups: list[list[int]] = []
    for c in sorted(c for c in cuts if 0 < c < num_frames):
        if groups and c - groups[-1][-1] < min_gap:
            groups[-1].append(c)
        else:
            groups.append([c])
    return [int(np.median(g)) if len(g) % 2 else g[len(g) // 2 - 1] for g in groups]


def shots_from_boundaries(boundaries: list[int], num_frames: int) -> list[tuple[int, int]]:
    """[(start, end)] tiling [0, num_frames), end exclusive."""
    edges = [0] + [b for b in boundaries if 0 < b < num_frames] + [num_frames]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def boundary_f1(predicted: list[int], truth: list[int], tolerance: int = 2) -> dict:
    """Precision/recall/F1 of boundary frames, each truth matched at most once within ±tolerance."""
    unmatched = sorted(truth)
    tp = 0
    for p in sorted(predicted):
        hit = next((t for t in unmatched if abs(t - p) <= tolerance), None)
        if hit is not None:
            unmatched.remove(hit)
            tp += 1
    precision = tp / len(predicted) if predicted else 1.0
    recall = tp / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp,
            "predicted": len(predicted), "truth": len(truth)}
