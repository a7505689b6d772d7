"""Generator commands of the `spacetime` CLI: train-vae, precompute, train.

    spacetime train-vae  --dataset ROOT [--version N] --out runs/vae [--steps 500 --frames 9 --size 64]
                         [--perceptual vgg16.safetensors] [--adversarial-weight 0.1 --disc-start 2000] [--workers K]
    spacetime precompute --dataset ROOT --version N --vae runs/vae [--text-encoder open_clip:ViT-B-32] [--replace]
    spacetime train      --dataset ROOT --latents-version M --out runs/dit [--preset DiT_XS] [--workers K]

`register(app)` adds them to the main typer app (spacetime/cli.py). Errors are one line on stderr
with exit status 2 (bad input) or 1 (failure); precompute exits 3 when some kept clips have no latent
because they could not be read (this run or, per its error log, before), and 1 when some ran out of
memory (those are not logged as unreadable: a rerun retries them).
The VAE (generator.vae_train) and the DiT (generator.train) train in this process, or over K Ray
Train TorchTrainer workers (DDP; FSDP as an option for the DiT) with --workers K.
"""
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer


def _fail(msg: str, code: int = 2):
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _ints(text: str, what: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        _fail(f"{what} must be comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        _fail(f"{what} must be positive integers, got {text!r}")
    return vals


def need_out_dir(path: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output directory that names an existing file (mkdir failed on it
    with a traceback, after the decoding or training before it)."""
    if path.exists() and not path.is_dir():
        _fail(f"{flag} {path} is not a directory")


def _latest_clips_version(root: Path) -> int:
    from deltalake import DeltaTable

    path = str(root / "clips")
    if not DeltaTable.is_deltatable(path):
        _fail(f"no clips table under {root}")
    return DeltaTable(path).version()


def _vae_file(path: Path) -> Path:
    """A VAE checkpoint: the file, or vae.safetensors inside a train-vae output dir."""
    p = path / "vae.safetensors" if path.is_dir() else path
    if not p.is_file():
        _fail(f"VAE checkpoint not found: {p}")
    return p


def _write_json(path: Path, obj: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)  # a crash mid-write leaves the previous file intact


def _preset_config(name: str, **kw):
    """DiTConfig of a size preset (DiT_T, DiT-XS, ...), built on the meta device: no weights allocated."""
    import torch

    from generator.dit import DiT_models

    key = name.replace("_", "-")
    if key not in DiT_models:
        _fail(f"unknown preset {name!r}; choose one of {', '.join(k.replace('-', '_') for k in DiT_models)}")
    with torch.device("meta"):
        return DiT_models[key](**kw).cfg


def _fit_on_workers(loop, config: dict, workers: int, out: Path, name: str) -> dict:
    """Run `loop(config)` on `workers` Ray Train TorchTrainer workers (DDP process group set up by
    Ray), one GPU each when the cluster has a GPU per worker (decided by the cluster, not this process:
    a job's driver may be a CPU head node); returns the last reported metrics. A worker's failure is
    one error line, exit 1."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from generator.train import cluster_gpus
    gpus = cluster_gpus()
    use_gpu = gpus >= workers
    typer.echo(f"{name}: {workers} Ray Train worker(s) on {'GPU' if use_gpu else 'CPU'} (cluster GPUs: {gpus:g})")

    trainer = TorchTrainer(loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                           run_config=RunConfig(name=name, storage_path=str((out / "ray").resolve())))
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - a worker's failure, in one line
        _fail(f"distributed training failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1)
    return result.metrics or {}  # Ray Train may keep no metrics of a run that reported no checkpoint


def train_vae_cmd(
        dataset: Path = typer.Option(..., "--dataset", help="dataset root holding the clips table"),
        version: Optional[int] = typer.Option(None, "--version", help="clips table version (default: latest)"),
        out: Path = typer.Option(..., "--out", help="directory for vae.safetensors, vae.json and ckpt/ (resumable state)"),
        steps: int = typer.Option(500, "--steps", min=1, help="optimizer steps (in all, a resumed run included)"),
        frames: int = typer.Option(9, "--frames", min=1, help="frames per training clip (1 + 4k)"),
        size: int = typer.Option(64, "--size", min=8, help="training crop size in pixels (square, a multiple of the space factor)"),
        channels: str = typer.Option("64,128,256,256", "--channels", help="VAE stage widths; len-1 2x spatial downsamplings"),
        latent_channels: int = typer.Option(4, "--latent-channels", min=1),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="clips per step (per worker)"),
        lr: float = typer.Option(1e-3, "--lr"),
        kl_weight: float = typer.Option(1e-4, "--kl-weight", min=0.0),
        perceptual: Optional[Path] = typer.Option(
            None, "--perceptual", help="local VGG16 weights (torchvision state dict, .safetensors or .pth): adds an "
                                       "LPIPS-style perceptual loss"),
        perceptual_lin: Optional[Path] = typer.Option(
            None, "--perceptual-lin", help="LPIPS linear-layer weights (the lpips package's vgg.pth); default: "
                                           "every channel weighs the same"),
        perceptual_weight: float = typer.Option(0.1, "--perceptual-weight", min=0.0),
        adversarial_weight: float = typer.Option(
            0.0, "--adversarial-weight", min=0.0, help="> 0: train a 3D PatchGAN discriminator too (VQGAN's hinge "
                                                       "loss, adaptive weight)"),
        disc_start: int = typer.Option(0, "--disc-start", min=0, help="reconstruction-only steps before the discriminator starts"),
        max_clips: int = typer.Option(256, "--max-clips", min=1, help="decode at most this many kept clips"),
        max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="stop training after this long"),
        ckpt_every: int = typer.Option(0, "--ckpt-every", min=0, help="checkpoint every N steps (0: at the end)"),
        resume: bool = typer.Option(False, "--resume", help="continue the checkpoint in --out/ckpt exactly"),
        workers: int = typer.Option(1, "--workers", min=1, help="Ray Train TorchTrainer workers (DDP) when > 1"),
        seed: int = typer.Option(0, "--seed")):
    """Train the causal video VAE on kept clips' frames (centre crops), then set its latent shift and scale."""
    import torch

    from generator.precompute import sha256_file
    from generator.train import CheckpointError, prefixed, read_checkpoint_file
    from generator.vae import VAE, VAEConfig, load_state_strict, psnr, save_vae
    from generator.vae_train import VAETrainConfig, load_training_videos, train_vae

    need_out_dir(out)
    root = dataset.resolve()
    version = _latest_clips_version(root) if version is None else version
    ch = _ints(channels, "--channels")
    for p in (perceptual, perceptual_lin):
        if p is not None and not p.is_file():
            _fail(f"perceptual weights not found: {p}")
    ckpt = out / "ckpt"
    if (ckpt / "latest.json").is_file() and not resume:
        _fail(f"{out} already holds a VAE checkpoint: pass --resume to continue it, or choose another --out")
    torch.manual_seed(seed)  # the initial weights (Ray workers build theirs under the same seed)
    try:
        cfg = VAEConfig(channels=ch, latent_channels=latent_channels, time_downsample=min(2, len(ch) - 1))
        vae = VAE(cfg)
        vae.latent_shape(frames, size, size)  # validates frames = 1 + 4k and size % space factor
        x, short, bad = load_training_videos(root, version, frames, size, cfg.space_factor, max_clips,
                                             warn=lambda m: typer.secho(m, err=True))
    except ValueError as e:
        _fail(str(e))
    if x is None:
        _fail(f"no kept clip of version {version} has {frames} readable frames ({short} too short, {bad} unreadable)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    every = max(1, steps // 10)
    tcfg = VAETrainConfig(steps=steps, lr=lr, batch_size=min(batch_size, len(x)), kl_weight=kl_weight,
                          perceptual=str(perceptual) if perceptual else None,
                          perceptual_lin=str(perceptual_lin) if perceptual_lin else None,
                          perceptual_weight=perceptual_weight, adversarial_weight=adversarial_weight,
                          disc_start=disc_start, seed=seed, log_every=every, max_seconds=max_seconds,
                          ckpt_dir=str(ckpt), ckpt_every=ckpt_every, resume=resume)
    losses = " + ".join(["L1 + MSE + KL"] + (["perceptual"] if perceptual else [])
                        + ([f"adversarial (from step {disc_start})"] if adversarial_weight > 0 else []))
    typer.echo(f"train-vae: {len(x)} clips of {frames}x{size}x{size} from {root} version {version} "
               f"({short} too short, {bad} unreadable); {steps} steps of {losses}, "
               + (f"{workers} Ray Train workers" if workers > 1 else f"on {device}"))

    def report(h):
        typer.echo(f"  step {h['step']:>6} loss {h['loss']:.4f} psnr {h['psnr']:.2f} dB"
                   + (f" d_loss {h['d_loss']:.3f}" if "d_loss" in h else ""))
    t0 = time.time()
    try:
        if workers > 1:
            import ray

            from generator.vae_train import vae_loop_per_worker

            if perceptual:  # fail here, in one line, rather than in every worker
                from generator.perceptual import Perceptual
                Perceptual(str(perceptual), str(perceptual_lin) if perceptual_lin else None)
            started = not ray.is_initialized()
            ray.init(ignore_reinit_error=True)  # for ray.put: the clips go to the workers through the object store
            try:
                final = _fit_on_workers(vae_loop_per_worker,
                                        {"vae": asdict(cfg), "train": asdict(tcfg), "data": ray.put(x)},
                                        workers, out, "vae")
            finally:
                if started:
                    ray.shutdown()
            tensors, _ = read_checkpoint_file(str(ckpt))  # rank 0's weights (DDP keeps the ranks equal)
            load_state_strict(vae, prefixed(tensors, "vae."), "VAE")
        else:
            hist = train_vae(vae, x, tcfg, report=report)
            final = hist[-1] if hist else {}
    except (ValueError, CheckpointError) as e:  # perceptual weights or a checkpoint that do not match
        _fail(str(e))
    vae.to(device).eval()
    with torch.no_grad():  # the DiT wants zero-mean, unit-variance latents: shift and scale by the data's
        means = torch.cat([vae.encode(x[i:i + 8].to(device)).mean for i in range(0, len(x), 8)])
        recon_psnr = psnr(vae.decode(means[:8]), x[:8].to(device))  # the first (training) clips, from their posterior means
    vae.fit_latent_stats(means)
    out.mkdir(parents=True, exist_ok=True)
    save_vae(vae, str(out / "vae.safetensors"))
    done = json.loads((ckpt / "latest.json").read_text())["step"]
    if not final and (out / "vae.json").is_file():  # a resume with no step left: that run's figures stand
        prev = json.loads((out / "vae.json").read_text())
        if prev.get("steps") == done:
            final = {"loss": prev.get("final_loss"), "psnr": prev.get("final_psnr")}
    info = {"dataset": str(root), "clips_version": version, "clips": len(x), "frames": frames, "size": size,
            "config": asdict(vae.cfg), "train": asdict(tcfg), "workers": workers, "steps": done,
            "final_loss": final.get("loss"), "final_psnr": final.get("psnr"), "recon_psnr": recon_psnr,
            "seconds": round(time.time() - t0, 1), "sha256": sha256_file(out / "vae.safetensors")}
    _write_json(out / "vae.json", info)
    typer.echo(f"wrote {out / 'vae.safetensors'} after {done} steps (reconstruction psnr {recon_psnr:.2f} dB, "
               f"scaling factor {vae.cfg.scaling_factor:.3f}, shift {vae.cfg.shift_factor:.3f}, sha {info['sha256'][:12]})")


def precompute_cmd(
        dataset: Path = typer.Option(..., "--dataset", help="dataset root holding the clips table"),
        version: int = typer.Option(..., "--version", help="clips table version whose kept clips to encode"),
        vae: Path = typer.Option(..., "--vae", help="VAE checkpoint (file, or a train-vae output dir)"),
        text_encoder: str = typer.Option("open_clip:ViT-B-32", "--text-encoder",
                                         help="open_clip:<model> (config; weights from --text-weights) or t5:<local dir>"),
        text_weights: Optional[Path] = typer.Option(None, "--text-weights", help="local open_clip weights file"),
        short_sides: str = typer.Option("64,128,256", "--short-sides", help="short-side buckets in pixels"),
        frame_buckets: str = typer.Option("1,5,9,17,33", "--frame-buckets", help="frame-count buckets (1 + 4k)"),
        patch: str = typer.Option("1,2,2", "--patch", help="DiT patch (t,h,w) the latents must divide into"),
        max_clips: Optional[int] = typer.Option(None, "--max-clips", min=1, help="encode at most this many new clips this run"),
        concurrency: int = typer.Option(1, "--concurrency", min=1, help="actors per encoder stage"),
        retry_errors: bool = typer.Option(False, "--retry-errors", help="retry clips the error log names as unreadable"),
        dtype: str = typer.Option("float32", "--dtype",
                                  help="float32 | bfloat16 | float16: what latents and text embeddings are stored as "
                                       "(16-bit halves the table and the trainer's reads; training reads float32)"),
        replace: bool = typer.Option(False, "--replace",
                                     help="clips already encoded with these encoders under other settings (--dtype, "
                                          "--short-sides, --frame-buckets, --patch) are encoded again and their rows "
                                          "rewritten, in this run's one commit; without it such a rerun is refused")):
    """Encode kept clips into VAE latents + caption embeddings: the `latents` table (one commit; reruns skip done rows)."""
    from generator.precompute import precompute

    root = dataset.resolve()
    vae_path = _vae_file(vae)
    if text_weights is not None and not text_weights.is_file():
        _fail(f"text encoder weights not found: {text_weights}")
    typer.echo(f"precompute: {root} clips version {version}, VAE {vae_path}, text {text_encoder}")
    last = [0.0]

    def progress(done, total):
        if time.time() - last[0] > 5 or done == total:
            last[0] = time.time()
            typer.echo(f"  {done}/{total} clips")
    try:
        res = precompute(root, version, str(vae_path), text_encoder, str(text_weights.resolve()) if text_weights else None,
                         short_sides=_ints(short_sides, "--short-sides"),
                         frame_buckets=_ints(frame_buckets, "--frame-buckets"), patch=_ints(patch, "--patch"),
                         max_clips=max_clips, concurrency=concurrency, retry_errors=retry_errors, progress=progress,
                         dtype=dtype, replace=replace)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - e.g. an unknown open_clip model or a failed Ray job, in one line
        _fail(f"precompute failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", 1)
    for err in res.errors:
        typer.secho(f"  unreadable: {err['clip_id']} {err['clip_uri']}: {err['reason']}", err=True)
    for err in res.retry:
        typer.secho(f"  out of memory (not logged; a rerun retries it): {err['clip_id']} {err['clip_uri']}: "
                    f"{err['reason']}", err=True)
    where = f"latents version {res.version}" if res.version is not None else "nothing new to write"
    typer.echo(f"precompute: wrote {res.written}, skipped {res.skipped} (already encoded), errors {len(res.errors)}, "
               f"{res.known_errors} skipped as unreadable before (--retry-errors to retry); {where} "
               f"(vae {res.vae_sha[:12]}, text {res.text_encoder_sha[:12]})"
               + ("" if res.gpu is None else f", encoders on {'GPU' if res.gpu else 'CPU'}")
               + (f"; {res.reused} with a stored latent for this VAE: text encoder only" if res.reused else ""))
    if res.retry:  # the machine failed, not the clips: rerun (smaller buckets or --concurrency 1 if it repeats)
        _fail(f"{len(res.retry)} clip(s) ran out of memory and were not encoded: rerun precompute to retry them "
              f"(with --concurrency 1 or smaller --short-sides / --frame-buckets if it happens again)", 1)
    if res.errors or res.known_errors:  # finished, but not every kept clip has a latent
        raise typer.Exit(3)


def train_cmd(
        dataset: Path = typer.Option(..., "--dataset", help="dataset root holding the latents table"),
        latents_version: int = typer.Option(..., "--latents-version", help="latents table version to train on (pinned)"),
        out: Path = typer.Option(..., "--out", help="run directory: checkpoints, run.json, history.jsonl"),
        preset: str = typer.Option("DiT_XS", "--preset", help="model size: DiT_T, DiT_XS, DiT_S, DiT_B, DiT_L, DiT_XL"),
        patch: str = typer.Option("1,2,2", "--patch", help="patch (t,h,w) in latent units"),
        steps: int = typer.Option(1000, "--steps", min=1),
        lr: float = typer.Option(1e-4, "--lr"),
        warmup_steps: int = typer.Option(100, "--warmup-steps", min=0),
        max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="tokens per packed batch (per worker)"),
        base_tokens: int = typer.Option(256, "--base-tokens", min=1, help="resolution-shift reference token count"),
        budget_flops: Optional[float] = typer.Option(None, "--budget-flops", help="stop after this many training FLOPs"),
        budget_seconds: Optional[float] = typer.Option(None, "--budget-seconds", help="stop after this many seconds"),
        ckpt_every: int = typer.Option(0, "--ckpt-every", min=0, help="checkpoint every N steps (0: at the end)"),
        log_every: int = typer.Option(10, "--log-every", min=1),
        vae_sha: Optional[str] = typer.Option(None, "--vae-sha", help="pick an encoder pair when the table has several"),
        text_encoder_sha: Optional[str] = typer.Option(None, "--text-encoder-sha"),
        resume: bool = typer.Option(False, "--resume", help="continue the checkpoint in --out exactly"),
        init_from: Optional[Path] = typer.Option(None, "--init-from",
                                                 help="fine-tune: start from this finished run's weights (a train --out dir)"),
        workers: int = typer.Option(1, "--workers", min=1, help="Ray Train TorchTrainer workers (DDP) when > 1"),
        strategy: str = typer.Option("ddp", "--strategy",
                                     help="with --workers > 1: ddp (a full model per worker) or fsdp (parameters, "
                                          "gradients, optimizer state and EMA sharded across workers)"),
        cond_mix: str = typer.Option("tasks", "--cond-mix",
                                     help="frame conditioning mix: 'tasks' (t2v plus the masks animate/extend/loop/"
                                          "transition need; see generator/conditioning.py), 't2v' (text only), "
                                          "or weights like none=0.5,first=0.3,last=0.2"),
        grad_accum: int = typer.Option(1, "--grad-accum", min=1,
                                       help="packed batches per optimizer step: the effective batch is this many times "
                                            "--max-tokens per worker, with one gradient sync per step"),
        window_rows: int = typer.Option(2048, "--window-rows", min=1,
                                        help="latents rows per shuffle window: tables larger than this are read a "
                                             "row group at a time and shuffled within windows (memory ~2x this many "
                                             "rows); resume needs the same value"),
        compile: Optional[bool] = typer.Option(
            None, "--compile/--no-compile",
            help="torch.compile the DiT blocks (fuses the pointwise work around the matmuls; the first steps pay "
                 "for the compile). Same results to float rounding. Default: on where the workers train on CUDA (H100 "
                 "bf16: 1.9-2.0x the eager step), off on CPU (1.03-1.06x)"),
        seed: int = typer.Option(0, "--seed")):
    """Train the DiT with rectified flow on a pinned latents table version; safetensors checkpoints in --out."""
    import torch

    from generator.conditioning import check_ratios, parse_ratios
    from generator.data import LatentBatches
    from generator.train import STRATEGIES, CheckpointError, TrainConfig, train

    need_out_dir(out)
    root = dataset.resolve()
    if strategy not in STRATEGIES:
        _fail(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if resume and init_from is not None:  # a resume continues --out's own weights: --init-from would be ignored
        _fail(f"--resume continues the run in {out}; --init-from starts a new run from {init_from}'s weights: "
              f"pass one of them")
    try:
        cond_ratios = parse_ratios(cond_mix)
    except ValueError as e:
        _fail(f"--cond-mix: {e}")
    pt = _ints(patch, "--patch")
    if len(pt) != 3:
        _fail(f"--patch needs three integers t,h,w, got {patch!r}")
    try:
        data = LatentBatches(root, latents_version, pt, max_tokens, seed, vae_sha=vae_sha, text_encoder_sha=text_encoder_sha,
                             window_rows=window_rows)
    except ValueError as e:
        _fail(str(e))
    if workers > len(data):
        _fail(f"{len(data)} latents for {workers} workers: every worker needs at least one")
    has_ckpt = (out / "latest.json").is_file()
    manifest_path = out / "run.json"
    if has_ckpt and not resume:
        _fail(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if resume and manifest_path.is_file():
        prev = json.loads(manifest_path.read_text())
        # run.json holds the resolved root: another spelling of the same directory is the same dataset,
        # another dataset may hold a table of the same version, rows and encoders (its checkpoint cannot tell)
        if prev.get("dataset") not in (None, str(root)):
            _fail(f"{out} was trained on --dataset {prev['dataset']}, not {root}: resume would mix two datasets")
        if prev.get("latents_version") != data.version:
            _fail(f"{out} was trained on latents version {prev.get('latents_version')}, not {data.version}: "
                  f"resume would not be exact")
        if prev.get("vae_sha") != data.vae_sha:  # one version may hold several VAEs' latents
            _fail(f"{out} was trained on latents of VAE {str(prev.get('vae_sha'))[:12]}, not {data.vae_sha[:12]}: "
                  f"pass --vae-sha {str(prev.get('vae_sha'))[:12]} to resume it")
        if prev.get("text_encoder_sha") not in (None, data.text_encoder_sha):
            _fail(f"{out} was trained on text encoder {prev['text_encoder_sha'][:12]}, not "
                  f"{data.text_encoder_sha[:12]}: pass --text-encoder-sha {prev['text_encoder_sha'][:12]} to resume it")
        if prev.get("train", {}).get("grad_accum", 1) != grad_accum:
            _fail(f"{out} was trained with --grad-accum {prev['train'].get('grad_accum', 1)}: pass the same to resume exactly")
        was = prev.get("train", {}).get("cond_ratios")
        if was is not None and check_ratios(was) != cond_ratios:
            _fail(f"{out} was trained with --cond-mix {','.join(f'{k}={w:g}' for k, w in check_ratios(was).items() if w)}: "
                  f"pass the same mix to resume exactly")
    dit = _preset_config(preset, in_channels=data.channels, text_dim=data.text_dim, patch=pt)
    cfg = TrainConfig(dit=dit, steps=steps, lr=lr, warmup_steps=warmup_steps, max_tokens=max_tokens,
                      base_tokens=base_tokens, seed=seed, log_every=log_every, ckpt_dir=str(out),
                      ckpt_every=ckpt_every, resume=resume, max_seconds=budget_seconds, max_flops=budget_flops,
                      init_from=str(init_from) if init_from else None, strategy=strategy, cond_ratios=cond_ratios,
                      compile=compile, grad_accum=grad_accum)
    if init_from is not None and not (init_from / "latest.json").is_file():
        _fail(f"--init-from {init_from}: no finished run there (latest.json missing)")
    if init_from is not None and not has_ckpt:  # another model is refused here, before run.json is written
        from generator.train import RUNTIME_ONLY, checkpoint_meta
        try:
            was = checkpoint_meta(str(init_from)).get("config", {}).get("dit", {})
        except CheckpointError as e:
            _fail(str(e))
        now = json.loads(json.dumps(asdict(dit)))
        diff = [f"{k}: {was[k]} -> {v}" for k, v in now.items() if k not in RUNTIME_ONLY and k in was and was[k] != v]
        if diff:
            _fail(f"--init-from {init_from} is another model ({'; '.join(diff)}): pass its --preset and --patch")
        base = json.loads((init_from / "run.json").read_text()) if (init_from / "run.json").is_file() else {}
        for key, what, flag in (("vae_sha", "VAE", "--vae-sha"),
                                ("text_encoder_sha", "text encoder", "--text-encoder-sha")):
            if base.get(key) not in (None, getattr(data, key)):  # same shapes, another latent or caption space
                _fail(f"--init-from {init_from} was trained with {what} {base[key][:12]}, these latents are of "
                      f"{getattr(data, key)[:12]}: precompute with that {what} (or pass {flag} {base[key][:12]})")
    if resume and has_ckpt:  # refused here, before run.json is rewritten with the refused settings
        from generator.train import check_resume_config, checkpoint_meta
        try:
            saved = checkpoint_meta(str(out))
            check_resume_config(saved.get("config", {}), cfg)
            if "data" in saved:  # the data position: another table version, row count or --window-rows too
                data.load_state_dict(saved["data"])  # (train() loads it again, with this rank's)
        except (ValueError, CheckpointError) as e:
            _fail(str(e))
    clips_versions = sorted(set(data.table["clips_version"].to_pylist()))
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"dataset": str(root), "latents_version": data.version, "clips_versions": clips_versions,
                "vae_sha": data.vae_sha, "text_encoder_sha": data.text_encoder_sha,
                **_text_encoder_of(root, data.text_encoder_sha), "samples": len(data),
                "preset": preset, "workers": workers, "train": asdict(cfg), "started_at": time.time()}
    _write_json(manifest_path, manifest)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    typer.echo(f"train: {preset} on {len(data)} latents (version {data.version}, {data.channels} ch, text dim "
               f"{data.text_dim}), {steps} steps, {workers} worker(s){f' ({strategy})' if workers > 1 else f' on {device}'}")

    if workers > 1:
        from functools import partial

        from generator.train import train_loop_per_worker

        make_data = partial(LatentBatches.for_ray_worker, str(root), data.version, pt, max_tokens, seed,
                            vae_sha=data.vae_sha, text_encoder_sha=data.text_encoder_sha, window_rows=window_rows)
        final = {"metrics": _fit_on_workers(train_loop_per_worker, {"train": asdict(cfg), "data": make_data},
                                            workers, out, "dit")}
    else:
        def report(rec):
            typer.echo(f"  step {rec['step']:>6} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                       f"grad {rec['grad_norm']:.3f} tokens {rec['tokens']}")
        try:
            res = train(cfg, data, report=report)
        except (ValueError, CheckpointError) as e:  # a checkpoint that does not match, or is corrupt
            _fail(str(e))
        # history.jsonl: train() appends every step's record with each checkpoint (a resumed run continues it)
        final = {"step": res.step, "skipped": res.skipped, "stop_reason": res.stop_reason,
                 "final_loss": res.history[-1]["loss"] if res.history else None}
    latest = json.loads((out / "latest.json").read_text()) if (out / "latest.json").is_file() else {}
    manifest.update(finished_at=time.time(), result=final, checkpoint=latest)
    _write_json(manifest_path, manifest)
    typer.echo(f"train: done ({final}); checkpoint {out / latest.get('file', '?')}")


def _text_encoder_of(root: Path, sha: str) -> dict:
    """{"text_encoder": spec, "text_weights": path} of the precompute commit that wrote embeddings of
    encoder `sha` (its lineage names them), so `spacetime sample` can default to the same encoder."""
    from deltalake import DeltaTable

    from generator.precompute import latents_path
    for h in DeltaTable(latents_path(root)).history():
        try:
            lin = json.loads(h.get("spacetime") or "{}")
        except (TypeError, ValueError):
            continue
        if lin.get("text_encoder_sha") == sha and lin.get("text_encoder"):
            return {"text_encoder": lin["text_encoder"], "text_weights": lin.get("text_weights")}
    return {}


def register(app: typer.Typer) -> None:
    """Add train-vae, precompute and train to the `spacetime` app."""
    app.command("train-vae")(train_vae_cmd)
    app.command("precompute")(precompute_cmd)
    app.command("train")(train_cmd)
