"""Shot boundaries from the shared decode, with PySceneDetect's own detectors.

`ShotDetector` is a frame consumer: each analysis-size frame goes to a ContentDetector (hard cuts),
an AdaptiveDetector (gradual changes such as dissolves, judged against a rolling window) and a
ThresholdDetector (fades to and from black). Their cuts are merged: cuts closer than
`min_shot_frames` are one boundary (the detectors see the same transition). Shot length is not
limited here — a short shot is still a shot; minimum clip length is a filter.
"""
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, ThresholdDetector


class ShotDetector:
    def __init__(self, fps: float, content_threshold: float = 27.0, adaptive_threshold: float = 3.0,
                 fade_threshold: float = 12.0, min_shot_frames: int = 4):
        self.fps = fps if fps and fps > 0 else 25.0
        self.min_shot_frames = min_shot_frames
        n = min_shot_frames
        self.detectors = [
            ContentDetector(threshold=content_threshold, min_scene_len=n),
            AdaptiveDetector(adaptive_threshold=adaptive_threshold, min_scene_len=n, window_width=2),
            ThresholdDetector(threshold=fade_threshold, min_scene_len=n),
        ]
        self.cuts: list[int] = []
        self.last = -1

    def process_frame(self, index: int, frame: np.ndarray) -> None:
        tc = FrameTimecode(index, fps=self.fps)
        bgr = frame[..., ::-1]
        for d in self.detectors:
            self.cuts += [c.frame_num for c in d.process_frame(tc, bgr)]
        self.last = index

    def boundaries(self) -> list[int]:
        """Sorted frame indices where a new shot starts (0 excluded)."""
        if self.last >= 0:
            end = FrameTimecode(self.last, fps=self.fps)
            for d in self.detectors:
                self.cuts += [c.frame_num for c in d.post_process(end)]
        return merge_cuts(self.cuts, self.min_shot_frames, self.last + 1)


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
