"""Batch captioning of a clips-table version with Ray Data, written back as ONE Delta commit.

    kept clips not yet captioned by this checkpoint
      -> map_batches(decode_frames)                      CPU tasks: PyAV decode + sampling
      -> map_batches(Captioner, concurrency=n)           actor pool, model loaded once per actor
                                                         (one GPU each when CUDA is present)
      -> caption_short, caption_dense, caption_model (= checkpoint hash), caption_method (the
         decoding, decoding_key), caption_error
      -> the whole table rewritten as version N+1 with lineage in the commit metadata
         (custom_metadata: spacetime.operation=caption, caption_model, parent_version, code_version,
          counts = rows by status as every commit records them, caption_counts = this run's tally)

Decoding is its own stage so Ray Data streams it ahead of inference: the actors never wait on
PyAV. A clip that fails to decode keeps its previous captions and gets `caption_error`.
Rerunning skips rows already captioned by this checkpoint with this decoding (caption_model and
caption_method); another --method recaptions them. Rows written before caption_method was recorded
(null) count as the default decoding's.
"""
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from captioner.data import clips_path, read_clip_frames, read_clips
from captioner.model import CaptionerConfig, checkpoint_hash

# The table contract's statuses (pipeline/schema.py STATUSES; captioner may not import pipeline)
STATUSES = ("kept", "filtered", "duplicate", "rejected")


class TableMoved(ValueError):
    """The clips table got a new version between reading it and committing the captions."""


def code_version() -> str:
    """Package version + a hash of this package's source, as pipeline.store.code_version computes
    it for curate commits (a submitted Ray job has no .git: SPACETIME_CODE_VERSION wins)."""
    if os.environ.get("SPACETIME_CODE_VERSION"):
        return os.environ["SPACETIME_CODE_VERSION"]
    try:
        ver = metadata.version("spacetime")
    except metadata.PackageNotFoundError:
        ver = "0+unknown"
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return f"{ver}+{h.hexdigest()[:10]}"


def status_counts(table: pa.Table) -> dict[str, int]:
    """Rows by status, every status present: what `datasets list/log` print for a version."""
    counts = dict.fromkeys(STATUSES, 0)
    for d in pc.value_counts(table["status"]).to_pylist():
        if d["values"] is not None:
            counts[d["values"]] = d["counts"]
    return counts


def decode_frames(batch: dict, num_frames: int, size: int, fit: str = "crop") -> dict:
    """Ray Data stage: {"clip_id", "clip_uri"} -> adds "frames" (B, T, S, S, 3) uint8 and "error"
    ("" when the clip decoded; frames are zeros otherwise)."""
    frames = np.zeros((len(batch["clip_id"]), num_frames, size, size, 3), np.uint8)
    errors = []
    for i, uri in enumerate(batch["clip_uri"]):
        try:
            frames[i] = read_clip_frames(str(uri), num_frames, size, fit)
            errors.append("")
        except ValueError as e:
            errors.append(str(e))
    return {"clip_id": batch["clip_id"], "frames": frames, "error": np.array(errors, dtype=object)}


DEFAULT_DECODING = ("beam", 3, None)  # caption_dataset's method, num_beams, max_len defaults


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process drives (a local one is started if none is running). Where
    the actors and Ray Train workers run is decided by these, not by this process's own CUDA: a Ray
    job's driver runs on the head node, often a CPU machine driving GPU workers."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return float(ray.cluster_resources().get("GPU", 0))


def decoding_key(method: str = "beam", num_beams: int = 3, max_len: int | None = None) -> str:
    """The caption_method value: the decoding settings that change the captions, e.g. "beam num_beams=3",
    "greedy", "top_p p=0.9 temperature=1.0 seed=clip_id"; " max_len=N" when not the model's own."""
    key = {"greedy": "greedy", "beam": f"beam num_beams={num_beams}",
           "top_p": "top_p p=0.9 temperature=1.0 seed=clip_id"}[method]  # Captioner seeds top_p by clip id
    return key + (f" max_len={max_len}" if max_len else "")


class Captioner:
    """Ray Data actor: loads the captioner once, captions a batch of decoded clips in both styles."""

    def __init__(self, checkpoint: str, method: str = "beam", num_beams: int = 3, max_len: int | None = None):
        from captioner.model import load_captioner
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tok = load_captioner(checkpoint, self.device)
        self.kw = {"method": method, "num_beams": num_beams, "max_len": max_len or self.model.cfg.max_text_len}

    def __call__(self, batch: dict) -> dict:
        from captioner.decode import describe
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        short = np.full(len(ok), None, dtype=object)
        dense = np.full(len(ok), None, dtype=object)
        if ok.any() and self.kw["method"] == "top_p":
            # sampled clip by clip, seeded by its id: one generator over the batch made a clip's caption
            # depend on which batch (and where in it) the clip landed
            for i in np.flatnonzero(ok):
                frames = torch.from_numpy(np.ascontiguousarray(batch["frames"][i:i + 1]))
                seed = int(hashlib.sha256(str(batch["clip_id"][i]).encode()).hexdigest()[:8], 16)
                short[i] = describe(self.model, self.tok, frames, "short", seed=seed, **self.kw)[0]
                dense[i] = describe(self.model, self.tok, frames, "dense", seed=seed, **self.kw)[0]
        elif ok.any():
            frames = torch.from_numpy(np.ascontiguousarray(batch["frames"][ok]))
            short[ok] = describe(self.model, self.tok, frames, "short", **self.kw)
            dense[ok] = describe(self.model, self.tok, frames, "dense", **self.kw)
        return {"clip_id": batch["clip_id"], "caption_short": short, "caption_dense": dense,
                "error": batch["error"]}


def caption_dataset(dataset_root, checkpoint, version: int | None = None, batch_size: int = 16,
                    concurrency: int = 1, method: str = "beam", num_beams: int = 3,
                    max_len: int | None = None, log=print) -> dict:
    """Caption the kept clips of <dataset_root>/clips at `version` (None = latest) and commit a
    new version. Needs a running Ray (ray.init) or starts a local one.

    Returns {"version": new version or None if nothing to do, "parent_version", "caption_model",
    "captioned", "failed", "skipped"}.
    """
    import ray
    if method not in ("greedy", "beam", "top_p"):  # checked here: in the actors it fails after decoding began
        raise ValueError(f"unknown decoding method {method!r}: greedy, beam or top_p")
    table, parent = read_clips(dataset_root, version)
    latest = DeltaTable(clips_path(dataset_root)).version()
    if parent != latest:
        raise ValueError(f"caption writes a new version on top of the latest ({latest}), not of version "
                         f"{parent}; `spacetime datasets checkout {dataset_root} {parent} --restore` first to "
                         f"caption that state")
    if not (Path(checkpoint) / "model.safetensors").is_file():
        run_dir = (Path(checkpoint) / "checkpoint" / "model.safetensors").is_file()
        raise ValueError(f"{checkpoint} is not a captioner checkpoint (no model.safetensors)"
                         + (f"; the run's checkpoint is {Path(checkpoint) / 'checkpoint'}" if run_dir else ""))
    model_id = checkpoint_hash(checkpoint)
    cfg = CaptionerConfig(**json.loads((Path(checkpoint) / "config.json").read_text()))
    kept = pc.and_(pc.equal(table["status"], "kept"), pc.is_valid(table["clip_id"]))
    method_id = decoding_key(method, num_beams, max_len)
    if "caption_method" in table.column_names:  # null: captioned before it was recorded, by the default
        was = pc.fill_null(table["caption_method"], decoding_key(*DEFAULT_DECODING))
    else:
        was = pa.array([decoding_key(*DEFAULT_DECODING)] * table.num_rows, pa.string())
    done = pc.fill_null(pc.and_(pc.equal(table["caption_model"], model_id), pc.equal(was, method_id)), False)
    todo = table.filter(pc.and_(kept, pc.invert(done))).select(["clip_id", "clip_uri"])
    skipped = int(pc.sum(pc.and_(kept, done)).as_py() or 0)
    summary = {"version": None, "parent_version": parent, "caption_model": model_id, "caption_method": method_id,
               "captioned": 0, "failed": 0, "skipped": skipped}
    if todo.num_rows == 0:
        log(f"caption: nothing to do at version {parent} ({skipped} clips already captioned by {model_id}, "
            f"{method_id})")
        return summary
    use_gpu = cluster_gpus() >= concurrency  # the cluster's: a job's driver may be a CPU head node
    log(f"caption: {todo.num_rows} clips, {concurrency} actor(s) on {'GPU' if use_gpu else 'CPU'}, "
        f"model {model_id}, parent version {parent}")
    results = (ray.data.from_arrow(todo)
               .map_batches(decode_frames, fn_kwargs={"num_frames": cfg.num_frames, "size": cfg.image_size,
                                                      "fit": cfg.frame_fit},
                            batch_size=batch_size, batch_format="numpy", num_cpus=1)
               .map_batches(Captioner, fn_constructor_kwargs={"checkpoint": str(checkpoint), "method": method,
                                                              "num_beams": num_beams, "max_len": max_len},
                            batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
                            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
               .take_all())
    by_id = {r["clip_id"]: r for r in results}
    new_table = _apply(table, by_id, model_id, method_id)
    summary["captioned"] = sum(1 for r in results if not r["error"])
    summary["failed"] = len(results) - summary["captioned"]
    # delta-rs reserves "operation" (it writes "WRITE"), hence the prefixed key. pipeline.store.history
    # JSON-decodes each value: `counts` must be rows by status, as in every other commit, and the
    # code version is JSON-encoded so a bare commit hash such as "1234567" stays a string
    meta = {"spacetime.operation": "caption", "caption_model": model_id, "caption_method": method_id,
            "parent_version": str(parent),
            "code_version": json.dumps(code_version()), "counts": json.dumps(status_counts(new_table)),
            "caption_counts": json.dumps({k: summary[k] for k in ("captioned", "failed", "skipped")})}
    # The overwrite is the whole table as read at `parent`: commit it against that snapshot with
    # Delta's silent retry off, so rows another writer committed meanwhile are never dropped
    try:
        write_deltalake(DeltaTable(clips_path(dataset_root), version=parent), new_table, mode="overwrite",
                        schema_mode="merge",
                        commit_properties=CommitProperties(custom_metadata=meta, max_commit_retries=0))
    except CommitFailedError as e:
        raise TableMoved(f"{dataset_root}: the clips table moved past version {parent} while captioning; "
                         f"run caption again (clips already captioned by {model_id} are skipped)") from e
    summary["version"] = parent + 1
    log(f"caption: wrote version {summary['version']}: {summary['captioned']} captioned, "
        f"{summary['failed']} failed, {skipped} skipped")
    return summary


def _apply(table: pa.Table, by_id: dict, model_id: str, method_id: str) -> pa.Table:
    """New caption columns: results where decoding worked; old captions + caption_error where not."""
    cols = {name: table[name].to_pylist() for name in ("caption_short", "caption_dense", "caption_model")}
    errors = table["caption_error"].to_pylist() if "caption_error" in table.column_names else [None] * table.num_rows
    methods = table["caption_method"].to_pylist() if "caption_method" in table.column_names else [None] * table.num_rows
    for i, cid in enumerate(table["clip_id"].to_pylist()):
        r = by_id.get(cid)
        if r is None:
            continue
        if r["error"]:
            errors[i] = r["error"]
        else:
            cols["caption_short"][i], cols["caption_dense"][i] = r["caption_short"], r["caption_dense"]
            cols["caption_model"][i], methods[i], errors[i] = model_id, method_id, None
    for name, values in cols.items():
        table = table.set_column(table.column_names.index(name), name, pa.array(values, table.schema.field(name).type))
    for name, values in (("caption_method", methods), ("caption_error", errors)):
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))
        else:
            table = table.append_column(name, pa.array(values, pa.string()))
    return table
