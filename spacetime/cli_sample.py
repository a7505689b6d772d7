"""`spacetime sample` (text-to-video / text-to-image: one prompt, or a file of prompts in packed batches)
and `spacetime generate` (the image and video prompting tasks). Prompts are upsampled first. `register(app)` adds both to the spacetime Typer app.

Each writes the video (.mp4) or image (.png) atomically and a JSON sidecar `<out>.json` with what
made it: prompt, upsampled prompt, seed, task, sizes, sampler settings and the checkpoints' sha256.
Bad input is a one-line error and exit status 2; nothing is left half-written.
"""
import json
import math
import warnings
from pathlib import Path
from typing import List, Optional

import typer

TASKS = ("animate", "extend", "loop", "edit", "transition", "image")
SAMPLERS = ("euler", "heun")  # generator.flow's methods (named here: the CLI starts without torch)
TEXT_ENCODER_HELP = ("words (the shapes demo's) | open_clip:<model> | t5:<local dir>: the one precompute used "
                     "(default: the one the checkpoint's training run recorded, else words)")
TEXT_WEIGHTS_HELP = "open_clip text tower weights file: the --text-weights precompute used"


def _fail(msg: str, code: int = 2):
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _text_encoder(name: Optional[str], text_dim: int, weights: Optional[Path] = None,
                  checkpoint: Optional[Path] = None):
    """(text_encoder(list[str]) -> list[(L, text_dim)], its name, its weights). 'words': the fixed
    per-word embeddings the shapes demo trains with (generator.shapes.embed_caption); 'open_clip:<model>'
    (+ weights) / 't5:<dir>': the encoder `spacetime precompute` used for the latents table; None: the
    one the checkpoint's training run recorded, with its weights (else words). A DiT only understands the embeddings it trained on: when its run
    recorded its text encoder's sha, another encoder (or other weights) is refused rather than sampled
    with prompts it cannot read."""
    run = _training_run(checkpoint) if checkpoint is not None else {}
    if name is None or (name == run.get("text_encoder") and weights is None):
        if "text_encoder" not in run and run.get("dataset") and run.get("text_encoder_sha"):
            from spacetime.cli_generator import _text_encoder_of  # a run from before train recorded it
            try:
                run.update(_text_encoder_of(Path(run["dataset"]), run["text_encoder_sha"]))
            except Exception:  # noqa: BLE001 - the dataset moved or is gone: the sha check below still holds
                pass
        name = run.get("text_encoder") or "words"
        weights = weights or (Path(run["text_weights"]) if run.get("text_weights") else None)
    if name == "words":
        from generator.shapes import embed_caption
        enc, sha = None, None
    elif name.startswith(("open_clip:", "t5:")):
        from generator.precompute import TextEncoder
        enc = TextEncoder(name, str(weights) if weights else None)
        sha = enc.sha
    else:
        raise ValueError(f"unknown text encoder {name!r}; use words, open_clip:<model> or t5:<dir>")
    trained = run.get("text_encoder_sha")
    if trained and sha != trained:
        raise ValueError(f"{checkpoint} was trained on text embeddings of encoder sha {trained[:12]}, but "
                         f"--text-encoder {name}{f' --text-weights {weights}' if weights else ''} is "
                         f"{'the shapes-demo word embeddings' if sha is None else f'sha {sha[:12]}'}: pass the "
                         f"--text-encoder and --text-weights that `spacetime precompute` used")
    if enc is None:
        return (lambda prompts: [embed_caption(p, text_dim) for p in prompts]), name, weights
    if enc.dim != text_dim:  # (a run without run.json has no sha to check) else a shape error mid-sampling
        raise ValueError(f"--text-encoder {name} gives {enc.dim}-wide embeddings, the DiT {checkpoint} takes "
                         f"{text_dim}: pass the --text-encoder that `spacetime precompute` used for its latents")
    return (lambda prompts: [e.float() for e in enc(prompts)]), name, weights


def _training_run(checkpoint: Path) -> dict:
    """What `spacetime train` recorded in the checkpoint's run.json (text encoder spec, weights and
    sha among it), or {} without one (a save_dit file, a run trained from Python)."""
    from generator.sample import resolve_checkpoint
    run = resolve_checkpoint(checkpoint).parent / "run.json"
    try:
        return json.loads(run.read_text())
    except (OSError, ValueError):
        return {}


def _load(checkpoint: Path, vae_path: Path):
    import torch

    from generator.sample import load_codec, load_model, resolve_checkpoint, resolve_vae, sha256_file
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, base_tokens = load_model(checkpoint, device)
    vae = load_codec(vae_path, device)
    info = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(resolve_checkpoint(checkpoint)),
            "vae": str(vae_path), "vae_sha256": sha256_file(resolve_vae(vae_path)), "device": device}
    _check_vae(checkpoint, model, vae, info["vae_sha256"])
    return model, vae, base_tokens, info


def _check_vae(checkpoint: Path, model, vae, vae_sha: str) -> None:
    """A DiT only decodes through the VAE whose latents it trained on: another one's latent width died in
    a conv (a traceback), another one of the same width made noise silently. Its run.json (when `spacetime
    train` wrote one) names that VAE's sha256 (precompute's vae_sha)."""
    if vae.cfg.latent_channels != model.cfg.in_channels:
        raise ValueError(f"--vae has {vae.cfg.latent_channels} latent channels, the DiT {checkpoint} takes "
                         f"{model.cfg.in_channels}: pass the VAE whose latents it trained on")
    trained = _training_run(checkpoint).get("vae_sha")
    if trained and trained != vae_sha:
        raise ValueError(f"{checkpoint} was trained on latents of VAE sha {trained[:12]}, but --vae is sha "
                         f"{vae_sha[:12]}: pass the --vae that `spacetime precompute` used")


def _sidecar(out: Path, record: dict) -> Path:
    from generator.sample import write_json
    return write_json(record, out.with_name(out.name + ".json"))


def _upsample(prompts: list[str], upsampler: Optional[Path], seed: int, examples_from: Optional[Path] = None) -> list[str]:
    """Each prompt expanded by the upsampler (loaded once); as written, with one warning, without one.
    examples_from: a dataset root whose (short, dense) captions an LLM upsampler is shown as few-shot
    examples, as `spacetime upsample --dataset` does (a T5 upsampler learned the style in training)."""
    from captioner.upsample import few_shot_examples, load_upsampler, upsample
    if upsampler is not None and not upsampler.is_dir():  # asked for by name: not silently skipped (the
        # sidecar then named it as the upsampler of prompts it never saw)
        raise ValueError(f"--upsampler {upsampler} not found (--no-upsample to use the prompts as written)")
    if examples_from is not None and upsampler is None:
        raise ValueError("--upsample-dataset gives an LLM upsampler its examples: give --upsampler too")
    examples = few_shot_examples(str(examples_from)) if examples_from is not None else ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = load_upsampler(upsampler, examples)
        texts = [upsample(p, backend, seed=seed) for p in prompts] if backend is not None else list(prompts)
    for w in caught:
        typer.echo(f"warning: {w.message}" + (" (--upsampler DIR to expand them, --no-upsample to say so)"
                                               if backend is None else ""), err=True)
    for p, t in zip(prompts, texts if backend is not None else ()):
        typer.echo(f"upsampled prompt: {t}" if len(prompts) == 1 else f"upsampled prompt: {p!r} -> {t}", err=True)
    return texts


def _check_settings(prompt: Optional[str], cfg: float, fps: float, method: str) -> None:
    """Refuse, before anything loads, a blank --prompt (the words encoder failed on it with a traceback),
    a --cfg that is not a number (NaN made a blank video and a sidecar that is not JSON), a bad --fps
    and an unknown --method (refused by the sampler only after the model, VAE and encoder had loaded)."""
    from generator.sample import check_fps
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty: describe the video you want")
    if not math.isfinite(cfg):
        raise ValueError(f"--cfg must be a finite number, got {cfg}")
    check_fps(fps, "--fps")  # refused before sampling, not by the writer after it
    if method not in SAMPLERS:
        raise ValueError(f"--method must be one of {' | '.join(SAMPLERS)}, got {method!r}")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (UTF-8, a byte-order mark allowed); blank lines and lines starting with '#' are skipped."""
    if not path.is_file():
        raise ValueError(f"prompts {path} is a directory, not a file" if path.is_dir() else f"prompts file {path} not found")
    try:  # utf-8-sig: an editor's BOM made the first line a prompt (a '# comment' sampled as one)
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text: {e}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def sample_cmd(prompt: Optional[str] = typer.Option(None, "--prompt", help="what to generate"),
               prompts: Optional[Path] = typer.Option(
                   None, "--prompts", help="a file of prompts, one per line ('#' lines skipped), sampled in packed "
                                           "batches into --out-dir as prompt_<i>.mp4 / .png; each as --prompt with "
                                           "the same --seed would give it"),
               frames: int = typer.Option(17, "--frames", min=1, help="frames (1 = an image; rounded to 1 + 4k)"),
               height: int = typer.Option(256, "--height", min=1, help="pixels (rounded to the patch grid)"),
               width: int = typer.Option(256, "--width", min=1, help="pixels (rounded to the patch grid)"),
               checkpoint: Path = typer.Option(..., "--checkpoint", help="DiT: training checkpoint dir/file or save_dit file"),
               vae: Path = typer.Option(..., "--vae", help="VAE checkpoint (file, or a train-vae output dir)"),
               out: Optional[Path] = typer.Option(None, "--out", help="output .mp4 (or .png for one frame), with --prompt"),
               out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="output directory, with --prompts"),
               batch_size: Optional[int] = typer.Option(
                   None, "--batch-size", min=1, help="--prompts: samples packed into one forward (memory grows with "
                                                     "it); default 8 with CUDA, 1 on CPU (no faster batched there)"),
               no_upsample: bool = typer.Option(False, "--no-upsample", help="use the prompts as written"),
               upsampler: Optional[Path] = typer.Option(None, "--upsampler", help="prompt upsampler dir (T5 or local LLM)"),
               upsample_dataset: Optional[Path] = typer.Option(
                   None, "--upsample-dataset", help="dataset root: its captions are a local LLM upsampler's few-shot examples"),
               seed: int = typer.Option(0, "--seed"),
               steps: int = typer.Option(50, "--steps", min=1),
               cfg: float = typer.Option(4.0, "--cfg", help="classifier-free guidance scale"),
               method: str = typer.Option("euler", "--method", help=" | ".join(SAMPLERS)),
               fps: float = typer.Option(24.0, "--fps"),
               text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help=TEXT_ENCODER_HELP),
               text_weights: Optional[Path] = typer.Option(None, "--text-weights", help=TEXT_WEIGHTS_HELP)):
    """Text-to-video or text-to-image with a trained DiT + VAE: one --prompt into --out, or a --prompts
    file into --out-dir. Prompts are upsampled first (--no-upsample to skip)."""
    from generator.sample import sample_batch, write_video
    try:
        if (prompt is None) == (prompts is None):
            raise ValueError("give one of --prompt (with --out) or --prompts (with --out-dir)")
        _check_settings(prompt, cfg, fps, method)
        if prompt is not None:
            if out is None or out_dir is not None:
                raise ValueError("--prompt writes one file: give --out (not --out-dir)")
            if out.suffix.lower() not in (".mp4", ".png"):
                raise ValueError(f"--out must end in .mp4 or .png, got {out.name!r}")
            asked = [prompt]
        else:
            if out_dir is None or out is not None:
                raise ValueError("--prompts writes one file per prompt: give --out-dir (not --out)")
            asked = read_prompts(prompts)
        texts = list(asked) if no_upsample else _upsample(asked, upsampler, seed, upsample_dataset)
        model, codec, base_tokens, info = _load(checkpoint, vae)
        encode, text_encoder, text_weights = _text_encoder(text_encoder, model.cfg.text_dim, text_weights, checkpoint)
        from generator.sample import fit_size
        fitted = fit_size(codec, model.cfg.patch, frames, height, width, warn=False)[0]
        if prompt is not None and out.suffix.lower() == ".png" and fitted != 1:
            raise ValueError(f"--out {out.name} is an image but this model's patch grid turns --frames {frames} "
                             f"into {fitted} frames: write .mp4")
        # the file type follows the frames the patch grid gives (p_t = 2 turns --frames 1 into a video)
        paths = [out] if prompt is not None else [
            out_dir / f"prompt_{i}{'.png' if fitted == 1 else '.mp4'}" for i in range(len(asked))]
        batch_size = batch_size or (8 if info["device"] == "cuda" else 1)
        for lo in range(0, len(texts), batch_size):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                videos = sample_batch(model, codec, texts[lo:lo + batch_size], frames, height, width, steps, cfg,
                                      [seed] * len(texts[lo:lo + batch_size]), method, base_tokens, encode)
            for w in caught if lo == 0 else ():
                typer.echo(f"warning: {w.message}", err=True)
            for i, video in enumerate(videos, lo):
                write_video(video, paths[i], fps)
                _, T, H, W = video.shape
                _sidecar(paths[i], {"task": "sample", "prompt": asked[i],
                                    "upsampled_prompt": None if no_upsample else texts[i],
                                    "upsampler": None if no_upsample or upsampler is None else str(upsampler),
                                    "upsample_dataset": None if no_upsample or upsample_dataset is None
                                    else str(upsample_dataset),
                                    "seed": seed, "frames": T, "height": H, "width": W, "steps": steps, "cfg": cfg,
                                    "method": method, "fps": fps, "text_encoder": text_encoder,
                                    "text_weights": str(text_weights) if text_weights else None, **info})
                typer.echo(f"wrote {paths[i]} ({T} frames, {W}x{H})")
    except (ValueError, OSError) as e:  # OSError: e.g. text encoder weights that moved
        _fail(str(e))


def generate_cmd(task: str = typer.Option(..., "--task", help="|".join(TASKS)),
                 prompt: str = typer.Option(..., "--prompt", help="what the result should show"),
                 inputs: Optional[List[Path]] = typer.Option(None, "--input", help="image/video input (twice for transition)"),
                 checkpoint: Path = typer.Option(..., "--checkpoint"),
                 vae: Path = typer.Option(..., "--vae", help="VAE checkpoint (file, or a train-vae output dir)"),
                 out: Path = typer.Option(..., "--out", help="output .mp4 (or .png for one frame)"),
                 frames: int = typer.Option(17, "--frames", min=1, help="output frames (edit: the input's)"),
                 height: int = typer.Option(256, "--height", min=1, help="sets the output area (size for image/loop)"),
                 width: int = typer.Option(256, "--width", min=1),
                 direction: str = typer.Option("forward", "--direction", help="extend: forward | backward"),
                 strength: float = typer.Option(0.5, "--strength", help="edit: noise level in (0, 1]"),
                 no_upsample: bool = typer.Option(False, "--no-upsample", help="use the prompt as written"),
                 upsampler: Optional[Path] = typer.Option(None, "--upsampler", help="prompt upsampler dir (T5 or local LLM)"),
                 upsample_dataset: Optional[Path] = typer.Option(
                     None, "--upsample-dataset", help="dataset root: its captions are a local LLM upsampler's few-shot examples"),
                 seed: int = typer.Option(0, "--seed"),
                 steps: int = typer.Option(50, "--steps", min=1),
                 cfg: float = typer.Option(4.0, "--cfg"),
                 method: str = typer.Option("euler", "--method", help=" | ".join(SAMPLERS)),
                 fps: Optional[float] = typer.Option(None, "--fps", help="output frame rate [default: the first "
                                                     "input video's, else 24]"),
                 max_frames: int = typer.Option(129, "--max-frames", help="longest video the model supports"),
                 text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help=TEXT_ENCODER_HELP),
                 text_weights: Optional[Path] = typer.Option(None, "--text-weights", help=TEXT_WEIGHTS_HELP)):
    """Animate an image, extend a video forward/backward, loop, edit (SDEdit) or join two videos."""
    from generator.tasks import INPUTS, run_task
    inputs = list(inputs or [])
    try:
        if task not in INPUTS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        lo, hi = INPUTS[task]
        if not lo <= len(inputs) <= hi:
            raise ValueError(f"task {task} takes {lo if lo == hi else f'{lo} to {hi}'} --input, got {len(inputs)}")
        if out.suffix.lower() not in (".mp4", ".png"):
            raise ValueError(f"--out must end in .mp4 or .png, got {out.name!r}")
        for p in inputs:
            if not p.is_file():
                raise ValueError(f"input {p} not found")
        if fps is None:  # a 30 fps video extended at 24 fps would play its own frames slowed down
            from generator.tasks import input_fps
            fps = (input_fps(inputs[0]) if inputs else None) or 24.0
        _check_settings(prompt, cfg, fps, method)
        text = prompt if no_upsample else _upsample([prompt], upsampler, seed, upsample_dataset)[0]
        model, codec, base_tokens, info = _load(checkpoint, vae)
        from generator.sample import trained_cond_ratios
        mix = trained_cond_ratios(checkpoint)
        if task in ("animate", "extend", "loop", "transition") and mix and not any(
                w for k, w in mix.items() if k != "none"):
            typer.echo(f"warning: {checkpoint} was trained text-only (--cond-mix t2v): it holds the given frames "
                       f"but never learned to continue them; train with --cond-mix tasks for {task}", err=True)
        encode, text_encoder, text_weights = _text_encoder(text_encoder, model.cfg.text_dim, text_weights, checkpoint)
        res = run_task(task, model, codec, text, [str(p) for p in inputs], out, frames, height, width, direction,
                       strength, fps, text_encoder=encode,
                       max_frames=max_frames, steps=steps, cfg_scale=cfg, seed=seed, method=method,
                       base_tokens=base_tokens)
    except (ValueError, OSError) as e:
        _fail(str(e))
    from generator.sample import sha256_file  # the inputs' content: a path alone may since hold another file
    _, T, H, W = res.video.shape
    record = {"task": task, "prompt": prompt, "upsampled_prompt": None if no_upsample else text,
              "upsampler": None if no_upsample or upsampler is None else str(upsampler),
              "upsample_dataset": None if no_upsample or upsample_dataset is None else str(upsample_dataset), "seed": seed,
              "inputs": [str(p) for p in inputs], "input_sha256": [sha256_file(p) for p in inputs], "frames": T, "height": H, "width": W, "steps": steps, "cfg": cfg,
              # what was asked: the output's size follows the input's aspect and the asked area, and edit keeps
              # up to --max-frames input frames, so the output's frames x height x width alone does not reproduce it
              "requested_frames": frames, "requested_height": height, "requested_width": width,
              "max_frames": max_frames,
              "method": method, "fps": fps, "text_encoder": text_encoder,
              "text_weights": str(text_weights) if text_weights else None, "trained_cond_mix": mix, **info}
    if task == "extend":
        record["direction"] = direction
    if task == "edit":
        record["strength"] = strength
    _sidecar(out, record)
    typer.echo(f"wrote {out} ({T} frames, {W}x{H}) and {out.name}.json")


def register(app: typer.Typer) -> None:
    """Add `sample` and `generate` to the spacetime app."""
    app.command("sample", help="Text-to-video / text-to-image with a trained DiT + VAE: one --prompt, or a "
                               "--prompts file sampled in packed batches; the prompt is upsampled first "
                               "(--no-upsample to skip).")(sample_cmd)
    app.command("generate", help="Prompt with images and videos: animate | extend | loop | edit | transition | "
                                 "image; the prompt is upsampled first (--no-upsample to skip).")(generate_cmd)
