"""Near-duplicate removal on CLIP embeddings.

Two clips are duplicates when the cosine similarity of their embeddings is >= `threshold`; duplicate
groups are the connected components of that relation (so A~B and B~C put A, B, C in one group). One
clip per group is kept, deterministically: a committed clip (`fixed`) if the group has one, else the
highest `aesthetic` (NaN counts lowest), then the smallest clip_id. Every other member maps to it.

Pairs come from exact chunked matrix products (memory bounded by `_CHUNK_ELEMENTS`, time O(n^2)) or,
for large sets, from a faiss inverted-file index: k-means into ~sqrt(n) cells, each clip searched in its
`nprobe` nearest cells. Near-duplicates are so close that they share a cell or a neighbouring one, so
this finds the same pairs at a fraction of the cost.
"""
import math
from typing import Iterable, Sequence

import cv2
import faiss
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.decode import Frames
from pipeline.spec import DedupSpec

_CHUNK_ELEMENTS = 1 << 24  # similarity entries per chunk: 64 MiB of float32


def _normalise(embeddings) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pairs_exact(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j), i < j, with x[i]·x[j] >= threshold; x (n, d) L2-normalised. Chunked over rows."""
    n = len(x)
    chunk = max(1, min(n, _CHUNK_ELEMENTS // max(1, n)))
    rows, cols = [], []
    for s in range(0, n, chunk):
        sim = x[s:s + chunk] @ x.T  # (chunk, n)
        i, j = np.nonzero(sim >= threshold)
        i += s
        upper = j > i
        rows.append(i[upper])
        cols.append(j[upper])
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def pairs_faiss(x: np.ndarray, threshold: float, nprobe: int = 8,
                query_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as `pairs_exact`, from an IVF index (sqrt(n) k-means cells, `nprobe` searched per query)."""
    n, d = x.shape
    nlist = max(1, int(math.sqrt(n)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    # Coarse cells are enough (a near-duplicate sits next to its original whatever the cell shapes), so
    # k-means trains briefly on a sample: full training would cost more than the search it prunes.
    index.cp.min_points_per_centroid = 1
    index.cp.max_points_per_centroid = 32
    index.cp.niter = 10
    index.train(x)
    index.add(x)
    index.nprobe = min(nlist, nprobe)
    # faiss keeps inner products strictly above the radius; step one ulp down, then apply >= ourselves.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    rows, cols = [], []
    for s in range(0, n, query_chunk):
        lims, sims, ids = index.range_search(x[s:s + query_chunk], radius)
        i = np.repeat(np.arange(s, s + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = (ids > i) & (sims >= threshold)
        rows.append(i[keep])
        cols.append(ids[keep])
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def find_duplicates(clip_ids: Sequence[str], embeddings, aesthetic=None, threshold: float = 0.95,
                    method: str = "auto", exact_max: int = 20000, fixed: Iterable[str] = ()) -> dict[str, str]:
    """Map each near-duplicate clip_id to the clip_id kept in its place.

    embeddings: (n, d) array, one row per clip_id (normalised here). aesthetic: (n,) or None (then ties
    go to the smallest clip_id). method: "exact", "faiss", or "auto" (exact up to `exact_max` clips).
    fixed: clip_ids already committed as kept; they stay kept, and new clips in their group map to the
    best of them. Clips absent from the result are kept.
    """
    ids = [str(c) for c in clip_ids]
    n = len(ids)
    x = _normalise(embeddings) if n else np.zeros((0, 1), np.float32)
    if len(x) != n:
        raise ValueError(f"{n} clip_ids but {len(x)} embeddings")
    if n < 2:
        return {}
    if method == "auto":
        method = "exact" if n <= exact_max else "faiss"
    if method == "exact":
        i, j = pairs_exact(x, threshold)
    elif method == "faiss":
        i, j = pairs_faiss(x, threshold)
    else:
        raise ValueError(f"unknown dedup method {method!r} (auto | exact | faiss)")
    if len(i) == 0:
        return {}
    _, comp = connected_components(coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n)), directed=False)

    score = np.full(n, -np.inf) if aesthetic is None else np.asarray(aesthetic, dtype=np.float64)
    score = np.where(np.isfinite(score), score, -np.inf)
    fixed = set(fixed)
    is_fixed = np.array([c in fixed for c in ids])
    # Best first: fixed, then highest aesthetic, then smallest clip_id. lexsort's last key is primary.
    order = np.lexsort((np.array(ids), -score, ~is_fixed))
    paired = np.zeros(n, bool)
    paired[i] = paired[j] = True
    order = order[paired[order]]  # clips in no pair are kept; skip them
    out: dict[str, str] = {}
    keeper: dict[int, int] = {}
    for k in order:
        c = comp[k]
        if c not in keeper:
            keeper[c] = k
        elif not is_fixed[k]:
            out[ids[k]] = ids[keeper[c]]
    return out


def mark_duplicates(rows: pa.Table, spec: DedupSpec, committed: pa.Table | None = None,
                    column: str = "embedding", threshold: float | None = None) -> pa.Table:
    """Set status="duplicate", dup_of and reason on kept rows that near-duplicate another kept clip.

    rows: clips table rows (clip_id, status, embedding, aesthetic, ...); only rows with status "kept"
    and an embedding take part, every other row passes through unchanged. committed: kept rows of
    earlier table versions (clip_id, embedding, aesthetic): they take part as `fixed`, are never marked,
    and are not returned. Reason reads e.g. "near-duplicate of <clip_id> (cosine 0.982,
    group threshold 0.95)": the cosine to the kept clip, which can sit below the threshold when the
    group is a chain.
    """
    status = rows.column("status").to_pylist()
    threshold = spec.threshold if threshold is None else threshold
    emb = rows.column(column).to_pylist()
    cand = [r for r, (s, e) in enumerate(zip(status, emb)) if s == "kept" and e is not None]
    ids = [rows.column("clip_id")[r].as_py() for r in cand]
    aes = rows.column("aesthetic").to_pylist() if "aesthetic" in rows.column_names else [None] * rows.num_rows
    vecs = [emb[r] for r in cand]
    scores = [aes[r] for r in cand]
    fixed_ids: list[str] = []
    if committed is not None and committed.num_rows:
        c_emb = committed.column(column).to_pylist()
        c_aes = (committed.column("aesthetic").to_pylist() if "aesthetic" in committed.column_names
                 else [None] * committed.num_rows)
        seen = set(ids)  # `ids` grows below: a list lookup would make this quadratic
        for cid, e, a in zip(committed.column("clip_id").to_pylist(), c_emb, c_aes):
            if e is not None and cid not in seen:
                seen.add(cid)
                fixed_ids.append(cid)
                ids.append(cid)
                vecs.append(e)
                scores.append(a)
    if len(ids) < 2:
        return rows
    x = _normalise(vecs)
    aesthetic = np.array([np.nan if a is None else a for a in scores], dtype=np.float64)
    dups = find_duplicates(ids, x, aesthetic, threshold, spec.method, spec.exact_max, fixed=fixed_ids)
    if not dups:
        return rows
    pos = {cid: k for k, cid in enumerate(ids)}
    dup_of = rows.column("dup_of").to_pylist() if "dup_of" in rows.column_names else [None] * rows.num_rows
    reason = rows.column("reason").to_pylist() if "reason" in rows.column_names else [None] * rows.num_rows
    for k, r in enumerate(cand):
        kept = dups.get(ids[k])
        if kept is None:
            continue
        cos = float(x[k] @ x[pos[kept]])
        status[r], dup_of[r] = "duplicate", kept
        reason[r] = f"near-duplicate of {kept} ({column} cosine {cos:.3f}, group threshold {threshold:g})"
    for name, values in (("status", status), ("dup_of", dup_of), ("reason", reason)):
        col = pa.array(values, type=pa.string())
        if name in rows.column_names:
            rows = rows.set_column(rows.column_names.index(name), name, col)
        else:
            rows = rows.append_column(name, col)
    return rows


class EdgeLayout:
    """Frame consumer: a tiny edge-energy layout per frame, for near-duplicate detection without
    trained CLIP weights (a random-init CLIP embeds every natural image alike, cos ≈ 0.99).

    Every `every`-th frame: grey at 64x64, Sobel |gx|+|gy|, area-averaged to 8x8 (64 float16s). A clip's
    vector is the layouts of `frames` evenly spaced frames (each the nearest sampled frame inside the
    clip), each mean-centred and normalised, concatenated:
    edges ignore colour grading, 8x8 cells tolerate a light re-crop, and several frames in order tell
    a different camera move over the same picture from a copy of the same move.
    """

    def __init__(self, size: int = 8, frames: int = 3, every: int = 2):
        self.size, self.frames, self.every = size, frames, every
        self.layouts: dict[int, np.ndarray] = {}

    def process_frames(self, start: int, frames: Frames | np.ndarray) -> None:
        first = -start % self.every  # the run's first sampled frame
        grey = Frames.of(frames).luma[first::self.every]  # luma as it comes: the layout is scale-free
        start += first
        if not len(grey):
            return
        # On the whole run at once: an area resize of the stacked grey frames to n*64 rows keeps
        # every output row inside its own frame. Area averages are separable: columns, then rows, is
        # the same resize (to 1 grey level of rounding) at half the cost of both at once. Each frame
        # gets one reflected row above and below, so the Sobel over the stack pads every frame as
        # cv2.Sobel pads one frame (reflect-101) and equals the per-frame computation (exact in
        # 16 bits: |gx| + |gy| <= 2040); 6x faster than the same sums in float numpy, measured.
        n, h, w = grey.shape
        grey = cv2.resize(grey.reshape(n * h, w), (64, n * h), interpolation=cv2.INTER_AREA)
        g = cv2.resize(grey, (64, n * 64), interpolation=cv2.INTER_AREA).reshape(n, 64, 64)
        p = np.pad(g, ((0, 0), (1, 1), (0, 0)), mode="reflect").reshape(n * 66, 64)  # numpy reflect = reflect-101
        gx = cv2.Sobel(p, cv2.CV_16S, 1, 0, borderType=cv2.BORDER_REFLECT_101)
        gy = cv2.Sobel(p, cv2.CV_16S, 0, 1, borderType=cv2.BORDER_REFLECT_101)
        edges = (np.abs(gx) + np.abs(gy)).reshape(n, 66, 64)[:, 1:-1].astype(np.float32)
        cells = cv2.resize(edges.reshape(n * 64, 64), (self.size, n * self.size), interpolation=cv2.INTER_AREA)
        for j, v in enumerate(cells.reshape(n, -1).astype(np.float16)):
            self.layouts[start + j * self.every] = v

    def clip_vector(self, start: int, end: int) -> list[float] | None:
        """Unit vector for source frames [start, end), or None if no sampled frame lies inside it."""
        picks = [start + (end - start) * (2 * k + 1) // (2 * self.frames) for k in range(self.frames)]
        lo, hi = start + -start % self.every, (end - 1) - (end - 1) % self.every  # first, last sampled
        parts = []
        for i in picks:
            v = self.layouts.get(min(max(round(i / self.every) * self.every, lo), hi)) if lo <= hi else None
            if v is None:
                return None
            v = v.astype(np.float32) - v.astype(np.float32).mean()
            parts.append(v / (np.linalg.norm(v) + 1e-6))
        x = np.concatenate(parts)
        return (x / (np.linalg.norm(x) + 1e-12)).tolist()
