"""End-to-end retrain: footage → curate → caption → VAE → latents → DiT → samples → eval → report.

Each stage is keyed by a content hash of its inputs (spec hash, source file stats, table versions,
checkpoint hashes, configs). The run directory's `manifest.json` records, per stage, that key and
the stage's outputs; a stage whose key matches the manifest and whose outputs still exist is reused,
so a re-run after a crash picks up at the first stage that did not finish, and a re-run with nothing
new recomputes nothing. The manifest links dataset versions, checkpoints and scores: it is the run's
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


def sources_fingerprint(source_args: list[str]) -> list:
    """(path, size, mtime) of every source: a cheap stand-in for content hashes to decide reuse."""
    from pipeline.sources import expand_sources

    out = []
    for s in expand_sources(source_args):
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
    dit_steps: int = 5000
    dit_preset: str = "DiT_S"
    sample_frames: int = 9
    sample_size: int = 64
    sample_steps: int = 30
    seed: int = 0

    @classmethod
    def tiny(cls) -> "RetrainConfig":
        return cls(captioner_steps=150, captioner_preset="tiny", vae_steps=150, dit_steps=200,
                   dit_preset="DiT_T", sample_frames=5, sample_size=32, sample_steps=12)


def retrain(spec_path: Optional[str], sources: list[str], dataset: str, run_dir: str,
            from_checkpoint: Optional[str] = None, captioner: Optional[str] = None,
            cfg: RetrainConfig = RetrainConfig(), captions: Optional[str] = None,
            log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole workflow; returns the manifest's stages."""
    from pipeline import store
    from pipeline.graph import curate
    from pipeline.spec import load_spec

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    m = Manifest.load(run)
    spec = load_spec(spec_path)
    root = str(Path(dataset).resolve())

    def do_curate():
        res = curate(sources, root, spec, captions=captions,
                     progress=lambda i, n, what: log(f"  curate {i}/{n} {what}"))
        return {"dataset_version": store.latest_version(root), "new_rows": res.new_rows,
                "counts": store.status_counts(store.read_clips(root))}

    cur = m.run("curate", {"spec": spec.spec_hash(), "sources": sources_fingerprint(sources),
                           "table_version_before": store.latest_version(root) if store.table_exists(root) else None,
                           "captions": file_hash(captions) if captions else None},
                do_curate, lambda o: store.latest_version(root) is not None and store.latest_version(root) >= o["dataset_version"],
                log)
    version = cur["dataset_version"]

    # -- captioner: the current one if given, else one trained on the teacher captions
    if captioner is None:
        from captioner.train import TrainConfig as CapConfig, train_captioner

        cap_cfg = CapConfig(preset=cfg.captioner_preset, steps=cfg.captioner_steps, seed=cfg.seed,
                            eval_every=max(50, cfg.captioner_steps // 4), ckpt_every=max(50, cfg.captioner_steps // 2))
        out = m.run("train_captioner", {"dataset_version": version, "cfg": asdict(cap_cfg)},
                    lambda: {"checkpoint": str(train_captioner(root, version, run / "captioner", cap_cfg, log=log))},
                    lambda o: Path(o["checkpoint"]).is_dir(), log)
        captioner = out["checkpoint"]
    cap_hash = file_hash(captioner)

    def do_caption():
        from captioner.caption import caption_dataset

        s = caption_dataset(root, captioner, version=version, log=log)
        return {"dataset_version": s["version"] if s["version"] is not None else version, **s}

    cap = m.run("caption", {"dataset_version": version, "captioner": cap_hash}, do_caption,
                lambda o: store.latest_version(root) >= o["dataset_version"], log)
    m.stages["_lineage"] = {"key": "", "outputs": {"dataset_version": cap["dataset_version"], "captioner": cap_hash,
                                                   "captioner_path": str(captioner)}}
    m.save()
    return m.stages
