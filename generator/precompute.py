"""Latent precompute: kept clips of a `clips` table version -> the `latents` Delta table.

    res = precompute("data/demo", version=3, vae_path="runs/vae/vae.safetensors")

One Ray Data job over the KEPT clips of `<root>/clips` at version N (read with `deltalake` directly:
generator/ never imports pipeline/):

    kept rows not yet in `latents` (key: clip_id + vae_sha + text_encoder_sha), or there with another caption
      -> map(decode_row)             PyAV; the clip's frames, resized to its bucket (aspect kept)
      -> map_batches(VAEEncoder)      actor: vae.to_dit(latent mean), chunked in time
      + union: clips with a stored latent for this VAE + settings (new caption or text encoder): no decode, no VAE
      -> map_batches(TextEncoder)     actor: per-token caption embeddings (L, D)
      -> ONE Delta commit to <root>/latents, lineage in the commit info

A bucket is (frames, short side): frames from FRAME_BUCKETS (1 + 4k for the causal VAE: an image
is a 1-frame clip), short side from SHORT_SIDES, the long side following the clip's aspect ratio,
rounded down to a multiple of the VAE's space factor x patch so the latent cuts into whole patches.
A clip that cannot be read becomes an entry in `PrecomputeResult.errors` and a line of the error log
`<table>_errors.jsonl` with the reason; the run goes on. Rows already present are skipped, so a
rerun (or a killed run) resumes; clips logged as unreadable with the same encoders are skipped too
unless `retry_errors` (decoding is deterministic: the same file fails the same way). Each row records
the settings that shaped it (buckets, patch, max aspect, dtype): a rerun under other settings is
refused rather than silently keeping the old rows, and `replace` re-encodes them in one commit.

Ray, deltalake and PyAV are imported inside the functions that use them, so the encoders and
the byte helpers (TextEncoder, tensor_from_bytes) import on a box with torch alone.
"""
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from generator.train import cluster_gpus, sha256_file

log = logging.getLogger(__name__)

SHORT_SIDES = (64, 128, 256)        # pixels
FRAME_BUCKETS = (1, 5, 9, 17, 33)   # 1 + 4k frames
LINEAGE_KEY = "spacetime"           # the commit-info key pipeline/store.py uses too

LATENTS_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    # latent grid (frames, height, width) in latent units; pixels are in `pixels`
    ("bucket", pa.struct([("frames", pa.int32()), ("height", pa.int32()), ("width", pa.int32())])),
    ("pixels", pa.struct([("frames", pa.int32()), ("height", pa.int32()), ("width", pa.int32())])),
    ("frame_offset", pa.int64()),       # first clip frame used (0-based, within the clip)
    ("fps", pa.float64()),
    ("latent", pa.binary()),            # safetensors bytes: "latent" (C, t, h, w), already vae.to_dit (shifted, scaled)
    ("text_embedding", pa.binary()),    # safetensors bytes: "text" (L, D); both float32 unless precompute --dtype
    ("caption", pa.string()),
    ("vae_sha", pa.string()),
    ("text_encoder_sha", pa.string()),
    ("clips_version", pa.int64()),
    # JSON of what shaped the row: frame_buckets, short_sides, patch, max_aspect, dtype (null: written
    # before it was recorded)
    ("settings", pa.string()),
])


def latents_path(root) -> str:
    return str(Path(root) / "latents")


# what latents and text embeddings may be stored as: bf16 / fp16 halve the table and its reads
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_to_bytes(t: torch.Tensor, name: str, dtype: str = "float32") -> bytes:
    return st_save({name: t.detach().to("cpu", STORE_DTYPES[dtype]).contiguous()})


def tensor_from_bytes(b: bytes, name: str) -> torch.Tensor:
    """The stored tensor as float32, whatever dtype it was stored in (the bytes say which)."""
    return st_load(bytes(b))[name].float()


# --------------------------------------------------------------------------------------------
# Buckets and decoding
# --------------------------------------------------------------------------------------------

def pick_frames(n: int, buckets=FRAME_BUCKETS) -> int:
    """Largest frame bucket <= n frames (n >= 1)."""
    fit = [f for f in buckets if f <= n]
    if not fit:
        raise ValueError(f"clip has {n} frames, fewer than the smallest bucket {min(buckets)}")
    return max(fit)


def pick_size(width: int, height: int, short_sides=SHORT_SIDES, multiple: int = 16,
              max_aspect: float = 2.0) -> tuple[int, int]:
    """(width, height) in pixels of the bucket for a display size: the largest short side in
    `short_sides` not above the clip's (the smallest when the clip is smaller: upscaled), the long
    side at the clip's aspect ratio (capped at max_aspect), rounded down to a multiple."""
    short, long_ = min(width, height), max(width, height)
    fit = [s for s in short_sides if s <= short]
    s = max(fit) if fit else min(short_sides)
    if s % multiple:
        raise ValueError(f"short side bucket {s} is not a multiple of {multiple} (VAE space factor x patch)")
    l = min(long_ * s / short, max_aspect * s)
    l = max(s, int(l) // multiple * multiple)
    return (l, s) if width >= height else (s, l)


def parse_clip_uri(uri: str) -> tuple[str, int, int | None]:
    """(path, first frame, end frame or None) of a clip_uri: a file (all its frames) or
    `<source>#frames=a-b` (source frames a..b-1)."""
    if "#frames=" in uri:
        path, rng = uri.rsplit("#frames=", 1)
        a, b = rng.split("-")
        return path, int(a), int(b)
    return uri, 0, None


def _rotate_ccw(img: np.ndarray, degrees_ccw: int) -> np.ndarray:
    k = int(round(degrees_ccw / 90.0)) % 4  # np.rot90 turns counter-clockwise, like frame.rotation
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def decode_clip(uri: str, n_frames: int | None, frame_buckets=FRAME_BUCKETS, short_sides=SHORT_SIDES,
                multiple: int = 16, max_aspect: float = 2.0) -> tuple[np.ndarray, int]:
    """Decode a clip to its bucket -> (frames (T, H, W, 3) uint8 RGB, display orientation; offset).

    n_frames: the clip's length from the table (None: the whole file). T is the largest frame
    bucket that fits, taken from the middle of the clip (offset = first clip frame used, 0-based);
    frames are consecutive at the native rate. Rotation comes from each frame's display matrix
    (a reference URI points at the untouched source, which may be stored rotated). A file that
    ends early is cut to the largest bucket of what it held. Raises on unreadable input."""
    import av
    from av.video.reformatter import VideoReformatter

    path, first, end = parse_clip_uri(uri)
    n = n_frames if n_frames is not None else (end - first if end is not None else None)
    want = pick_frames(n, frame_buckets) if n else max(frame_buckets)
    offset = (n - want) // 2 if n else 0
    lo = first + offset
    out, size, fmt = [], None, VideoReformatter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i < lo:
                continue
            if len(out) == want:
                break
            rot = int(round(frame.rotation / 90.0)) % 4 * 90 if frame.rotation else 0
            if size is None:  # display size -> bucket size -> the scaled coded size swscale makes
                cw, ch = frame.width, frame.height
                dw, dh = (ch, cw) if rot in (90, 270) else (cw, ch)
                tw, th = pick_size(dw, dh, short_sides, multiple, max_aspect)
                scale = max(tw / dw, th / dh)  # cover the bucket, then centre-crop the long side
                sw, sh = max(tw, round(dw * scale)), max(th, round(dh * scale))
                size = (tw, th, (sh, sw) if rot in (90, 270) else (sw, sh))
            tw, th, (cw2, ch2) = size
            rgb = _rotate_ccw(fmt.reformat(frame, cw2, ch2, "rgb24").to_ndarray(), rot)
            y0, x0 = (rgb.shape[0] - th) // 2, (rgb.shape[1] - tw) // 2
            out.append(rgb[y0:y0 + th, x0:x0 + tw])
    if not out:
        raise ValueError(f"no frames decoded from {uri} (wanted frames from {lo})")
    keep = pick_frames(len(out), frame_buckets)
    return np.stack(out[:keep]), offset


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a failed allocation (CUDA or host): a matter of the machine and what else ran on
    it, not of the clip, so the clip is left for the next run instead of logged as unreadable."""
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def decode_row(row: dict, frame_buckets=FRAME_BUCKETS, short_sides=SHORT_SIDES, multiple: int = 16,
               max_aspect: float = 2.0) -> dict:
    """Ray Data map stage: one clips row -> the same row plus `frames` (raw uint8 bytes), `shape`
    (T, H, W), `error` ("" when fine) and `retry` (the error was running out of memory: not the
    clip's fault). Errors are data: a bad clip comes back with its reason."""
    out = {k: row[k] for k in ("clip_id", "clip_uri", "caption", "fps")}
    try:
        n = row.get("n_frames")
        video, offset = decode_clip(row["clip_uri"], int(n) if n and n > 0 else None, frame_buckets, short_sides,
                                    multiple, max_aspect)
        out.update(frames=video.tobytes(), shape=list(video.shape[:3]), frame_offset=offset, error="", retry=False)
    except Exception as e:  # noqa: BLE001 - any failure of one clip is recorded, the run goes on
        out.update(frames=b"", shape=[0, 0, 0], frame_offset=0, error=f"{type(e).__name__}: {e}"[:500],
                   retry=out_of_memory(e))
    return out


# --------------------------------------------------------------------------------------------
# Encoders (callable classes for map_batches)
# --------------------------------------------------------------------------------------------

def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class VAEEncoder:
    """Actor: decoded frames -> vae.to_dit(latent mean) (C, t, h, w) as safetensors bytes.

    Long clips go through the VAE in chunks of `chunk_frames` after frame 0 and big frames in
    spatial tiles, so memory stays flat; the causal VAE makes both exact (or nearly, for tiles)."""

    def __init__(self, vae_path: str, use_gpu: bool = False, threads: int = 1, chunk_frames: int = 16,
                 tile: int = 256, dtype: str = "float32"):
        from generator.vae import load_vae

        torch.set_num_threads(threads)
        self.device = _device(use_gpu)
        self.vae = load_vae(vae_path, device=self.device).eval()
        self.chunk, self.tile, self.dtype = chunk_frames, tile, dtype
        log.info("VAE encoder on %s", self.device)

    @torch.no_grad()
    def encode(self, video: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (C, t, h, w) float32 scaled latent."""
        x = torch.from_numpy(video).to(self.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # (1, 3, T, H, W)
        tile = self.tile if max(x.shape[-2:]) > self.tile else None
        chunk = self.chunk if x.shape[2] > 1 + self.chunk else None
        z = self.vae.encode(x, chunk_frames=chunk, tile=tile, overlap=min(64, self.tile // 4)).mean[0]
        return self.vae.to_dit(z)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["clip_id"])
        latents, buckets, errors, retry = [], [], list(batch["error"]), list(batch["retry"])
        for i in range(n):
            if errors[i]:
                latents.append(b"")
                buckets.append([0, 0, 0])
                continue
            try:
                T, H, W = (int(v) for v in batch["shape"][i])
                video = np.frombuffer(batch["frames"][i], np.uint8).reshape(T, H, W, 3)
                z = self.encode(video)
                latents.append(tensor_to_bytes(z, "latent", self.dtype))
                buckets.append(list(z.shape[1:]))
            except Exception as e:  # noqa: BLE001
                errors[i], retry[i] = f"vae: {type(e).__name__}: {e}"[:500], out_of_memory(e)
                if retry[i] and self.device.type == "cuda":
                    torch.cuda.empty_cache()  # the next clips get what this one held
                latents.append(b"")
                buckets.append([0, 0, 0])
        out = {k: v for k, v in batch.items() if k != "frames"}  # the pixels stop here
        out.update(latent=np.array(latents, dtype=object), bucket_thw=np.array(buckets, dtype=np.int64),
                   error=np.array(errors, dtype=object), retry=np.array(retry, dtype=bool))
        return out


def _state_sha(state: dict) -> str:
    """sha256 over a state dict's names, shapes and bytes: the identity of weights built from a config."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}:{tuple(state[k].shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TextEncoder:
    """Captions -> per-token embeddings: `TextEncoder(...)(list[str]) -> list[(L_i, D)]`.

    spec "open_clip:<model>": open_clip's text tower, built from its config; weights from the local
    file `weights` (None: seeded random init, the same in every process). Tokens are the ln_final
    states up to and including end-of-text. spec "t5:<local dir>": a T5 encoder loaded with
    local_files_only=True; tokens are the last hidden states of the non-padding tokens.
    `sha` identifies the weights (file hash, or a hash of the built tensors)."""

    def __init__(self, spec: str = "open_clip:ViT-B-32", weights: str | None = None, use_gpu: bool = False,
                 threads: int = 1):
        kind, _, name = spec.partition(":")
        if kind not in ("open_clip", "t5") or not name:
            raise ValueError(f"text encoder must be 'open_clip:<model name>' or 't5:<local dir>', got {spec!r}")
        torch.set_num_threads(threads)
        self.kind, self.device = kind, _device(use_gpu)
        if kind == "open_clip":
            import open_clip

            if weights is not None and not os.path.isfile(weights):
                raise FileNotFoundError(f"open_clip weights not found: {weights}")
            with torch.random.fork_rng():
                torch.manual_seed(0)  # random-init towers must agree across actors and reruns
                model = open_clip.create_model(name, pretrained=weights)
            self.tokenizer = open_clip.get_tokenizer(name)
            model.visual = None  # only the text tower is used; free the image tower
            self.model = model.to(self.device).eval()
            self.dim = model.ln_final.normalized_shape[0]
            text_state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("visual.")}
            self.sha = sha256_file(weights) if weights else _state_sha(text_state)
        else:
            from transformers import AutoTokenizer, T5EncoderModel

            if not os.path.isdir(name):
                raise FileNotFoundError(f"T5 directory not found: {name}")
            self.tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(name, local_files_only=True).to(self.device).eval()
            self.dim = self.model.config.d_model
            self.sha = _state_sha(self.model.state_dict())
        log.info("text encoder %s (D=%d) on %s", spec, self.dim, self.device)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        captions = [c or "" for c in captions]
        if self.kind == "open_clip":
            ids = self.tokenizer(captions).to(self.device)  # (B, 77)
            m = self.model
            x = m.token_embedding(ids) + m.positional_embedding
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # (B, 77, D)
            ends = ids.argmax(-1)  # end-of-text has the largest id in CLIP's vocabulary
            return [x[i, :int(e) + 1].float().cpu() for i, e in enumerate(ends)]
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
        x = self.model(**enc).last_hidden_state
        return [x[i, :int(n)].float().cpu() for i, n in enumerate(enc["attention_mask"].sum(-1))]


class TextEmbedStage:
    """Actor wrapping TextEncoder for map_batches: caption column -> text_embedding bytes."""

    def __init__(self, spec: str, weights: str | None, sha: str, use_gpu: bool = False, threads: int = 1,
                 dtype: str = "float32"):
        self.encoder, self.dtype = TextEncoder(spec, weights, use_gpu, threads), dtype
        if self.encoder.sha != sha:  # a nondeterministic build would silently mix embeddings
            raise RuntimeError(f"text encoder on this worker has sha {self.encoder.sha}, the driver's is {sha}")

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        embs = [b""] * len(batch["clip_id"])
        if ok:
            for i, e in zip(ok, self.encoder([str(batch["caption"][i]) for i in ok])):
                embs[i] = tensor_to_bytes(e, "text", self.dtype)
        return {**batch, "text_embedding": np.array(embs, dtype=object)}


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------

@dataclass
class PrecomputeResult:
    version: int | None           # latents table version written (None: nothing new to write)
    written: int                  # rows committed this run
    skipped: int                  # kept clips already in the table with these encoders and captions
    errors: list = field(default_factory=list)  # {clip_id, clip_uri, reason}, this run's
    retry: list = field(default_factory=list)   # the same, for clips out of memory: not logged, retried next run
    known_errors: int = 0         # clips skipped because the error log already names them
    reused: int = 0               # of this run's clips, those with a stored latent (new caption or text encoder)
    gpu: bool | None = None       # whether the encoders ran on GPU (None: nothing to encode)
    vae_sha: str = ""
    text_encoder_sha: str = ""
    clips_version: int = 0


def choose_caption(row: dict) -> str:
    """Our dense caption, else the imported dense one, else the short ones, else ''."""
    for k in ("caption_dense", "caption_teacher_dense", "caption_short", "caption_teacher_short"):
        if row.get(k):
            return row[k]
    return ""


KEY = ("clip_id", "vae_sha", "text_encoder_sha")  # one latents row per clip and encoder pair


def arrow_table(dt, columns: list[str] | None = None, filter=None) -> pa.Table:
    """The Delta snapshot `dt` as one Arrow table, scanned on the calling thread: pyarrow's threaded
    scan through deltalake's Python filesystem handler makes a process that never imported ray abort
    at exit most of the time ("terminate called without an active exception"; delta-rs#2184,
    apache/arrow#34314). Measured no slower (1.3 GB table: 0.8 s either way)."""
    return dt.to_pyarrow_dataset().to_table(columns=columns, filter=filter, use_threads=False)


def _what(t: pa.Table) -> list:
    """(settings JSON, caption) of each row of `t`: what a row was made from besides its key (None
    where a table has no such column: settings were not recorded before)."""
    cols = [t[c].to_pylist() if c in t.column_names else [None] * t.num_rows for c in ("settings", "caption")]
    return list(zip(*cols))


def _made(dt) -> dict:
    """{(clip_id, vae_sha, text_encoder_sha): (settings JSON, caption)} of snapshot `dt`."""
    names = {f.name for f in dt.schema().fields}
    t = arrow_table(dt, list(KEY) + [c for c in ("settings", "caption") if c in names])
    return dict(zip(zip(*(t[c].to_pylist() for c in KEY)), _what(t)))


def existing_rows(path: str) -> dict:
    """{(clip_id, vae_sha, text_encoder_sha): (settings JSON or None, caption)} of the latents table at
    `path` (latest version)."""
    from deltalake import DeltaTable

    return _made(DeltaTable(path)) if DeltaTable.is_deltatable(path) else {}


def stored_latents(path: str, clip_ids: list[str], vae_sha: str, settings: str) -> dict:
    """{clip_id: {latent (bytes), bucket_thw (t, h, w), shape (T, H, W), frame_offset}} of rows of the
    latents table at `path` (latest version) for these clips, this VAE and settings JSON, under any text
    encoder: what VAEEncoder would give for them again. One scan over the matching rows."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    if not clip_ids:
        return {}
    # cast: files written by Delta's merge (a replacement) hold string_view, which is_in and pyarrow's
    # statistics pruning cannot compare with a string (NotImplemented errors); so no row group is skipped
    col = lambda c: pc.field(c).cast(pa.string())
    f = col("clip_id").isin(clip_ids) & (col("vae_sha") == vae_sha) & (col("settings") == settings)
    t = arrow_table(DeltaTable(path), ["clip_id", "bucket", "pixels", "frame_offset", "latent"], filter=f)
    # (t, h, w) and (T, H, W) as arrays, as VAEEncoder's batches hold them: a union of both streams is one schema
    thw = lambda d: np.array([d["frames"], d["height"], d["width"]], np.int64)
    return {r["clip_id"]: {"latent": r["latent"], "bucket_thw": thw(r["bucket"]), "shape": thw(r["pixels"]),
                           "frame_offset": r["frame_offset"]} for r in t.to_pylist()}


def settings_diff(old: str | None, new: str) -> str:
    """'key: old -> new; ...' between two rows' settings JSON ('settings not recorded' for None)."""
    if old is None:
        return "settings not recorded"
    a, b = json.loads(old), json.loads(new)
    return "; ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


ROW_GROUP_ROWS = 256  # latents rows per Parquet row group (a row is ~0.1-1 MB of latent + text bytes)


def append_new(path: str, table: pa.Table, lineage: dict, retries: int = 8,
               replace: bool = False) -> tuple[int | None, int]:
    """Append the rows of `table` whose (clip_id, vae_sha, text_encoder_sha) the latents table does not
    hold yet, as ONE commit -> (new version or None if nothing was new, rows written). Rows it holds
    for another caption (a recaptioned clips version) are rewritten with these in the same commit (a
    Delta merge), and with `replace` so are rows made under other `settings`.

    The check and the commit use one snapshot with Delta's silent retry off: when two precompute
    runs over one dataset race, the loser re-reads the winner's rows and writes only what is still
    missing, so no clip is ever encoded into the table twice.
    """
    from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
    from deltalake.exceptions import CommitFailedError, DeltaError

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # small row groups: LatentBatches reads and caches the table a row group at a time
    writer = WriterProperties(max_row_group_size=ROW_GROUP_ROWS)
    keys = list(zip(*(table[c].to_pylist() for c in KEY)))
    what = _what(table)
    for attempt in range(retries + 1):
        snapshot = DeltaTable(path) if DeltaTable.is_deltatable(path) else None
        new, replaced = table, 0
        if snapshot is not None:
            have = _made(snapshot)
            stale = lambda k, w: have[k][1] != w[1] or (replace and have[k][0] != w[0])
            new = table.filter(pa.array([k not in have or stale(k, w) for k, w in zip(keys, what)], pa.bool_()))
            if new.num_rows == 0:
                return None, 0
            replaced = sum(k in have for k in zip(*(new[c].to_pylist() for c in KEY)))
        info = {**lineage, "rows_written": new.num_rows, "rows_replaced": replaced}
        props = CommitProperties(custom_metadata={LINEAGE_KEY: json.dumps(info)}, max_commit_retries=0)
        try:
            if snapshot is None:  # creating it: a writer that created it meanwhile makes this fail
                write_deltalake(path, new, mode="error", commit_properties=props, writer_properties=writer)
                return 0, new.num_rows
            base = snapshot.version()  # write_deltalake moves the DeltaTable it is given on to its commit
            if replaced:  # old rows out, new rows in: one merge, so a reader never sees a clip twice or not at all
                on = " AND ".join(f"t.{c} = s.{c}" for c in KEY)
                (snapshot.merge(new, on, source_alias="s", target_alias="t", merge_schema=True,
                                writer_properties=writer, commit_properties=props)
                 .when_matched_update_all().when_not_matched_insert_all().execute())
            else:  # schema_mode merge: a table from before the settings column gains it
                write_deltalake(snapshot, new, mode="append", schema_mode="merge", commit_properties=props,
                                writer_properties=writer)
            return base + 1, new.num_rows  # no commit retries: the commit is the one after the snapshot
        except (CommitFailedError, DeltaError) as e:
            lost_race = isinstance(e, CommitFailedError) or (snapshot is None and DeltaTable.is_deltatable(path))
            if not lost_race or attempt == retries:
                raise
            time.sleep(0.1 * (attempt + 1) * (1 + random.random()))
    raise RuntimeError("unreachable")


def errors_path(table_path: str) -> Path:
    return Path(str(table_path).rstrip("/") + "_errors.jsonl")


def logged_errors(table_path: str, settings: dict | None = None) -> set:
    """(clip_id, vae_sha, text_encoder_sha) of clips the error log names as unreadable. settings: only
    entries logged under these bucket settings (or none recorded): a readable clip shorter than
    another run's smallest frame bucket failed there and may fit this run's."""
    p = errors_path(table_path)
    if not p.is_file():
        return set()
    keys = set()
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                e = json.loads(line)
            except ValueError:  # torn by a run killed while appending it: that clip is only retried
                continue
            if settings is None or e.get("settings", settings) == settings:
                keys.add((e["clip_id"], e["vae_sha"], e["text_encoder_sha"]))
    return keys


def open_version(path: str, version, missing: str):
    """DeltaTable at `path` and `version` (None = latest); ValueError(`missing`) when there is no
    table, a readable ValueError when the version does not exist."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        raise ValueError(missing)
    try:
        return DeltaTable(path, version=version)
    except Exception as e:  # deltalake raises a generic error for a missing version
        raise ValueError(f"{path}: version {version} not found ({e})") from None


def kept_clips(root, version: int) -> list[dict]:
    """Kept rows of <root>/clips at `version`, with the caption chosen and n_frames = clip length."""
    cols = ["clip_id", "clip_uri", "status", "start_frame", "end_frame", "fps", "caption_dense",
            "caption_teacher_dense", "caption_short", "caption_teacher_short"]
    dt = open_version(str(Path(root) / "clips"), version, f"no clips table under {root}")
    have = {f.name for f in dt.schema().fields}  # older versions may lack the caption columns
    t = arrow_table(dt, [c for c in cols if c in have])
    rows = []
    for r in t.to_pylist():
        if r.get("status") != "kept" or not r.get("clip_id") or not r.get("clip_uri"):
            continue
        s, e = r.get("start_frame"), r.get("end_frame")
        rows.append({"clip_id": r["clip_id"], "clip_uri": r["clip_uri"], "caption": choose_caption(r),
                     "fps": float(r.get("fps") or 0.0), "n_frames": int(e - s) if s is not None and e is not None else 0})
    return sorted(rows, key=lambda r: r["clip_id"])


def precompute(dataset_root, version: int, vae_path: str, text_encoder: str = "open_clip:ViT-B-32",
               text_weights: str | None = None, out: str | None = None, *, short_sides=SHORT_SIDES,
               frame_buckets=FRAME_BUCKETS, patch=(1, 2, 2), max_aspect: float = 2.0, max_clips: int | None = None,
               concurrency: int = 1, use_gpu: bool | None = None, batch_size: int = 8,
               retry_errors: bool = False, progress=None, dtype: str = "float32",
               replace: bool = False) -> PrecomputeResult:
    """Encode the kept clips of clips-table `version` into the latents table; ONE commit per run.

    out: the latents table path (default <root>/latents). short_sides / frame_buckets: the bucket
    sets (pixels / frames; short sides must be multiples of the VAE space factor x patch). patch:
    the DiT patch (t, h, w) the sizes must divide into. max_clips: encode at most this many new
    clips this run (the rest on the next run): bounds the driver's memory, since the run's rows
    are committed together. retry_errors: also retry clips the error log names. dtype: what the
    latents and text embeddings are stored as (STORE_DTYPES; readers get float32). Clips that already
    have rows for these encoders made under other settings (buckets, patch, max_aspect, dtype) are a
    ValueError naming both, unless `replace`: then they are encoded again and their rows rewritten in
    this run's one commit (rows from before settings were recorded count as the same settings, but
    `replace` rewrites them too). A clip whose row holds another caption (a recaptioned version) has
    its caption embedded again and its row replaced in the same commit. A clip that has a row for this VAE
    and settings (under any text encoder) keeps that row's latent: no decode, no VAE, text encoder only. concurrency:
    actors per encoder. use_gpu: None = when the Ray cluster has GPUs. progress(done, total): called as
    rows arrive. Lineage (clips version, vae/text encoder sha,
    counts, errors) goes in the commit info under "spacetime"."""
    import ray
    from generator.vae import load_vae

    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if len(patch) != 3:  # (t, h) alone failed mid-run; a fourth value was silently dropped
        raise ValueError(f"patch must be three integers (t, h, w), got {tuple(patch)}")
    if max_clips is not None and max_clips < 1:  # 0 wrote nothing and said so as if all were done; -1 dropped one
        raise ValueError(f"max_clips must be >= 1 (or None: every clip), got {max_clips}")
    root = str(Path(dataset_root).resolve())
    out = out or latents_path(root)
    vae_sha = sha256_file(vae_path)
    vcfg = load_vae(vae_path).cfg
    multiple = vcfg.space_factor * max(patch[1], patch[2])
    bad_t = [f for f in frame_buckets if (f - 1) % vcfg.time_factor or (1 + (f - 1) // vcfg.time_factor) % patch[0]]
    if bad_t:
        raise ValueError(f"frame buckets {bad_t} are not 1 + {vcfg.time_factor}k with latent frames divisible by {patch[0]}")
    bad_s = [s for s in short_sides if s % multiple]
    if bad_s:  # here, once: in decode every clip failed and the error log named them all unreadable
        raise ValueError(f"short sides {bad_s} are not multiples of {multiple} (VAE space factor x patch)")
    # what decides whether a readable clip fits a bucket: the error log's entries hold only under the same
    settings = {"frame_buckets": sorted(frame_buckets), "short_sides": sorted(short_sides), "patch": list(patch),
               "max_aspect": max_aspect}
    row_settings = json.dumps({**settings, "dtype": dtype}, sort_keys=True)  # what shapes a row: stored with it
    encoder = TextEncoder(text_encoder, text_weights)  # in the driver too: its sha decides what to skip
    te_sha = encoder.sha
    del encoder

    rows = kept_clips(root, version)
    have = existing_rows(out)
    # clip_id -> (settings, caption) of its row for these encoders
    made = {r["clip_id"]: have[k] for r in rows if (k := (r["clip_id"], vae_sha, te_sha)) in have}
    other = [c for c, (s, _) in made.items() if s is not None and s != row_settings]
    if other and not replace:  # skipping them would leave rows the user did not ask for, silently
        raise ValueError(f"{len(other)} clip(s) of version {version} already have latents in {out} for this VAE and "
                         f"text encoder made with other settings ({settings_diff(made[other[0]][0], row_settings)}): "
                         f"pass those settings to resume, or --replace to encode them again with these (one commit)")
    failed = set() if retry_errors else logged_errors(out, settings)
    # a clip whose caption changed (a recaptioned version) is encoded again: its row must embed this caption
    todo = [r for r in rows if r["clip_id"] not in made or made[r["clip_id"]][1] != r["caption"]
            or (replace and made[r["clip_id"]][0] != row_settings)]
    skipped = len(rows) - len(todo)
    known = sum((r["clip_id"], vae_sha, te_sha) in failed for r in todo)
    todo = [r for r in todo if (r["clip_id"], vae_sha, te_sha) not in failed]
    if max_clips is not None:
        todo = todo[:max_clips]
    # A clip with a row for this VAE and these settings (a new caption, or another text encoder) keeps
    # its latent: its id names its content (source hash + frame range), so decode + VAE would give the
    # same bytes again; only its caption goes through the text encoder.
    encoded = {c for (c, v, _), (s, _) in have.items() if v == vae_sha and s == row_settings}
    stored = stored_latents(out, [c for r in todo if (c := r["clip_id"]) in encoded], vae_sha, row_settings)
    reuse = [{**{k: r[k] for k in ("clip_id", "clip_uri", "caption", "fps")}, **stored[r["clip_id"]],
              "error": "", "retry": False} for r in todo if r["clip_id"] in stored]
    encode = [r for r in todo if r["clip_id"] not in stored]
    res = PrecomputeResult(version=None, written=0, skipped=skipped, known_errors=known, vae_sha=vae_sha,
                           text_encoder_sha=te_sha, clips_version=version, reused=len(reuse))
    log.info("precompute: %d kept clips in version %d, %d already encoded, %d logged unreadable, %d to do "
             "(%d of them with a stored latent: text encoder only)", len(rows), version, skipped, known, len(todo), len(reuse))
    if not todo:
        return res

    if use_gpu is None:  # the cluster's GPUs, not this process's: a CPU head node drives GPU workers
        use_gpu = cluster_gpus() > 0
    elif not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    res.gpu = bool(use_gpu)
    log.info("precompute: encoders on %s", "GPU" if use_gpu else "CPU")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Fractional CPUs on CPU-only nodes: the two encoder actors must leave room for the decode tasks,
    # or a small node (2 CPUs) deadlocks with every CPU held by an idle actor.
    actor_res = dict(num_gpus=0.5, num_cpus=1) if use_gpu else dict(num_cpus=0.5)
    ds = None
    if encode:
        ds = ray.data.from_items(encode, override_num_blocks=max(1, min(len(encode), 64)))
        ds = ds.map(decode_row, fn_kwargs=dict(frame_buckets=tuple(frame_buckets), short_sides=tuple(short_sides),
                                               multiple=multiple, max_aspect=max_aspect), num_cpus=0.5)
        ds = ds.map_batches(VAEEncoder, fn_constructor_kwargs=dict(vae_path=str(vae_path), use_gpu=use_gpu,
                                                                   dtype=dtype),
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=concurrency), batch_format="numpy",
                            **actor_res)
    if reuse:  # straight to the text encoder: no VAE actor starts when every clip has its latent
        kept = ray.data.from_items(reuse, override_num_blocks=max(1, min(len(reuse), 64)))
        ds = kept if ds is None else ds.union(kept)
    ds = ds.map_batches(TextEmbedStage, fn_constructor_kwargs=dict(spec=text_encoder, weights=text_weights, sha=te_sha,
                                                                   use_gpu=use_gpu, dtype=dtype),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                        batch_format="numpy", **actor_res)

    good = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["clip_id"])):
            if batch["error"][i]:
                (res.retry if batch["retry"][i] else res.errors).append(
                    {"clip_id": str(batch["clip_id"][i]), "clip_uri": str(batch["clip_uri"][i]),
                     "reason": str(batch["error"][i])})
                log.warning("precompute: clip %s skipped: %s", batch["clip_id"][i], batch["error"][i])
                continue
            t, h, w = (int(v) for v in batch["bucket_thw"][i])
            T, H, W = (int(v) for v in batch["shape"][i])
            good.append({"clip_id": str(batch["clip_id"][i]),
                         "bucket": {"frames": t, "height": h, "width": w},
                         "pixels": {"frames": T, "height": H, "width": W},
                         "frame_offset": int(batch["frame_offset"][i]), "fps": float(batch["fps"][i]),
                         "latent": bytes(batch["latent"][i]), "text_embedding": bytes(batch["text_embedding"][i]),
                         "caption": str(batch["caption"][i]), "vae_sha": vae_sha, "text_encoder_sha": te_sha,
                         "clips_version": int(version), "settings": row_settings})
        if progress is not None:
            progress(len(good) + len(res.errors) + len(res.retry), len(todo))
    if res.errors:  # appended before the commit: a crash after it only means a retry next time
        errors_path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(errors_path(out), "a") as f:
            for e in res.errors:
                f.write(json.dumps({**e, "vae_sha": vae_sha, "text_encoder_sha": te_sha, "clips_version": int(version),
                                    "settings": settings, "at": time.time()}) + "\n")
    if good:
        good.sort(key=lambda r: r["clip_id"])
        table = pa.Table.from_pylist(good, schema=LATENTS_SCHEMA)
        buckets = {}
        for r in good:
            b = r["pixels"]
            key = f"{b['frames']}x{b['height']}x{b['width']}"
            buckets[key] = buckets.get(key, 0) + 1
        lineage = {"stage": "precompute", "clips_version": int(version), "vae_sha": vae_sha, "vae_path": str(Path(vae_path).resolve()),
                   "text_encoder": text_encoder,
                   "text_weights": str(Path(text_weights).resolve()) if text_weights else None, "text_encoder_sha": te_sha, "dtype": dtype, "rows_written": len(good),
                   "settings": json.loads(row_settings), "out_of_memory": len(res.retry), "gpu": use_gpu,
                   "skipped": skipped, "latents_reused": len(reuse),
                   "errors": len(res.errors), "error_list": res.errors[:50],
                   "buckets": buckets, "committed_at": time.time()}
        res.version, written = append_new(out, table, lineage, replace=replace)
        if written < len(good):
            log.info("precompute: %d rows were committed meanwhile by another run; not written twice",
                     len(good) - written)
        res.written = written
    return res

