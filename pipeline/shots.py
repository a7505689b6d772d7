"""Shot boundaries from the shared decode, with PySceneDetect's own detectors.

`ShotDetector` is a frame consumer: each analysis-size frame goes to PySceneDetect's
AdaptiveDetector (hard cuts, judged against a rolling window so fast camera moves don't fire) and
ThresholdDetector (fades through black, cut placed mid-black), plus our `DissolveDetector` for
cross-fades, which PySceneDetect does not ship. One transition often fires more than one detector
(a fade's edges look like cuts too), so cuts are fused by priority: a fade claims the cuts near it,
then a dissolve claims the cuts near it, then the remaining hard cuts. Shot length is not limited
here — a short shot is still a shot; minimum clip length is a filter.
"""
import cv2
import numpy as np
from scenedetect import AdaptiveDetector, FrameTimecode, HistogramDetector, ThresholdDetector

from pipeline.decode import Frames


_HUE_BIN = (np.arange(256) * 8 // 180 * 16).astype(np.uint8)  # OpenCV hue 0..179 -> 8 bins, pre-shifted


def _hsv_hist(hsv: np.ndarray) -> np.ndarray:
    """(N, h, w, 3) uint8 HSV -> (N, 128) colour histograms (8 hue x 4 sat x 4 value bins), sum 1:
    what cv2.calcHist gives with those bins over [0, 180) x [0, 256) x [0, 256)."""
    n = len(hsv)
    bins = _HUE_BIN[hsv[..., 0]] + (hsv[..., 1] >> 6) * 4 + (hsv[..., 2] >> 6)  # fits uint8: <= 127
    flat = bins.reshape(n, -1) + 128 * np.arange(n)[:, None]  # frame j counts into bins 128j .. 128j+127
    return np.bincount(flat.ravel(), minlength=128 * n).reshape(n, 128) / max(1, flat.shape[1])


class _Level(float):
    """A frame's mean level standing in for the frame: ThresholdDetector only takes np.mean of its
    frame, and np.mean defers to an object's own `mean`."""

    def mean(self, *args, **kwargs) -> float:
        return float(self)


class DissolveDetector:
    """Cross-fades: over a window of `window` frames, the middle frame is the average of the ends.

    A dissolve mixes two shots linearly, so frame m ≈ (f[m-k] + f[m+k]) / 2 while the ends differ a
    lot. A hard cut puts the middle frame on one side (error ≈ half the end difference), and camera
    motion over detail makes the average a ghosted blur far from the sharp middle frame. Motion over
    smooth or blurred content can look linear too, so the ends must also differ in colour
    distribution (a camera move stays on one picture; a dissolve changes the picture). Fed tiny
    frames (~64x36) a run at a time, all windows of the run in a few numpy operations.
    """

    def __init__(self, window: int = 10, min_diff: float = 15.0, max_ratio: float = 0.8,
                 min_hist: float = 0.3):
        self.k = window // 2
        self.min_diff, self.max_ratio, self.min_hist = min_diff, max_ratio, min_hist
        self.grey = np.empty((0, 0, 0), np.float32)  # the last 2k frames seen: grey, colour histogram
        self.hist = np.empty((0, 128))
        self.next = 0                                 # source index of the frame after those
        self.hits: list[tuple[int, float]] = []

    def process_frames(self, start: int, frames: np.ndarray, hsv: np.ndarray | None = None,
                       grey: np.ndarray | None = None) -> None:
        """frames: (N, h, w, 3) RGB; hsv, grey: the same frames in HSV and grey, if the caller has them."""
        n, h, w = frames.shape[:3]
        if hsv is None:
            hsv = cv2.cvtColor(frames.reshape(n * h, w, 3), cv2.COLOR_RGB2HSV).reshape(n, h, w, 3)
        if grey is None:
            grey = cv2.cvtColor(frames.reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w)
        grey = grey.astype(np.float32)
        if start != self.next or self.grey.shape[1:] != grey.shape[1:]:
            self.grey, self.hist = grey[:0], np.empty((0, 128))  # a gap: windows never span it
        g = np.concatenate([self.grey, grey])
        hs = np.concatenate([self.hist, _hsv_hist(hsv)])
        first = start - len(self.grey)  # source index of g[0]
        k = self.k
        self.grey, self.hist, self.next = g[-2 * k:], hs[-2 * k:], start + n
        if len(g) <= 2 * k:
            return
        a, m, b = g[:-2 * k], g[k:-k], g[2 * k:]  # window ends and centres
        ends = np.abs(a - b).mean(axis=(1, 2))
        hist_change = 0.5 * np.abs(hs[:-2 * k] - hs[2 * k:]).sum(axis=1)
        mid_err = np.abs(m - (a + b) / 2).mean(axis=(1, 2))
        nearest_end = np.minimum(np.abs(m - a).mean(axis=(1, 2)), np.abs(m - b).mean(axis=(1, 2)))
        ratio = mid_err / np.maximum(nearest_end, 1e-6)
        hit = (ends >= self.min_diff) & (hist_change >= self.min_hist) & (ratio < self.max_ratio)
        self.hits += [(first + k + int(c), float(ratio[c])) for c in np.flatnonzero(hit)]  # window centres

    def cuts(self) -> list[int]:
        """One cut per run of consecutive hits: where the middle frame is most like the average."""
        runs: list[list[tuple[int, float]]] = []
        for hit in self.hits:
            if runs and hit[0] - runs[-1][-1][0] <= 2 * self.k:
                runs[-1].append(hit)
            else:
                runs.append([hit])
        return [min(r, key=lambda h: h[1])[0] for r in runs]


class _Given:
    """Mixin for a PySceneDetect detector: its per-frame measurement is computed by ShotDetector for
    a whole run of frames at once and handed in, so the detector's own logic (adaptive window,
    minimum scene length, fade state) runs unchanged on it."""
    given = None

    def _calculate_frame_score(self, timecode, frame_img):  # ContentDetector / AdaptiveDetector
        return self.given

    def calculate_histogram(self, frame_img, bins=256, normalize=True):  # HistogramDetector
        return self.given


class _Adaptive(_Given, AdaptiveDetector):
    pass


class _Histogram(_Given, HistogramDetector):
    pass


class ShotDetector:
    """Frame consumer -> shot boundaries. PySceneDetect's AdaptiveDetector (which also gives the
    ContentDetector's absolute-threshold cuts for free), HistogramDetector and ThresholdDetector,
    plus the dissolve detector, all on one ~36 px copy of each frame. The measurements those
    detectors make per frame (HSV content score, luma histogram, mean level) are computed for a
    whole run of frames in a few numpy operations, the same numbers their own code computes, so
    the per-frame Python is only the detectors' decision logic."""

    def __init__(self, fps: float, content_threshold: float = 27.0, adaptive_threshold: float = 3.0,
                 fade_threshold: float = 3.0, min_shot_frames: int = 4, claim_frames: int = 12):
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.min_shot_frames = min_shot_frames
        self.content_threshold = content_threshold
        self.small_short_side = 30  # halve the analysis frame while its short side stays >= this
        n = min_shot_frames
        self.adaptive = _Adaptive(adaptive_threshold=adaptive_threshold, min_content_val=content_threshold / 2,
                                  min_scene_len=n, window_width=2)
        self.histogram = _Histogram(min_scene_len=n)
        self.fade = ThresholdDetector(threshold=fade_threshold, min_scene_len=n)
        self.dissolve = DissolveDetector()
        self.claim = claim_frames
        self.cuts: dict[str, list[int]] = {"hard": [], "fade": []}
        self.scores: list[float] = []   # content score per frame (HSV mean pixel distance)
        self.levels: list[float] = []   # mean pixel level per frame (0..255), for placing fade cuts
        self._last_hsv = None           # (index, HSV) of the last frame seen: the next run's first score
        self.last = -1
        self._tc0 = FrameTimecode(0, fps=self.fps)

    def process_frames(self, start: int, frames: Frames | np.ndarray) -> None:
        # Every detector scores averages over pixels, so they share one copy of the frames halved to
        # a short side of ~36 px (64x36 for 16:9): exact 2x area halvings take OpenCV's fast path.
        # Boundary F1 on the demo footage is the same as at 96 px.
        small = Frames.of(frames).small(self.small_short_side)
        n, h, w = small.shape[:3]
        flat = small.reshape(n * h, w, 3)
        hsv = cv2.cvtColor(flat, cv2.COLOR_RGB2HSV).reshape(n, h, w, 3)
        # ContentDetector's score (weights 1, 1, 1, 0): mean |delta| of H, S and V, averaged; 0 for
        # the first frame of the video.
        prev = self._last_hsv[1] if self._last_hsv is not None and self._last_hsv[0] == start - 1 else None
        seq = hsv.astype(np.int16) if prev is None else np.concatenate([prev[None], hsv]).astype(np.int16)
        content = np.abs(seq[1:] - seq[:-1]).reshape(len(seq) - 1, h * w * 3).mean(axis=1)
        content = np.concatenate([[0.0], content]) if prev is None else content
        self._last_hsv = (start + n - 1, hsv[-1].copy())
        # HistogramDetector's: the luma histogram (its bins, L2-normalised as its cv2.normalize does).
        # Its own code takes Y of a YUV conversion; OpenCV's grey is the same weights (1 level of
        # rounding apart on 0.3% of pixels) and the dissolve detector needs it too.
        bins = self.histogram._bins
        grey = cv2.cvtColor(flat, cv2.COLOR_RGB2GRAY).reshape(n, h, w)
        luma = grey.reshape(n, -1).astype(np.int64) * bins // 256
        hist = np.bincount((luma + bins * np.arange(n)[:, None]).ravel(), minlength=bins * n).reshape(n, bins)
        hist = (hist / np.linalg.norm(hist, axis=1, keepdims=True)).astype(np.float32)
        # ThresholdDetector's: the mean of all pixels
        level = small.reshape(n, -1).mean(axis=1)
        for j in range(n):
            tc = FrameTimecode(start + j, fps=self._tc0)  # fps from a timecode: 4x cheaper than validating a float
            self.adaptive.given = float(content[j])
            self.cuts["hard"] += [c.frame_num for c in self.adaptive.process_frame(tc, None)]
            self.histogram.given = hist[j]
            self.cuts["hard"] += [c.frame_num for c in self.histogram.process_frame(tc, small[j])]
            self.cuts["fade"] += [c.frame_num for c in self.fade.process_frame(tc, _Level(level[j]))]
        self.scores += content.tolist()
        self.levels += level.tolist()
        self.dissolve.process_frames(start, small, hsv, grey)
        self.last = start + n - 1

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
