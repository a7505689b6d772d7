"""The `spacetime` command line: footage, curate, datasets, demo, and the model stages.

Every command prints one-line errors (no tracebacks for user mistakes) and progress on long work.
Exit status: 0 ok, 1 failure, 2 usage / bad input, 3 finished but some sources were rejected.
"""
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="spacetime: curate video, caption it densely, train a spacetime-patch DiT, generate video.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
datasets_app = typer.Typer(help="Inspect dataset versions (Delta Lake history of <root>/clips).", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


def _register_cluster_commands() -> None:
    from spacetime.cluster import SUBMIT_CONTEXT_SETTINGS, jobs_app, submit_command

    app.command("submit", context_settings=SUBMIT_CONTEXT_SETTINGS,
                help="Submit a command as a Ray job: spacetime submit -- spacetime retrain ...")(submit_command)
    app.add_typer(jobs_app, name="jobs")


_register_cluster_commands()


def _register_model_commands() -> None:
    from spacetime import cli_generator, cli_sample

    cli_generator.register(app)
    cli_sample.register(app)


_register_model_commands()


def fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="src", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, n: int, what: str) -> None:
        bar.n = done
        bar.set_postfix_str(what[-40:])
        bar.refresh()
        if done >= n:
            bar.close()
    return update


def _check_ray_address(address: Optional[str]) -> None:
    """Fail in one line when nothing listens at a "host:port" or "ray://host:port" address: ray.init
    retried a dead one for minutes before its error. "auto"/"local" are Ray's own to resolve."""
    import socket

    hostport = (address or "").removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        fail(f"no Ray cluster answers at --address {address} ({e.strerror or e}): start one "
             f"(`ray up ray_cluster.yaml`, or `ray start --head` here), or leave --address out for a local Ray")


def _quiet_ray() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("ray").setLevel(logging.ERROR)


@app.command()
def footage(out: Path = typer.Option(..., "--out", help="directory to write the videos and ground_truth.json"),
            seed: int = typer.Option(0, help="random seed; the same seed gives the same footage"),
            videos: int = typer.Option(8, min=1, help="number of videos")):
    """Generate the embedded demo footage: Ken-Burns moves over real photos, cuts, fades, text, defects."""
    from pipeline.synthetic import generate_footage, write_captions_file

    if out.exists() and not out.is_dir():
        fail(f"--out {out} is not a directory")
    bar = _progress_bar(videos, "footage")
    gt = generate_footage(out, seed=seed, videos=videos, progress=lambda i, n: bar(i, n, f"video {i}/{n}"))
    caps = write_captions_file(gt, Path(out) / "captions.json")
    typer.echo(f"wrote {videos} videos to {out}\nground truth: {gt}\nteacher captions: {caps}")


def _load_spec(spec: Optional[Path]):
    from pipeline.spec import SpecError, load_spec

    try:
        return load_spec(spec)
    except SpecError as e:
        fail(str(e))


def _print_counts(counts: dict, title: str) -> None:
    typer.echo(f"{title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command()
def curate(sources: List[str] = typer.Argument(..., help="video files, directories, globs, or manifests (.txt, one path per line)"),
           dataset: Path = typer.Option(..., "--dataset", help="dataset root; the table is <root>/clips"),
           spec: Optional[Path] = typer.Option(None, "--spec", help="dataset spec YAML (default: datasets/demo.yaml values)"),
           captions: Optional[Path] = typer.Option(None, "--captions", help="JSON/CSV of existing captions keyed by source + frame range"),
           address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)"),
           rehash: bool = typer.Option(False, "--rehash",
                                       help="hash every source again, even those whose size and mtime say unchanged"),
           retry_rejected: bool = typer.Option(False, "--retry-rejected",
                                               help="curate again the sources rejected only for reasons that may pass "
                                                    "(timeouts, a failed analysis or transcode) and the clips whose "
                                                    "transcode failed; new rows replace them")):
    """Split sources into clips, score, filter and dedup them, and commit a new version of the clips table.

    Re-running on the same sources adds nothing; a killed run resumes where it stopped. Finished
    sources whose size and mtime are unchanged are skipped without hashing or starting Ray. Rejected
    sources count as finished; --retry-rejected tries the transiently failed ones again.
    """
    from pipeline.graph import curate as run_curate

    s = _load_spec(spec)
    if captions is not None and not captions.is_file():
        fail(f"captions file not found: {captions}")
    _quiet_ray()
    from pipeline.sources import expand_sources

    if dataset.exists() and not dataset.is_dir():
        fail(f"--dataset {dataset} is not a directory")
    _check_ray_address(address)
    n = len(expand_sources(list(sources), exclude=dataset))
    if n == 0:
        fail("no video sources found in: " + " ".join(sources))
    typer.echo(f"curating {n} source(s) into {dataset} (spec {s.name}, hash {s.spec_hash()})", err=True)
    if retry_rejected and captions is None:  # the retried clips' rows would lack the teacher captions theirs had
        from pipeline import store
        imported = sorted({h["captions_imported"] for h in store.history(dataset) if h.get("captions_imported")})
        if imported:
            typer.secho(f"warning: earlier runs imported teacher captions ({', '.join(imported)}); the retried "
                        f"clips get none unless you pass --captions", err=True, fg=typer.colors.YELLOW)
    try:
        res = run_curate(list(sources), str(dataset), s, captions=str(captions) if captions else None,
                         progress=_progress_bar(n, "curate"), ray_address=address, rehash=rehash,
                         retry_rejected=retry_rejected)
    except ValueError as e:  # a bad captions file, a weights file the spec names that is missing
        fail(str(e))
    if res.version is None:
        typer.echo(f"nothing new: all {res.sources} source(s) already committed; table unchanged")
        if res.rejected:  # retried, and failed the same way again (the table already says so)
            typer.echo(f"{len(res.rejected)} row(s) rejected again, as the table already records:")
    else:
        typer.echo(f"committed version {res.version} of {dataset / 'clips'}: {res.new_rows} new rows "
                   f"({res.skipped} source(s) skipped as already committed)")
        _print_counts(res.counts, "new rows by status")
    for uri, reason in res.rejected[:20]:
        typer.echo(f"  rejected {uri}: {reason}")
    if res.rejected:
        raise typer.Exit(3)


@app.command("filter")
def refilter_cmd(dataset: Path = typer.Option(..., "--dataset"),
                 spec: Optional[Path] = typer.Option(None, "--spec", help="spec with the new thresholds")):
    """Re-apply filter thresholds and dedup from cached scores (no decoding) as a new version
    (none when no decision changes)."""
    from pipeline import store
    from pipeline.graph import refilter

    s = _load_spec(spec)
    try:
        version, counts = refilter(str(dataset), s)
    except ValueError as e:
        fail(str(e))
    if version is None:
        typer.echo(f"nothing changed: version {store.latest_version(dataset)} already has these decisions "
                   f"(spec hash {s.spec_hash()}); table unchanged")
    else:
        typer.echo(f"committed version {version} (refilter, spec hash {s.spec_hash()})")
    _print_counts(counts, "rows by status")


@app.command()
def report(root: Path = typer.Argument(..., help="dataset root"),
           version: Optional[str] = typer.Option(None, "--version", help="version number or tag (default latest)"),
           out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default <root>/report_v<N>.html)"),
           spec: Optional[Path] = typer.Option(None, "--spec", help="spec whose thresholds to draw (default: the "
                                               "one recorded by the commit that decided that version's statuses)"),
           check: bool = typer.Option(False, "--check", help="also render it in headless Chromium")):
    """Write the curation report: funnel, score histograms with thresholds, contact sheet, duplicates."""
    from spacetime.report import render_check, write_report

    _need_table(root)
    try:
        v = int(version) if version is not None and version.isdigit() else version
        path = write_report(root, v, out, _load_spec(spec) if spec else None)
    except ValueError as e:
        fail(str(e))
    except OSError as e:  # --out names a directory, or a place this user can't write
        fail(f"cannot write the report to {out}: {e}")
    typer.echo(f"wrote {path}")
    if check:
        try:
            ok = render_check(path)
        except FileNotFoundError as e:
            fail(f"cannot check rendering: {e}")
        typer.echo("rendered in headless Chromium: " + ("ok" if ok else "FAILED"))
        if not ok:
            raise typer.Exit(1)


@app.command("train-aesthetic")
def train_aesthetic_cmd(dataset: Path = typer.Option(..., "--dataset", help="dataset root with CLIP embeddings"),
                        labels: Path = typer.Option(..., "--labels", help="JSON {clip_id: score} (1 good, 0 low "
                                                    "quality) or a demo ground_truth.json (defects = 0)"),
                        out: Path = typer.Option(..., "--out", help="safetensors file for the head"),
                        epochs: int = typer.Option(300, min=1), seed: int = typer.Option(0)):
    """Fit the aesthetic MLP head on labelled clips' CLIP embeddings; saves safetensors.

    Use it with `embedding.aesthetic_weights` in a spec and `spacetime filter` (no decoding needed).
    """
    import numpy as np

    from pipeline import store
    from pipeline.embed import train_aesthetic
    from pipeline.graph import aesthetic_labels_from_ground_truth

    _need_table(dataset)
    if out.is_dir():  # checked before training: saving into it failed after
        fail(f"--out {out} is a directory: give the head's file, e.g. {out / 'aesthetic.safetensors'}")
    if not labels.is_file():
        fail(f"labels file not found: {labels}")
    t = store.read_clips(dataset)
    try:
        raw = json.loads(labels.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"cannot read labels file {labels}: {e}")
    if isinstance(raw, dict) and "videos" in raw:
        ids, ys = aesthetic_labels_from_ground_truth(t, raw)
    elif isinstance(raw, dict):
        bad = next((f"{k}: {v!r}" for k, v in raw.items() if not isinstance(v, (int, float)) or not np.isfinite(v)),
                   None)
        if bad:
            fail(f"{labels}: scores must be finite numbers (1 good, 0 low quality); got {bad[:200]}")
        ids, ys = list(raw), [float(v) for v in raw.values()]
    else:
        fail("labels must be a JSON object {clip_id: score} or a ground_truth.json")
    emb = {r["clip_id"]: r["embedding"] for r in t.select(["clip_id", "embedding"]).to_pylist() if r["embedding"]}
    pairs = [(emb[i], y) for i, y in zip(ids, ys) if i in emb]
    if len(pairs) < 4 or len({y for _, y in pairs}) < 2:
        fail(f"need labelled clips of at least two classes with embeddings; found {len(pairs)}")
    x, y = np.asarray([p[0] for p in pairs], np.float32), np.asarray([p[1] for p in pairs], np.float32)
    try:  # its directory made as other commands make their --out's
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write {out}: {e}")
    hist = train_aesthetic(x, y, out, epochs=epochs, seed=seed)
    typer.echo(f"trained aesthetic head on {len(pairs)} clips ({int((y < 0.5).sum())} low quality): "
               f"loss {hist['loss'][0]:.4f} -> {hist['loss'][-1]:.4f}; saved {out}")


# --- captioner ------------------------------------------------------------------------------

def _phrase_pairs(path: Path) -> list:
    """A JSON file holding [[phrase, opposite], ...] -> that list; a clear error otherwise."""
    try:
        pairs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read phrase pairs from {path}: {e}")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(w, str) and w.strip() for w in p)
                                              for p in pairs):
        fail(f"{path}: expected a JSON list of [phrase, opposite] pairs of non-empty strings")
    return pairs


@app.command("train-captioner")
def train_captioner_cmd(dataset: Path = typer.Option(..., "--dataset"),
                        version: Optional[int] = typer.Option(None, "--version", help="table version (default latest)"),
                        out: Path = typer.Option(Path("runs/captioner"), "--out", help="run dir; re-running resumes"),
                        preset: str = typer.Option("small", help="model size preset: tiny | small | base"),
                        steps: int = typer.Option(2000, min=1), batch_size: int = typer.Option(16, min=1),
                        workers: int = typer.Option(0, min=0, help="Ray Train workers (0 = this process)"),
                        short_fraction: Optional[float] = typer.Option(
                            None, min=0.0, max=1.0, help="fraction of batches in the short caption style "
                            "(default: in proportion to the clips that have each style)"),
                        frame_pool: int = typer.Option(1, min=1, help="temporal jitter: decode this many times "
                                                       "the model's frames per clip, show an ordered random subset"),
                        hflip: float = typer.Option(0.0, min=0.0, max=1.0, help="mirror this fraction of clips, "
                                                    "swapping left/right in their captions (screen directions only)"),
                        reverse: float = typer.Option(0.0, min=0.0, max=1.0, help="play this fraction of clips "
                                                      "backwards, swapping each camera move for its opposite in "
                                                      "the caption (camera motion only: a reversed fall is no fall)"),
                        reverse_phrases: Optional[Path] = typer.Option(
                            None, help="JSON file of phrase pairs for --reverse, each a list of a phrase and its opposite "
                            "(\"zooms in on\", \"zooms out from\"); default: the demo captions' camera phrases"),
                        seed: int = typer.Option(0)):
    """Train the video captioner on kept clips' teacher captions (validation split by source video)."""
    from captioner.train import TrainConfig, train_captioner
    from spacetime.cli_generator import need_out_dir

    need_out_dir(out)
    _need_table(dataset)
    pairs = []
    if reverse_phrases:
        pairs = _phrase_pairs(reverse_phrases)
    elif reverse:
        from pipeline.synthetic import REVERSED_MOVES
        pairs = [list(p) for p in REVERSED_MOVES]
    cfg = TrainConfig(preset=preset, steps=steps, batch_size=batch_size, seed=seed, short_fraction=short_fraction,
                      frame_pool=frame_pool, hflip=hflip, reverse=reverse, reverse_swap=pairs)
    try:
        ckpt = train_captioner(str(dataset), version, out, cfg, num_workers=workers, log=typer.echo)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"captioner checkpoint: {ckpt}")


@app.command("caption")
def caption_cmd(dataset: Path = typer.Option(..., "--dataset"),
                checkpoint: Path = typer.Option(..., "--checkpoint", help="captioner checkpoint dir"),
                version: Optional[int] = typer.Option(None, "--version"),
                batch_size: int = typer.Option(16, min=1), concurrency: int = typer.Option(1, min=1),
                method: str = typer.Option("beam", help="greedy | beam | top_p")):
    """Caption every kept clip into caption_short / caption_dense / caption_model: one new version."""
    from captioner.caption import caption_dataset

    _need_table(dataset)
    if not checkpoint.is_dir():
        fail(f"captioner checkpoint not found: {checkpoint}")
    _quiet_ray()
    try:
        s = caption_dataset(str(dataset), str(checkpoint), version, batch_size, concurrency, method, log=typer.echo)
    except ValueError as e:
        fail(str(e))
    typer.echo(json.dumps({k: v for k, v in s.items()}, default=str))


def demo_truths(rows: list[dict], gt: dict) -> dict:
    """{clip_id: attribute truth} for clips of the demo footage, from its ground_truth.json: the
    shot a clip was cut from (by source file name and shot start) gives its subject, its colours
    (the dominant one must be named; any the shot shows may be: `colors_allowed`) and direction."""
    from pipeline.synthetic import colour_truth

    shots = {(v["file"], s["start_frame"]): s for v in gt["videos"] for s in v["shots"]}
    truths = {}
    for r in rows:
        s = shots.get((Path(r["source_uri"]).name, r["shot_start_frame"]))
        if s:
            truths[r["clip_id"]] = {"subject": s["subject"], "colour": colour_truth(s) or None,
                                    "direction": None if s["direction"] == "none" else s["direction"]}
    return truths


@app.command("eval-captioner")
def eval_captioner_cmd(dataset: Path = typer.Option(..., "--dataset", help="a version captioned by the model"),
                       version: Optional[int] = typer.Option(None, "--version"),
                       ground_truth: Optional[Path] = typer.Option(None, "--ground-truth",
                                                                   help="demo ground_truth.json for the attribute check"),
                       checkpoint: Optional[Path] = typer.Option(
                           None, "--checkpoint", help="the captioner checkpoint that wrote the captions: score its "
                           "captions on the sources its training held out (recorded in the checkpoint)"),
                       val_fraction: float = typer.Option(0.1, min=0.0, max=1.0,
                                                          help="without --checkpoint: held-out share of source "
                                                          "videos (as in training)"),
                       seed: int = typer.Option(0), out: Path = typer.Option(Path("eval_captioner.json"), "--out")):
    """BLEU-4, CIDEr, ROUGE-L of our captions against held-out teacher captions (+ attributes on demo footage)."""
    from captioner.data import training_rows
    from captioner.metrics import evaluate
    from captioner.model import checkpoint_hash
    from captioner.train import held_out_sources, split_by_source
    from pipeline import store

    if out.is_dir():  # checked first: writing into it failed after scoring
        fail(f"--out {out} is a directory: give the JSON file, e.g. {out / 'eval_captioner.json'}")
    _need_table(dataset)
    if ground_truth is not None and not ground_truth.is_file():
        fail(f"ground truth not found: {ground_truth}")
    gt = None
    if ground_truth is not None:  # the footage dir also holds captions.json: a list, easily passed here
        try:
            gt = json.loads(ground_truth.read_text())
        except ValueError as e:
            fail(f"cannot read ground truth {ground_truth}: {e}")
        if not isinstance(gt, dict) or not isinstance(gt.get("videos"), list):
            fail(f"{ground_truth} is not a demo ground_truth.json (no \"videos\" list)")
    recorded, model_id = None, None
    if checkpoint is not None:
        try:
            recorded, model_id = held_out_sources(checkpoint), checkpoint_hash(checkpoint)
        except (OSError, ValueError) as e:
            fail(f"cannot read captioner checkpoint {checkpoint}: {e}")
    try:
        t = store.read_clips(dataset, version)
    except ValueError as e:
        fail(str(e))
    # the split is drawn over the rows training drew it over (kept, with a teacher caption), so a
    # source whose clips all failed to caption cannot shift training sources into the held-out side
    pool = training_rows(t).to_pylist()
    # a row whose last captioning failed keeps an older caption (another model's, maybe): not scored
    both = [bool(r["caption_dense"] and r["caption_teacher_dense"] and not r.get("caption_error")
                 and model_id in (None, r["caption_model"])) for r in pool]
    if not any(both):
        fail("no kept clips with both our captions and teacher captions: run `spacetime caption`"
             + (f" with {checkpoint}" if checkpoint else "") + " first")
    if recorded is not None:  # the run's own held-out sources: stable however the table grew since
        held = [r["source_sha256"] in recorded for r in pool]
    else:
        # recomputed on this table: sources added since training can move trained-on ones into it
        if checkpoint is not None:
            typer.secho("warning: the checkpoint predates recorded held-out sources: the split is recomputed "
                        "on this table, and sources added since training can shift it", err=True)
        held = split_by_source([r["source_sha256"] for r in pool], val_fraction, seed)
    rows, scope = [r for r, h, b in zip(pool, held, both) if h and b], "held-out"
    if not rows:
        rows, scope = [r for r, b in zip(pool, both) if b], "clips (no held-out source has both captions: " \
                                                              "these include training clips)"
        typer.secho(f"warning: {scope}", err=True)
    if len(rows) == 1:  # CIDEr's n-gram weights are document frequencies over the scored clips
        typer.secho("warning: one clip scored: CIDEr is 0 by its definition (every n-gram occurs in every "
                    "reference); score more held-out clips (--val-fraction) for a CIDEr that means anything",
                    err=True)
    hyps = {r["clip_id"]: r["caption_dense"] for r in rows}
    refs = {r["clip_id"]: [r["caption_teacher_dense"]] for r in rows}
    truths = demo_truths(rows, gt) if gt is not None else None
    models = sorted({r["caption_model"] for r in rows if r["caption_model"]})
    # held_out false: the fallback scored clips the captioner may have trained on (optimistic scores)
    evaluate(hyps, refs, truths, out_json=out, name=",".join(models) or "captioner",
             info={"held_out": scope == "held-out"})
    typer.echo(f"{len(rows)} {scope}; wrote {out}" + ("" if scope == "held-out" else " (held_out: false)"))


@app.command("train-upsampler")
def train_upsampler_cmd(dataset: Path = typer.Option(..., "--dataset", help="pairs come from caption_short -> caption_dense"),
                        out: Path = typer.Option(Path("runs/upsampler"), "--out"),
                        steps: int = typer.Option(2000, min=1), seed: int = typer.Option(0)):
    """Train the small T5 prompt upsampler on (short -> dense) caption pairs from the table."""
    from captioner.upsample import UpsamplerConfig, train_upsampler

    _need_table(dataset)
    try:
        path = train_upsampler(str(dataset), out, UpsamplerConfig(steps=steps, seed=seed), log=typer.echo)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"upsampler: {path}")


@app.command("upsample")
def upsample_cmd(prompt: str = typer.Argument(..., help="a short prompt, e.g. 'a red car'"),
                 upsampler: Optional[Path] = typer.Option(None, "--upsampler",
                                                          help="T5 upsampler dir or a local instruction LLM dir"),
                 dataset: Optional[Path] = typer.Option(None, "--dataset", help="few-shot examples for an LLM"),
                 seed: int = typer.Option(0)):
    """Expand a short prompt into a dense caption in the dataset's style (unchanged, with a warning, without a backend)."""
    import warnings

    from captioner.upsample import few_shot_examples, load_upsampler, upsample

    # asked for by name, as `sample` does: a missing --upsampler printed the prompt back, exit 0
    if upsampler is not None and not upsampler.is_dir():
        fail(f"--upsampler {upsampler} not found (leave it out to get the prompt as written)")
    if dataset is not None and upsampler is None:
        fail("--dataset gives an LLM upsampler its examples: give --upsampler too")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            examples = few_shot_examples(str(dataset)) if dataset else ()
            model = load_upsampler(str(upsampler), examples) if upsampler else None  # None: one warning, not two
            text = upsample(prompt, model, seed)
        except ValueError as e:
            fail(str(e))
    for w in caught:
        typer.secho(f"warning: {w.message}", err=True, fg=typer.colors.YELLOW)
    typer.echo(text)


# --- workflows ------------------------------------------------------------------------------

@app.command()
def retrain(sources: List[str] = typer.Option(..., "--sources", help="new raw footage: files, dirs, globs, manifests"),
            dataset: Path = typer.Option(..., "--dataset", help="dataset root (a new version is cut)"),
            run: Path = typer.Option(Path("runs/retrain"), "--run", help="run dir: manifest.json, checkpoints, report"),
            spec: Optional[Path] = typer.Option(None, "--spec", help="dataset spec (default datasets/demo.yaml values)"),
            from_checkpoint: Optional[Path] = typer.Option(None, "--from-checkpoint", help="previous DiT run dir to fine-tune"),
            captioner: Optional[Path] = typer.Option(None, "--captioner", help="current captioner checkpoint (else trained)"),
            captions: Optional[Path] = typer.Option(None, "--captions", help="teacher captions to import while curating"),
            previous_run: Optional[Path] = typer.Option(None, "--previous-run", help="run dir to compare samples with"),
            scaling_png: Optional[Path] = typer.Option(None, "--scaling-png", help="scale-study plot to embed in the report"),
            vae: Optional[Path] = typer.Option(None, "--vae", help="current VAE, file or train-vae output dir (default: the --from-checkpoint run's, else trained)"),
            vae_perceptual: Optional[Path] = typer.Option(
                None, "--vae-perceptual", help="local VGG16 weights: the VAE also trains with a perceptual loss"),
            vae_adversarial_weight: float = typer.Option(
                0.0, "--vae-adversarial-weight", min=0.0, help="> 0: the VAE also trains against a 3D PatchGAN "
                                                               "(from half-way through its steps)"),
            dit_grad_accum: int = typer.Option(1, "--dit-grad-accum", min=1,
                                               help="the DiT stage's `train --grad-accum` (batches per optimizer step)"),
            dit_compile: bool = typer.Option(False, "--dit-compile", help="the DiT stage's `train --compile`"),
            text_encoder: Optional[str] = typer.Option(
                None, "--text-encoder", help="caption encoder for the latents and the samples: open_clip:<model> "
                                             "or t5:<local dir> (default open_clip:ViT-B-32)"),
            text_weights: Optional[Path] = typer.Option(
                None, "--text-weights", help="local open_clip weights for --text-encoder (default: its seeded "
                                             "random tower, fine for the demo, not for real prompts)"),
            tiny: bool = typer.Option(False, "--tiny", help="tiny models (the demo's: minutes on 2 CPU cores)")):
    """Footage -> curate -> caption -> VAE -> latents -> DiT -> fixed-prompt samples -> eval -> report.

    Every stage is skipped when its output for the same inputs exists (content hashes in the run's
    manifest.json), so re-running after a crash continues where it stopped.
    """
    from dataclasses import replace

    from spacetime.cli_generator import need_out_dir
    from spacetime.retrain import RetrainConfig, retrain as run_retrain

    _quiet_ray()
    need_out_dir(run, "--run")
    need_out_dir(dataset, "--dataset")
    if spec is not None:
        _load_spec(spec)
    if vae_perceptual is not None and not vae_perceptual.is_file():
        fail(f"perceptual weights not found: {vae_perceptual}")
    if text_weights is not None and not text_weights.is_file():
        fail(f"text encoder weights not found: {text_weights}")
    if captions is not None and not captions.is_file():
        fail(f"captions file not found: {captions}")
    # here, not after curating and training the stages before the one that reads them
    if captioner is not None and not (captioner / "model.safetensors").is_file():
        fail(f"--captioner {captioner} is not a captioner checkpoint (no model.safetensors)")
    if from_checkpoint is not None and not (from_checkpoint / "latest.json").is_file():
        fail(f"--from-checkpoint {from_checkpoint} is not a DiT run dir (no latest.json)")
    if vae is not None and vae.is_dir():  # a train-vae --out dir, as `precompute --vae` takes
        vae = vae / "vae.safetensors"
    if vae is not None and not vae.is_file():
        fail(f"VAE not found: {vae}")
    sizes = replace(RetrainConfig.tiny() if tiny else RetrainConfig(), vae_adversarial_weight=vae_adversarial_weight,
                    vae_perceptual=str(vae_perceptual.resolve()) if vae_perceptual else None,
                    dit_grad_accum=dit_grad_accum, dit_compile=dit_compile,
                    text_weights=str(text_weights.resolve()) if text_weights else None)
    if text_encoder is not None:
        sizes = replace(sizes, text_encoder=text_encoder)
    try:
        stages = run_retrain(str(spec) if spec else None, list(sources), str(dataset), str(run),
                             str(from_checkpoint) if from_checkpoint else None, str(captioner) if captioner else None,
                             sizes, str(captions) if captions else None,
                             str(previous_run) if previous_run else None,
                             str(scaling_png) if scaling_png else None, str(vae) if vae else None, log=typer.echo)
    except (ValueError, RuntimeError) as e:
        fail(str(e), 1)
    lin = stages["_lineage"]["outputs"]
    typer.echo(f"retrain done: dataset version {lin['dataset_version']}, latents version {lin['latents_version']}, "
               f"DiT {lin['dit_checkpoint']} ({lin['dit_checkpoint_sha']}); manifest {run / 'manifest.json'}")


@app.command("scale-study")
def scale_study_cmd(out: Path = typer.Option(Path("runs/scale_study"), "--out"),
                    token_budget: int = typer.Option(60000, "--token-budget", min=1000, help="training tokens per size"),
                    segments: int = typer.Option(6, min=2, help="validation points per curve"),
                    dataset: Optional[Path] = typer.Option(None, "--dataset", help="use this dataset's latents table "
                                                           "(default: the synthetic moving-shapes set)"),
                    latents_version: Optional[int] = typer.Option(None, "--latents-version"),
                    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="tokens per packed batch; "
                                                   "a --dataset's largest latent must fit in one"),
                    seed: int = typer.Option(0)):
    """Train three DiT sizes on the same data and token budget; plot validation loss vs training FLOPs."""
    from spacetime.cli_generator import need_out_dir
    from spacetime.scale_study import SIZES, final_losses, scale_study

    need_out_dir(out)
    train_pairs = val_pairs = None
    if dataset is not None:
        from generator.data import load_pairs

        try:
            pairs = load_pairs(str(dataset), latents_version)
        except ValueError as e:  # no latents table, no such version, several encoder pairs in it
            fail(str(e))
        if len(pairs) < 8:
            fail(f"{dataset}: only {len(pairs)} latents; the study needs at least 8")
        n_val = max(2, len(pairs) // 8)  # held out by clip: the last ones in clip_id order
        train_pairs, val_pairs = pairs[:-n_val], pairs[-n_val:]
    try:
        curves = scale_study(out, train_pairs, val_pairs, token_budget=token_budget, segments=segments,
                             max_tokens=max_tokens, seed=seed, log=typer.echo)
    except ValueError as e:  # a --dataset latent of more tokens than --max-tokens
        fail(str(e))
    losses = final_losses(curves)
    for (name, *_), loss in zip(SIZES, losses):
        typer.echo(f"{name}: {curves[name + '_params'] / 1e6:.2f}M params, final val loss {loss:.4f}")
    typer.echo(f"wrote {out / 'scaling.png'}, {out / 'scaling.csv'}")


# --- datasets -------------------------------------------------------------------------------

def _need_table(root: Path):
    from pipeline import store

    try:
        exists = store.table_exists(root)
    except ValueError as e:  # a path Delta Lake cannot open
        fail(str(e))
    if not exists:
        fail(f"no clips table under {root} (expected {root / 'clips'})")


@datasets_app.command("list")
def datasets_list(directory: Path = typer.Argument(Path("."), help="directory to search for dataset roots")):
    """List dataset roots under a directory with their latest version and counts."""
    from pipeline import store

    if not directory.is_dir():  # a typo: not "no datasets", which reads as searched and empty
        fail(f"{directory} is not a directory")
    found = 0
    for log_dir in sorted(directory.rglob("clips/_delta_log")):
        root = log_dir.parent.parent
        found += 1
        try:  # counted, not read from the latest commit's lineage: a vacuum's commits record none
            counts = store.status_counts(store.read_clips(root, columns=["status"]))
        except ValueError as e:  # one root Delta Lake cannot open does not hide the others
            typer.echo(f"{root}  unreadable: {e}")
            continue
        typer.echo(f"{root}  version {store.latest_version(root)}  " + " ".join(f"{k}={v}" for k, v in counts.items()))
    if not found:
        typer.echo(f"no datasets under {directory}")


@datasets_app.command("log")
def datasets_log(root: Path = typer.Argument(..., help="dataset root"),
                 version: Optional[str] = typer.Option(None, "--version",
                                                       help="only this version (number or tag), with its whole lineage")):
    """Every version with its lineage: operation, spec hash, code version, parent, counts."""
    from datetime import datetime, timezone

    from pipeline import store

    _need_table(root)
    tags = store.read_tags(root)
    by_version = {}
    for name, v in tags.items():
        by_version.setdefault(v, []).append(name)
    history = store.history(root)
    if version is not None:
        try:
            v = store.resolve_ref(root, version)
        except ValueError as e:
            fail(str(e))
        history = [h for h in history if h["version"] == v]
        if not history:
            fail(f"version {v} of {root} has no commit on record")
    for h in reversed(history):
        ts = datetime.fromtimestamp(h["timestamp"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if h.get("timestamp") else "?"
        tag = f"  [{', '.join(by_version[h['version']])}]" if h["version"] in by_version else ""
        typer.echo(f"version {h['version']}  {ts}  {h.get('operation', h.get('mode'))}{tag}")
        typer.echo(f"    parent {h.get('parent_version')}  spec {h.get('spec_hash')}  code {h.get('code_version')}"
                   f"  rows +{h.get('rows_added')}")
        if h.get("counts"):
            typer.echo("    counts " + " ".join(f"{k}={v}" for k, v in h["counts"].items()))
        if version is not None:  # one version: everything its commit recorded (model hashes, spec, sources...)
            typer.echo(json.dumps(h, indent=2, sort_keys=True, default=str))


@datasets_app.command("show")
def datasets_show(root: Path = typer.Argument(...),
                  version: Optional[str] = typer.Option(None, "--version", help="version number or tag (default latest)"),
                  limit: int = typer.Option(20, min=0, help="rows to print"),
                  status: Optional[str] = typer.Option(None, help="only rows with this status")):
    """Print a version's lineage, counts and first rows (Delta time travel)."""
    import pyarrow.compute as pc

    from pipeline import store

    _need_table(root)
    if status is not None and status not in store.STATUSES:  # a typo printed no rows, as if none had it
        fail(f"--status {status}: expected one of {', '.join(store.STATUSES)}")
    try:
        version = store.resolve_ref(root, version) if version is not None else None
        t = store.read_clips(root, version)
    except ValueError as e:
        fail(str(e))
    v = version if version is not None else store.latest_version(root)
    h = next((x for x in store.history(root) if x["version"] == v), {})
    typer.echo(f"{root} version {v}: {t.num_rows} rows; operation {h.get('operation')}; spec {h.get('spec_hash')}")
    _print_counts(store.status_counts(t), "by status")
    if status:
        t = t.filter(pc.equal(t["status"], status))
    cols = ["clip_id", "source_uri", "start_frame", "end_frame", "status", "reason", "caption_short"]
    for r in t.select(cols).slice(0, limit).to_pylist():
        src = Path(r["source_uri"]).name if r["source_uri"] else "?"
        cap = (r["caption_short"] or "")[:50]
        typer.echo(f"  {str(r['clip_id'])[:8]}  {src}[{r['start_frame']}:{r['end_frame']}]  {r['status']}"
                   f"{'  ' + r['reason'] if r['reason'] else ''}{'  “' + cap + '”' if cap else ''}")


@datasets_app.command("diff")
def datasets_diff(root: Path = typer.Argument(...), a: str = typer.Argument(..., help="from version (number or tag)"),
                  b: str = typer.Argument(..., help="to version (number or tag)"),
                  as_json: bool = typer.Option(False, "--json", help="print the full diff as JSON")):
    """Clips added/removed, status, reason and caption changes between two versions."""
    from pipeline import store

    _need_table(root)
    try:
        a, b = store.resolve_ref(root, a), store.resolve_ref(root, b)
        d = store.diff(root, a, b)
    except ValueError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"version {a} -> {b}: +{len(d['added'])} clips, -{len(d['removed'])} clips, "
               f"{len(d['status_changed'])} status changes, {len(d['reason_changed'])} reason changes, "
               f"{len(d['caption_changed'])} caption changes, "
               f"+{len(d['rejected_sources_added'])} -{len(d['rejected_sources_removed'])} rejected sources")
    for cid, (sa, sb) in list(d["status_changed"].items())[:20]:
        typer.echo(f"  {cid[:8]} {sa} -> {sb}")
    for cid, (ra, rb) in list(d["reason_changed"].items())[:20]:
        typer.echo(f"  {cid[:8]} reason {ra!r} -> {rb!r}")


@datasets_app.command("tag")
def datasets_tag(root: Path = typer.Argument(...), name: str = typer.Argument(..., help="tag name, e.g. v1-release"),
                 version: Optional[int] = typer.Option(None, "--version", help="version to tag (default latest)")):
    """Name a version (tags live in <root>/tags.json)."""
    from pipeline import store

    _need_table(root)
    try:
        v = store.tag(root, name, version)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"tagged version {v} as {name}")


@datasets_app.command("checkout")
def datasets_checkout(root: Path = typer.Argument(...), ref: str = typer.Argument(..., help="version number or tag"),
                      out: Optional[Path] = typer.Option(None, "--out", help="write that version's rows as parquet here"),
                      restore: bool = typer.Option(False, "--restore", help="make it the latest version (a new commit)")):
    """Read an old version (by number or tag): export it, or restore it as a new version."""
    from pipeline import store

    _need_table(root)
    try:
        v = store.resolve_ref(root, ref)
        if restore:
            nv = store.restore(root, v)
            typer.echo(f"restored version {v} as new version {nv}")
        if out is not None:
            import pyarrow.parquet as pq

            pq.write_table(store.read_clips(root, v), out)
            typer.echo(f"wrote version {v} to {out}")
        if not restore and out is None:
            _print_counts(store.status_counts(store.read_clips(root, v)), f"version {v}")
    except ValueError as e:
        fail(str(e))
    except OSError as e:  # --out in a missing or unwritable directory: a user mistake, not a crash
        fail(f"cannot write {out}: {e}")


@datasets_app.command("rebuild")
def datasets_rebuild(root: Path = typer.Argument(...),
                     version: str = typer.Option(..., "--version", help="version number or tag"),
                     out: Path = typer.Option(..., "--out", help="fresh dataset root to rebuild into")):
    """Rebuild a version from its recorded specs + sources into a new root and compare the clip sets."""
    from pipeline import store
    from pipeline.graph import rebuild

    _need_table(root)
    if out.exists() and not out.is_dir():  # curate's mkdir of it failed with a traceback after the checks
        fail(f"--out {out} is not a directory")
    _quiet_ray()
    try:
        version = store.resolve_ref(root, version)  # a tag names a release: the version most worth rebuilding
        r = rebuild(str(root), version, str(out))
    except ValueError as e:
        fail(str(e))
    verdict = "identical clip set" if r["same"] else f"{len(r['missing'])} missing, {len(r['extra'])} extra"
    typer.echo(f"rebuilt version {version} of {root} into {out}: {r['clips']} clips, {verdict}")
    if not r["same"]:
        raise typer.Exit(1)


@datasets_app.command("vacuum")
def datasets_vacuum(root: Path = typer.Argument(...),
                    retain_hours: int = typer.Option(168, min=0, help="keep files needed by versions newer than this"),
                    dry_run: bool = typer.Option(True, "--dry-run/--apply", help="only list what would be deleted"),
                    drop_tagged: bool = typer.Option(False, "--drop-tagged",
                                                     help="also delete files a tagged version needs (by default "
                                                          "refused: the tag would stop being readable)")):
    """Delete data files of old versions (explicit retention; time travel past it stops working).
    Refused when a tagged version would lose files, unless --drop-tagged."""
    from pipeline import store

    _need_table(root)
    try:
        files = store.vacuum(root, retain_hours, dry_run, drop_tagged)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"{'would delete' if dry_run else 'deleted'} {len(files)} file(s)")


# --- demo -----------------------------------------------------------------------------------

@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="where footage, dataset, runs and reports go"),
         videos: int = typer.Option(8, min=1), seed: int = typer.Option(0),
         curate_only: bool = typer.Option(False, "--curate-only", help="stop after curation and its report")):
    """End to end on the embedded footage with tiny models: generate footage, curate (split, score,
    filter, dedup), write the curation report, then the retrain workflow: train a captioner and
    caption, train the VAE, precompute latents, train the DiT, sample fixed prompts, evaluate, report."""
    from pipeline import store
    from pipeline.synthetic import generate_footage, write_captions_file
    from spacetime.report import write_report
    from spacetime.retrain import RetrainConfig, retrain as run_retrain

    _quiet_ray()
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foot = out / "footage"
    typer.echo(f"[1/3] generating {videos} demo videos in {foot}")
    bar = _progress_bar(videos, "footage")
    gt = generate_footage(foot, seed=seed, videos=videos, progress=lambda i, n: bar(i, n, f"video {i}/{n}"))
    caps = write_captions_file(gt, foot / "captions.json")
    root = out / "dataset"
    spec_path = Path(__file__).resolve().parent.parent / "datasets" / "demo.yaml"
    s = _load_spec(spec_path if spec_path.is_file() else None)
    if curate_only:
        from pipeline.graph import curate as run_curate

        typer.echo(f"[2/3] curating into {root}")
        run_curate([str(foot)], str(root), s, captions=str(caps), progress=_progress_bar(videos, "curate"))
    else:
        typer.echo(f"[2/3] retrain workflow (tiny models) into {out / 'run'}")
        try:
            run_retrain(str(spec_path) if spec_path.is_file() else None, [str(foot)], str(root), str(out / "run"),
                        cfg=RetrainConfig.tiny(), captions=str(caps), log=typer.echo)
        except (ValueError, RuntimeError) as e:
            fail(str(e), 1)
    typer.echo("[3/3] writing the curation report")
    report_path = write_report(root, None, out / "report.html", s)
    t = store.read_clips(root)
    typer.echo("")
    typer.echo(f"dataset: {root.resolve()}  (Delta table {root.resolve() / 'clips'}, version {store.latest_version(root)})")
    _print_counts(store.status_counts(t), "clips by status")
    typer.echo(f"curation report: {report_path.resolve()}")
    if not curate_only:
        typer.echo(f"retrain report:  {(out / 'run' / 'report.html').resolve()}  (manifest: {out / 'run' / 'manifest.json'})")
        typer.echo(f"samples:         {(out / 'run' / 'samples').resolve()}")
    typer.echo(f"inspect: spacetime datasets log {root}   |   spacetime datasets show {root} --status kept")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
