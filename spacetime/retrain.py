"""End-to-end retrain: footage → curate → caption → VAE → latents → DiT → samples → eval → report.

Each stage is keyed by a content hash of its inputs (spec hash, source file stats, table versions,
checkpoint hashes, configs). The run directory's `manifest.json` records, per stage, that key and
the stage's outputs; a stage whose key matches the manifest and whose outputs still exist is reused,
so a re-run after a crash picks up at the first stage that did not finish (the captioner, VAE and DiT
resume their own last checkpoint when their inputs are unchanged), and a re-run with nothing new
recomputes nothing. The manifest links dataset versions, checkpoints and scores: it is the run's
lineage.
"""
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

FIXED_PROMPTS = (
    "an astronaut in a white spacesuit, the camera pans slowly to the right",
    "a cup of coffee on a table, the camera zooms in",
    "a brick wall in warm light, the camera tilts up",
)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (names + bytes), for checkpoint identity."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Manifest:
    """`<run>/manifest.json`: stage name -> {key, outputs, seconds, finished_at}."""
    path: Path
    stages: dict = field(default_factory=dict)
    reused: list = field(default_factory=list)
    ran: list = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        p = run_dir / "manifest.json"
        stages = json.loads(p.read_text())["stages"] if p.is_file() else {}
        return cls(p, stages)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=2, default=str))
        os.replace(tmp, self.path)  # a crash mid-write leaves the previous manifest intact

    def run(self, name: str, inputs: dict, fn: Callable[[], dict], exists: Callable[[dict], bool] = lambda o: True,
            log: Callable[[str], None] = print) -> dict:
        """Run `fn` unless this stage already finished with the same inputs; returns its outputs."""
        key = _hash(inputs)
        prev = self.stages.get(name)
        if prev and prev["key"] == key and exists(prev["outputs"]):
            log(f"[{name}] reused (inputs {key} unchanged)")
            self.reused.append(name)
            return prev["outputs"]
        log(f"[{name}] running")
        t0 = time.time()
        outputs = fn()
        self.stages[name] = {"key": key, "inputs": inputs, "outputs": outputs,
                             "seconds": round(time.time() - t0, 2), "finished_at": time.time()}
        self.ran.append(name)
        self.save()
        return outputs


def stage_dir(path: Path, inputs: dict) -> Path:
    """`path` as the working dir of a stage with these inputs: kept when an interrupted run of the same
    inputs left it (the stage's own resume picks it up), emptied otherwise, so a stage whose inputs
    changed never resumes another run's state. The inputs' key sits beside it in `<path>.inputs`."""
    import shutil

    marker, key = path.with_name(path.name + ".inputs"), _hash(inputs)
    if not (marker.is_file() and marker.read_text() == key):
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
    return path


def stage_dir_holds(path: Path, inputs: dict) -> bool:
    """Whether `path` still holds the stage of these inputs: False once a run of other inputs took it
    (stage_dir rewrote the marker) and was killed before finishing, which leaves that run's state under
    the paths the manifest names. A dir without a marker (a run dir made before the VAE and DiT had
    one) is taken as it is."""
    marker = path.with_name(path.name + ".inputs")
    return not marker.is_file() or marker.read_text() == _hash(inputs)


def resume_flag(ckpt_dir: Path) -> list[str]:
    """["--resume"] when `ckpt_dir` holds a checkpoint (`latest.json`) an interrupted run of the same
    inputs left (stage_dir kept it): train-vae and train refuse an existing checkpoint without it."""
    return ["--resume"] if (ckpt_dir / "latest.json").is_file() else []


def ckpt_every(steps: int) -> str:
    """Checkpoint about ten times a run (not only at its end), so a killed stage loses little."""
    return str(max(50, steps // 10))


def sources_fingerprint(source_args: list[str], root: Optional[str] = None) -> list:
    """(path, size, mtime) of every source (not the clips of dataset `root`, which curate skips too):
    a cheap stand-in for content hashes to decide reuse."""
    from pipeline.sources import expand_sources

    out = []
    for s in expand_sources(source_args, exclude=root):
        try:
            st = os.stat(s.uri)
            out.append((s.uri, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((s.uri, None, None))
    return out


@dataclass
class RetrainConfig:
    """Sizes for one retrain. `tiny()` is the demo's: minutes on 2 CPU cores."""
    captioner_steps: int = 2000
    captioner_preset: str = "small"
    vae_steps: int = 2000
    vae_channels: str = "64,128,256,256"
    vae_size: int = 64
    vae_frames: int = 9
    vae_perceptual: str | None = None   # local VGG16 weights: train-vae --perceptual
    vae_adversarial_weight: float = 0.0  # > 0: train-vae --adversarial-weight, the discriminator from half-way
    text_encoder: str = "open_clip:ViT-B-32"
    text_weights: str | None = None   # local open_clip weights (None: the seeded random tower)
    short_sides: str = "64,128,256"
    dit_steps: int = 5000
    dit_preset: str = "DiT_S"
    max_tokens: int = 4096
    dit_grad_accum: int = 1   # `spacetime train --grad-accum`
    dit_compile: bool = False  # `spacetime train --compile` on CPU too (CUDA compiles by default; not in the key)
    cond_mix: str = "tasks"  # `spacetime train --cond-mix`: the DiT also learns animate/extend/loop/transition
    sample_frames: int = 9
    sample_size: int = 64
    sample_steps: int = 30
    prompts: tuple = FIXED_PROMPTS
    seed: int = 0

    @classmethod
    def tiny(cls) -> "RetrainConfig":
        return cls(captioner_steps=150, captioner_preset="tiny", vae_steps=150, vae_channels="16,32,32", vae_size=32,
                   vae_frames=5, short_sides="32", dit_steps=150, dit_preset="DiT_T", max_tokens=1024,
                   sample_frames=5, sample_size=32, sample_steps=10)


def train_vae_stage(cfg: RetrainConfig, root: str, version: int, out: Path) -> tuple[dict, list[str]]:
    """(the stage's inputs, for its reuse key; the `spacetime train-vae` arguments)."""
    inputs = {"dataset_version": version, "steps": cfg.vae_steps, "channels": cfg.vae_channels,
              "size": cfg.vae_size, "frames": cfg.vae_frames, "seed": cfg.seed}
    args = ["train-vae", "--dataset", root, "--version", str(version), "--out", str(out), "--steps", str(cfg.vae_steps),
            "--channels", cfg.vae_channels, "--size", str(cfg.vae_size), "--frames", str(cfg.vae_frames),
            "--seed", str(cfg.seed), "--ckpt-every", ckpt_every(cfg.vae_steps)]
    if cfg.vae_perceptual:  # keyed by the weights' content, not their path
        inputs["perceptual"] = file_hash(cfg.vae_perceptual)
        args += ["--perceptual", cfg.vae_perceptual]
    if cfg.vae_adversarial_weight > 0:
        inputs["adversarial_weight"] = cfg.vae_adversarial_weight
        args += ["--adversarial-weight", str(cfg.vae_adversarial_weight), "--disc-start", str(cfg.vae_steps // 2)]
    return inputs, args


def train_dit_stage(cfg: RetrainConfig, root: str, latents_version: int, out: Path, vae_sha: str,
                    from_checkpoint: str | None, text_sha: str | None = None) -> tuple[dict, list[str]]:
    """(the stage's inputs, for its reuse key; the `spacetime train` arguments). text_sha: the caption
    encoder's, which picks its rows when the latents table holds embeddings of several."""
    inputs = {"latents_version": latents_version, "preset": cfg.dit_preset, "steps": cfg.dit_steps, "seed": cfg.seed,
              "cond_mix": cfg.cond_mix, "max_tokens": cfg.max_tokens}
    args = ["train", "--dataset", root, "--latents-version", str(latents_version), "--out", str(out),
            "--preset", cfg.dit_preset, "--steps", str(cfg.dit_steps), "--max-tokens", str(cfg.max_tokens),
            "--lr", "1e-3" if cfg.dit_preset == "DiT_T" else "2e-4", "--warmup-steps", "20",
            "--seed", str(cfg.seed), "--vae-sha", vae_sha, "--cond-mix", cfg.cond_mix,
            "--ckpt-every", ckpt_every(cfg.dit_steps)]
    if from_checkpoint:
        args += ["--init-from", str(from_checkpoint)]
    if text_sha:  # the rows are pinned by the latents version + the encoder choice already keyed there
        args += ["--text-encoder-sha", text_sha]
    if cfg.dit_grad_accum > 1:  # keyed only when used, so earlier runs' keys still match
        inputs["grad_accum"] = cfg.dit_grad_accum
        args += ["--grad-accum", str(cfg.dit_grad_accum)]
    if cfg.dit_compile:  # same results to rounding: not part of the key
        args += ["--compile"]
    return inputs, args


def spacetime_cmd(args: list[str], log_file: Path, log: Callable[[str], None]) -> str:
    """Run one `spacetime ...` stage in its own process (its memory and Ray session end with it);
    output goes to log_file; a failure raises with the log's tail."""
    import subprocess
    import sys

    log_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"  $ spacetime {' '.join(args)}")
    # this checkout first; the caller's own entries kept (a job's working dir, site extras)
    pythonpath = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))
    with log_file.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "spacetime.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": pythonpath})
    text = log_file.read_text()
    if proc.returncode not in (0, 3):  # 3: finished, some inputs rejected (recorded as data)
        raise RuntimeError(f"stage failed (exit {proc.returncode}): spacetime {' '.join(args)}\n{text[-2000:]}")
    return text


def retrain(spec_path: Optional[str], sources: list[str], dataset: str, run_dir: str,
            from_checkpoint: Optional[str] = None, captioner: Optional[str] = None,
            cfg: RetrainConfig = RetrainConfig(), captions: Optional[str] = None,
            previous_run: Optional[str] = None, scaling_png: Optional[str] = None,
            vae_path: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole workflow; returns the manifest's stages."""
    from pipeline import store
    from pipeline.graph import curate
    from pipeline.spec import load_spec

    run = Path(run_dir).resolve()  # the manifest's paths must not depend on the cwd of a later resume
    run.mkdir(parents=True, exist_ok=True)
    from_checkpoint, captioner, vae_path = (None if p is None else str(Path(p).resolve())
                                            for p in (from_checkpoint, captioner, vae_path))
    if from_checkpoint is not None and Path(from_checkpoint) == run / "dit":
        # the DiT stage empties run/dit before training into it: the checkpoint to fine-tune would be gone
        raise ValueError(f"--from-checkpoint {from_checkpoint} is this run's own DiT dir, which the fine-tune "
                         f"would replace: pass another --run")
    m = Manifest.load(run)
    spec = load_spec(spec_path)
    root = str(Path(dataset).resolve())

    def do_curate():
        from deltalake import DeltaTable

        before = m.stages.get("curate", {}).get("outputs", {})
        res = curate(sources, root, spec, captions=captions,
                     progress=lambda i, n, what: log(f"  curate {i}/{n} {what}"))
        table_id, latest = DeltaTable(store.clips_path(root)).metadata().id, store.latest_version(root)
        version = res.version
        if version is None:  # nothing new (touched sources): the version this run curated before, not
            # the latest (its own caption commit, which would retrain the captioner on the same clips)
            was = before.get("dataset_version") if before.get("table") == table_id else None
            version = was if was is not None and was <= latest else latest
        return {"dataset_version": version, "table": table_id, "new_rows": res.new_rows,
                "counts": store.status_counts(store.read_clips(root, version))}

    # Curating the same sources with the same spec adds nothing (clip ids derive from content), so the
    # key is the sources and the spec; another writer's later versions don't invalidate this stage.
    cur = m.run("curate", {"spec": spec.spec_hash(), "sources": sources_fingerprint(sources, root), "dataset": root,
                           "captions": file_hash(captions) if captions else None},
                do_curate, lambda o: store.latest_version(root) is not None and store.latest_version(root) >= o["dataset_version"],
                log)
    version = cur["dataset_version"]
    # A version number names content only within one table: another dataset root (or a table created
    # afresh in this one) counts from 0 again. Every stage keyed by a version also names the table (by
    # its Delta id, which a moved or copied root keeps), or a run dir pointed at another dataset would
    # reuse the first one's captioner, VAE and latents
    from deltalake import DeltaTable

    table = DeltaTable(store.clips_path(root)).metadata().id

    # -- captioner: the current one if given, else one trained on the teacher captions
    if captioner is None:
        from captioner.train import TrainConfig as CapConfig, train_captioner

        cap_cfg = CapConfig(preset=cfg.captioner_preset, steps=cfg.captioner_steps, seed=cfg.seed,
                            eval_every=max(50, cfg.captioner_steps // 4), ckpt_every=max(50, cfg.captioner_steps // 2))
        cap_in = {"dataset_version": version, "table": table, "cfg": asdict(cap_cfg)}
        out = m.run("train_captioner", cap_in,
                    lambda: {"checkpoint": str(train_captioner(root, version, stage_dir(run / "captioner", cap_in),
                                                               cap_cfg, log=log))},
                    lambda o: Path(o["checkpoint"]).is_dir() and stage_dir_holds(run / "captioner", cap_in), log)
        captioner = out["checkpoint"]
    cap_hash = file_hash(captioner)

    def do_caption():
        from captioner.caption import caption_dataset

        at = max(version, store.latest_version(root))  # caption commits go on top of the latest
        if at != version:
            log(f"  captioning version {at}, the latest (curated {version}; later versions build on it)")
        s = caption_dataset(root, captioner, version=at, log=log)
        return {"dataset_version": s["version"] if s["version"] is not None else at, **s}

    cap = m.run("caption", {"dataset_version": version, "table": table, "captioner": cap_hash}, do_caption,
                lambda o: store.latest_version(root) >= o["dataset_version"], log)
    version = cap["dataset_version"]
    logs = run / "logs"

    # -- video compression network, trained on this version's kept clips
    vae_dir = run / "vae"
    vae_in, vae_args = train_vae_stage(cfg, root, version, vae_dir)
    vae_in["table"] = table

    def do_vae():  # an interrupted run of these inputs is resumed; other inputs start afresh
        stage_dir(vae_dir, vae_in)
        spacetime_cmd(vae_args + resume_flag(vae_dir / "ckpt"), logs / "train_vae.log", log)
        return {"vae": str(vae_dir / "vae.safetensors"), "vae_sha": file_hash(vae_dir / "vae.safetensors"),
                **json.loads((vae_dir / "vae.json").read_text())}

    if vae_path is None and from_checkpoint:
        # Fine-tuning: the DiT only understands the latent space it was trained in, so keep its VAE.
        prev = Path(from_checkpoint).parent / "manifest.json"
        if prev.is_file():
            stages = json.loads(prev.read_text())["stages"]
            vae_path = stages.get("_lineage", {}).get("outputs", {}).get("vae") or \
                stages.get("train_vae", {}).get("outputs", {}).get("vae")
            if vae_path is None:
                raise ValueError(f"{prev} names no VAE (an unfinished run?): pass the DiT's VAE with --vae")
            vae_path = str(Path(vae_path).resolve())
    if vae_path is not None:
        from generator.train import sha256_file

        vae = {"vae": str(vae_path), "vae_sha": file_hash(vae_path), "sha256": sha256_file(vae_path)}
        log(f"[train_vae] using the given VAE {vae_path}")
    else:
        vae = m.run("train_vae", vae_in, do_vae, lambda o: Path(o["vae"]).is_file() and stage_dir_holds(vae_dir, vae_in),
                    log)

    # -- latents + caption embeddings
    text_args = ["--text-encoder", cfg.text_encoder] + (["--text-weights", cfg.text_weights] if cfg.text_weights else [])

    def do_precompute():  # --replace: rows an earlier run made under other settings would not be this stage's
        spacetime_cmd(["precompute", "--dataset", root, "--version", str(version), "--vae", vae["vae"],
                       *text_args, "--short-sides", cfg.short_sides, "--replace"], logs / "precompute.log", log)
        from deltalake import DeltaTable

        return {"latents_version": DeltaTable(str(Path(root) / "latents")).version()}

    lat_in = {"dataset_version": version, "table": table, "vae": vae["vae_sha"], "text": cfg.text_encoder,
              "short_sides": cfg.short_sides}
    if cfg.text_weights:  # keyed by the weights' content, and only when given: earlier runs' keys still match
        lat_in["text_weights"] = file_hash(cfg.text_weights)
    def text_sha():  # which embeddings the DiT trains on, when the table holds several encoders'
        from generator.precompute import TextEncoder
        return TextEncoder(cfg.text_encoder, cfg.text_weights).sha

    def latents_exist(o):  # a latents table deleted since (or never in this root) is precomputed again
        return DeltaTable.is_deltatable(str(Path(root) / "latents")) and \
            DeltaTable(str(Path(root) / "latents")).version() >= o["latents_version"]

    lat = m.run("precompute", lat_in, lambda: {**do_precompute(), "text_encoder_sha": text_sha()}, latents_exist, log)

    # -- the DiT: fine-tuned from the previous checkpoint when given
    dit_dir = run / "dit"
    prev = file_hash(Path(from_checkpoint) / "latest.json") if from_checkpoint else None

    def do_train():  # an interrupted run of these inputs is resumed; other inputs start afresh
        stage_dir(dit_dir, dit_key)
        spacetime_cmd(dit_args + resume_flag(dit_dir), logs / "train.log", log)
        hist = [json.loads(line) for line in (dit_dir / "history.jsonl").read_text().splitlines() if line.strip()]
        return {"checkpoint": str(dit_dir), "checkpoint_sha": file_hash(dit_dir / "latest.json"),
                "losses": [h["loss"] for h in hist], "from_checkpoint": from_checkpoint, "from_checkpoint_sha": prev}

    dit_inputs, dit_args = train_dit_stage(cfg, root, lat["latents_version"], dit_dir, vae["sha256"], from_checkpoint,
                                           lat.get("text_encoder_sha") or text_sha())
    dit_key = {**dit_inputs, "table": table, "from": prev}
    dit = m.run("train", dit_key, do_train,
                lambda o: (Path(o["checkpoint"]) / "latest.json").is_file() and stage_dir_holds(dit_dir, dit_key), log)

    # -- a fixed prompt set, sampled with a fixed seed: comparable before/after a retrain
    def do_sample():  # one process, one model load for the whole prompt set
        if any(len(p.strip().splitlines()) != 1 or p.strip().startswith("#") for p in cfg.prompts):
            raise ValueError(f"sample prompts must be single non-empty lines not starting with '#': {cfg.prompts}")
        out_dir = run / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("prompt_*"):  # an earlier sampling's files: the type below is read off what exists
            old.unlink()
        listed = out_dir / "prompts.txt"
        listed.write_text("".join(p.strip() + "\n" for p in cfg.prompts), encoding="utf-8")
        spacetime_cmd(["sample", "--prompts", str(listed), "--out-dir", str(out_dir), "--no-upsample",
                       "--checkpoint", dit["checkpoint"], "--vae", vae["vae"], *text_args,
                       "--frames", str(cfg.sample_frames), "--height", str(cfg.sample_size),
                       "--width", str(cfg.sample_size), "--steps", str(cfg.sample_steps), "--seed", str(cfg.seed)],
                      logs / "sample.log", log)
        # .png or .mp4, as `sample` chose from the frames the patch grid gives (p_t = 2 makes 1 frame a video)
        return {"samples": [str(next(p for p in (out_dir / f"prompt_{i}.png", out_dir / f"prompt_{i}.mp4")
                                     if p.is_file())) for i in range(len(cfg.prompts))]}

    smp = m.run("sample", {"checkpoint": dit["checkpoint_sha"], "prompts": list(cfg.prompts), "seed": cfg.seed,
                           "size": [cfg.sample_frames, cfg.sample_size], "steps": cfg.sample_steps}, do_sample,
                lambda o: all(Path(p).is_file() for p in o["samples"]), log)

    # -- evaluation: loss fell during training; samples exist and are not blank
    def do_eval():
        import av
        import numpy as np

        losses = dit["losses"]
        k = max(1, len(losses) // 10)
        stats = []
        for p in smp["samples"]:
            with av.open(p) as c:
                frames = [f.to_ndarray(format="rgb24").astype(np.float32) for f in c.decode(video=0)]
            v = np.stack(frames)
            stats.append({"file": p, "frames": len(frames), "pixel_std": float(v.std()),
                          "temporal_change": float(np.abs(np.diff(v, axis=0)).mean()) if len(frames) > 1 else 0.0})
        return {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
                "loss_fell": bool(np.mean(losses[-k:]) < np.mean(losses[:k])), "samples": stats}

    # keyed by the samples' bytes: regenerated samples keep their file names
    ev = m.run("evaluate", {"checkpoint": dit["checkpoint_sha"], "samples": [file_hash(p) for p in smp["samples"]]},
               do_eval, lambda o: True, log)
    m.stages["_lineage"] = {"key": "", "outputs": {
        "dataset": root, "dataset_version": version, "captioner": cap_hash, "captioner_path": str(captioner),
        "vae": vae["vae"], "vae_sha": vae["vae_sha"], "latents_version": lat["latents_version"], "dit_checkpoint": dit["checkpoint"],
        "dit_checkpoint_sha": dit["checkpoint_sha"], "from_checkpoint": from_checkpoint, "eval": ev}}
    m.save()
    from spacetime.report import write_retrain_report

    report = write_retrain_report(run, previous_run, scaling_png=scaling_png)
    log(f"[report] {report}")
    return m.stages
