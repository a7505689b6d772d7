"""Training the video captioner: one written-out loop (nanoGPT style), wrapped by Ray Train.

Each step: sample a batch of clips and, per clip, one of its teacher captions (short or dense,
whichever exist) -> forward under autocast (bf16 on CUDA only) -> caption cross-entropy +
CLIP InfoNCE -> backward -> clip grads -> AdamW step with warmup + cosine LR -> log ->
validate -> checkpoint. The checkpoint dir `<out_dir>/checkpoint` holds the captioner
(config.json, model.safetensors, tokenizer.json, loadable by `load_captioner`) plus
optimizer.safetensors, rng.safetensors and train_state.json, and is swapped in atomically;
rerunning with the same out_dir resumes exactly (same weights as an uninterrupted run), and a rerun
with other settings or training rows is refused (check_resume).

Training rows: status == "kept" with a teacher caption. Validation holds out whole SOURCE
videos (by source_sha256) so clips of one video never sit on both sides.
"""
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from captioner.data import load_frames, read_clips, training_rows
from captioner.model import (PAD, SPECIAL_TOKENS, VideoCaptioner, build_tokenizer, encode_caption,
                             load_captioner, preset, save_captioner)

STYLE_ORDER = ("short", "dense")


@dataclass
class TrainConfig:
    preset: str = "small"                 # CaptionerConfig size preset (model.PRESETS)
    model: dict = field(default_factory=dict)  # overrides of CaptionerConfig fields
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-4
    min_lr_ratio: float = 0.1             # cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    contrastive_weight: float = 0.1       # at 1.0 tiny models collapsed to one embedding early
    val_fraction: float = 0.1             # of source videos
    eval_every: int = 200
    ckpt_every: int = 200
    log_every: int = 20
    seed: int = 0
    min_word_count: int = 1
    # Mirror a clip left-right with this probability and swap these words in its caption: a pan
    # left becomes a pan right, so every pan is seen both ways. Off by default: only right where
    # the captions' left/right always mean screen sides (templated ones), not "her left hand"
    hflip: float = 0.0
    hflip_swap: list = field(default_factory=lambda: [["left", "right"]])
    # Fraction of batches drawn in the short style (None: in proportion to the clips that have each
    # style). A short caption names the same subject, colour and motion in ~1/5 of the tokens, so
    # its batches ground those words in the video faster; dense batches teach the long form
    short_fraction: float | None = None
    # Temporal jitter: decode num_frames * frame_pool frames per clip; every time a clip is drawn
    # it shows num_frames of them, in order, chosen at random. A small dataset is otherwise the
    # same 8 frames every epoch, which a captioner memorises instead of reading the motion.
    # Validation (and captioning) use the evenly spaced subset, as with frame_pool = 1.
    frame_pool: int = 1
    # Play a clip backwards with this probability and exchange these phrase pairs in its caption:
    # a zoom in becomes a zoom out, a tilt up a tilt down, so every camera move is seen both ways.
    # Off by default: only right where the captions' motion is the camera's (a ball falling
    # backwards is no fall); the demo benchmark sets its caption phrases
    # (pipeline.synthetic.REVERSED_MOVES)
    reverse: float = 0.0
    reverse_swap: list = field(default_factory=list)


@dataclass
class CaptionData:
    """Clips decoded once: frames (N, T, S, S, 3) uint8; ids (N, 2, L) token ids for the short and
    dense caption (all <pad> where that style is missing); has (N, 2) bool; clip_ids list;
    ids_reversed: the captions with TrainConfig.reverse_swap applied (None without it)."""
    frames: torch.Tensor
    ids: torch.Tensor
    has: torch.Tensor
    clip_ids: list
    ids_reversed: torch.Tensor | None = None

    def __len__(self):
        return len(self.clip_ids)


# ---------------------------------------------------------------- data

def split_by_source(source_shas, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Bool mask, True = validation. Whole sources go to one side: the ceil(fraction * n_sources)
    sources with the smallest seeded hash (deterministic, independent of row order)."""
    if not 0 <= val_fraction <= 1:  # a negative one would slice from the end: nearly all held out
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    sources = sorted(set(source_shas), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n_val = math.ceil(val_fraction * len(sources)) if len(sources) > 1 else 0
    val = set(sources[:n_val])
    return np.array([s in val for s in source_shas], dtype=bool)


def swap_phrases(text: str, pairs) -> str:
    """`text` lower-cased with each (a, b) phrase pair exchanged, whole words, longest phrase first
    (so "zooms in on" -> "zooms out from" wins over "zooms in" -> "zooms out")."""
    table = {}
    for a, b in pairs:
        table[a.lower()], table[b.lower()] = b.lower(), a.lower()
    if not table:
        return text.lower()
    pattern = r"\b(" + "|".join(re.escape(p) for p in sorted(table, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: table[m[1]], text.lower())


def caption_texts(rows: list[dict], cfg: TrainConfig) -> list[str]:
    """Every teacher caption of `rows` the training shows (reversed ones too): the tokenizer's corpus."""
    texts = [r[f"caption_teacher_{s}"] or "" for r in rows for s in STYLE_ORDER]
    return texts + ([swap_phrases(t, cfg.reverse_swap) for t in texts] if cfg.reverse and cfg.reverse_swap else [])


def make_data(rows: list[dict], frames: dict, tok: Tokenizer, max_len: int, reverse_swap=None) -> CaptionData:
    """rows: dicts with clip_id, caption_teacher_short, caption_teacher_dense; frames: clip_id -> array.
    With reverse_swap (phrase pairs), also the reversed-clip captions (CaptionData.ids_reversed)."""
    rows = [r for r in rows if r["clip_id"] in frames]
    variants = [None] + ([reverse_swap] if reverse_swap else [])
    ids = torch.full((len(variants), len(rows), 2, max_len), SPECIAL_TOKENS.index(PAD), dtype=torch.long)
    has = torch.zeros(len(rows), 2, dtype=torch.bool)
    for i, r in enumerate(rows):
        for j, style in enumerate(STYLE_ORDER):
            text = r.get(f"caption_teacher_{style}")
            if text:
                for k, pairs in enumerate(variants):
                    seq = encode_caption(tok, text if pairs is None else swap_phrases(text, pairs), style, max_len)
                    ids[k, i, j, :len(seq)] = torch.tensor(seq)
                has[i, j] = True
    stacked = np.stack([frames[r["clip_id"]] for r in rows]) if rows else np.zeros((0,))
    return CaptionData(torch.from_numpy(stacked), ids[0], has, [r["clip_id"] for r in rows],
                       ids[1] if reverse_swap else None)


def prepare(dataset_root, version, out_dir, cfg: TrainConfig):
    """Read the table, split by source, decode frames once (npz cache in out_dir), build or
    reload the tokenizer -> (tokenizer, model config, train data, val data, info dict; info["data"]
    is what `fit` records of the data: table version, held-out sources, a hash of the training rows)."""
    table, read_version = read_clips(dataset_root, version)
    rows = training_rows(table).select(
        ["clip_id", "clip_uri", "source_sha256", "caption_teacher_short", "caption_teacher_dense"]).to_pylist()
    if not rows:
        raise ValueError(f"no kept clips with teacher captions in {dataset_root} version {read_version}")
    is_val = split_by_source([r["source_sha256"] for r in rows], cfg.val_fraction, cfg.seed)
    train_rows = [r for r, v in zip(rows, is_val) if not v]
    val_rows = [r for r, v in zip(rows, is_val) if v]
    # what fit records in each checkpoint: a resume must train on the same rows in the same order,
    # and eval-captioner scores the sources held out here even after the table grows
    data = {"version": read_version, "val_sources": sorted({r["source_sha256"] for r in val_rows}),
            "train_sha256": hashlib.sha256(json.dumps(
                [[r["clip_id"], r["caption_teacher_short"], r["caption_teacher_dense"]] for r in train_rows]
            ).encode()).hexdigest()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _latest_checkpoint(out)
    if ckpt is not None:  # resume: the vocabulary must be the one the weights were trained with
        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    else:
        tok = build_tokenizer(caption_texts(train_rows, cfg), cfg.min_word_count)
    mcfg = preset(cfg.preset, **cfg.model, vocab_size=tok.get_vocab_size())
    frames, errors = load_frames([r["clip_id"] for r in rows], [r["clip_uri"] for r in rows],
                                 mcfg.num_frames, mcfg.image_size, cache_file=out / "frames.npz",
                                 fit=mcfg.frame_fit, pool=cfg.frame_pool)
    train = make_data(train_rows, frames, tok, mcfg.max_text_len, cfg.reverse_swap if cfg.reverse else None)
    val = evenly_spaced(make_data(val_rows, frames, tok, mcfg.max_text_len), cfg.frame_pool)
    if not len(train):  # nothing to draw batches from: say why here, not as a sampling error in the loop
        first = next((e for cid, e in errors.items() if cid in {r["clip_id"] for r in train_rows}), None)
        raise ValueError(f"no training clip of {dataset_root} version {read_version} could be decoded "
                         f"({len(train_rows)} training clips{f', e.g. {first}' if first else ''})")
    info = {"dataset_root": str(dataset_root), "train_clips": len(train), "val_clips": len(val),
            "decode_errors": errors, "data": data}
    return tok, mcfg, train, val, info


def evenly_spaced(data: CaptionData, pool: int) -> CaptionData:
    """The frames captioning reads (sample_indices with pool 1) out of those decoded for temporal
    jitter (pool > 1): every pool-th from pool // 2 on. (Every pool-th from 0 sat up to half a bin
    early: validation saw other frames than captioning.)"""
    if pool > 1 and len(data):
        data.frames = data.frames[:, pool // 2::pool].contiguous()
    return data


def sample_batch(data: CaptionData, batch_size: int, gen: torch.Generator, hflip: float = 0.0,
                 swap_ids: list = (), short_fraction: float | None = None, num_frames: int | None = None,
                 reverse: float = 0.0):
    """One caption style per batch, drawn in proportion to how many clips have it (or short with
    probability short_fraction), and random
    clips (with replacement) among those that have it.

    One style per batch because a batch pads to its longest caption: mixing one dense caption
    (~150 tokens) into short ones (~20) would cost the decoder ~7x its compute.
    Clips holding more than num_frames frames show an ordered random num_frames of them.
    With hflip > 0 that fraction of clips is mirrored left-right (frames (B, T, H, W, 3): the W
    axis) and each (a, b) token pair in swap_ids is exchanged in their captions.
    With reverse > 0 (and data.ids_reversed) that fraction plays backwards with the reversed caption.
    """
    weights = data.has.sum(0).float()
    if short_fraction is not None:
        mixed = (weights > 0) * torch.tensor([short_fraction, 1 - short_fraction])
        weights = mixed if mixed.sum() > 0 else weights
    style = int(torch.multinomial(weights, 1, generator=gen))  # 0 short, 1 dense
    pool = data.has[:, style].nonzero().squeeze(1)
    idx = pool[torch.randint(len(pool), (batch_size,), generator=gen)]
    ids = data.ids[idx, style]
    frames = data.frames[idx]
    if num_frames is not None and frames.shape[1] > num_frames:  # temporal jitter: an ordered random subset
        keep = torch.rand(batch_size, frames.shape[1], generator=gen).topk(num_frames, dim=1).indices.sort(1).values
        frames = frames[torch.arange(batch_size)[:, None], keep]
    if reverse > 0 and data.ids_reversed is not None:
        back = torch.rand(batch_size, generator=gen) < reverse
        frames = torch.where(back.view(-1, 1, 1, 1, 1), frames.flip(1), frames)
        ids = torch.where(back.view(-1, 1), data.ids_reversed[idx, style], ids)
    if hflip > 0:
        flip = torch.rand(batch_size, generator=gen) < hflip
        frames = torch.where(flip.view(-1, 1, 1, 1, 1), frames.flip(3), frames)
        swapped = ids.clone()
        for a, b in swap_ids:
            swapped[ids == a] = b
            swapped[ids == b] = a
        ids = torch.where(flip.view(-1, 1), swapped, ids)
    width = int((ids != SPECIAL_TOKENS.index(PAD)).sum(1).max())  # drop all-pad columns
    return frames, ids[:, :width]


# ---------------------------------------------------------------- checkpoints

def _latest_checkpoint(out: Path):
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        if (out / name / "train_state.json").is_file():
            return out / name
    return None


# What a resume must keep to continue the run exactly: the model and vocabulary, the data split, the
# batch stream and its augmentation, the loss. Steps, the LR schedule, grad clipping and logging may
# change; weight decay may not, as the optimizer state restores the old value over a new one.
EXACT_RESUME = ("preset", "model", "seed", "batch_size", "val_fraction", "min_word_count", "contrastive_weight",
                "weight_decay", "hflip", "hflip_swap", "short_fraction", "frame_pool", "reverse", "reverse_swap")


def check_resume(ckpt: Path | None, cfg: TrainConfig, data: dict | None = None) -> None:
    """ValueError naming each setting ("name: old -> new") in which `cfg`, or the training rows of
    `data` (prepare's info["data"]), differ from the run checkpointed at `ckpt` (None: no run yet)."""
    if ckpt is None:
        return
    state = json.loads((ckpt / "train_state.json").read_text())
    saved, now = state.get("train_config") or {}, json.loads(json.dumps(asdict(cfg)))
    diff = [f"{k}: {saved[k]} -> {now[k]}" for k in EXACT_RESUME if k in saved and saved[k] != now[k]]
    old = state.get("data") or {}  # absent in checkpoints from before it was recorded
    if data and old.get("train_sha256") not in (None, data["train_sha256"]):
        diff.append(f"training clips or teacher captions: table version {old.get('version')} -> {data['version']}")
    if diff:
        raise ValueError(f"{ckpt.parent} holds a captioner run with other settings, which resuming would not "
                         f"continue exactly ({'; '.join(diff)}): pass its settings, or train into another directory")


def held_out_sources(ckpt_dir) -> set | None:
    """The source videos (sha256) the training run of checkpoint `ckpt_dir` held out for validation;
    None for a checkpoint from before they were recorded."""
    state = Path(ckpt_dir) / "train_state.json"
    if not state.is_file():
        raise ValueError(f"{ckpt_dir} is not a captioner training checkpoint (no train_state.json)")
    data = json.loads(state.read_text()).get("data") or {}
    return set(data["val_sources"]) if "val_sources" in data else None


def _batch_rng_key(rank: int) -> str:
    # rank 0 keeps the key single-process checkpoints always used, so those load unchanged
    return "batches" if rank == 0 else f"batches.{rank}"


def gather_generator_states(gen: torch.Generator, device) -> list[torch.Tensor]:
    """Every rank's batch-generator state, in rank order (a collective: all ranks must call it).
    Ranks draw different batches (seed + rank), so rank 0 must save each one's, not only its own."""
    state = gen.get_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    # all_gather on `device`: NCCL (GPU workers) moves CUDA tensors only
    states = [torch.empty_like(state, device=device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(states, state.to(device))
    return [s.cpu() for s in states]


def save_checkpoint(out_dir, model, tok, opt, step: int, gen_states: list[torch.Tensor], extra: dict) -> Path:
    """Write <out_dir>/checkpoint atomically: build checkpoint.tmp, then swap it in by renames.
    gen_states: each rank's batch-generator state (gather_generator_states)."""
    out = Path(out_dir)
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_captioner(model, tok, tmp)
    sd = opt.state_dict()
    save_file({f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()},
              tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state(), **{_batch_rng_key(r): g for r, g in enumerate(gen_states)}}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "train_state.json").write_text(json.dumps(
        {"step": step, "param_groups": sd["param_groups"], **extra}, indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, opt, gen: torch.Generator, rank: int = 0) -> dict:
    """Restore weights, optimizer, RNG and this rank's batch-sampler state in place; returns
    train_state. A rank the checkpoint has no state for (more workers than it was saved with) keeps
    its fresh seed + rank generator: its own batches, never another rank's."""
    loaded, _ = load_captioner(ckpt)
    model.load_state_dict(loaded.state_dict())
    state = json.loads((ckpt / "train_state.json").read_text())
    flat = load_file(ckpt / "optimizer.safetensors")
    per_param = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if _batch_rng_key(rank) in rng:
        gen.set_state(rng[_batch_rng_key(rank)])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


# ---------------------------------------------------------------- the loop

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_loss(model, data: CaptionData, device, batch_size: int = 32) -> dict:
    """Caption loss per target token (<pad> excluded) over every (clip, available style) of `data`,
    as the training loss is, and video->text R@1."""
    model.eval()
    total, hits, n = 0.0, 0, 0
    for s in range(0, len(data), batch_size):
        frames = data.frames[s:s + batch_size].to(device)
        for j in range(2):
            sel = data.has[s:s + batch_size, j]
            if sel.sum() == 0:
                continue
            ids = data.ids[s:s + batch_size, j][sel].to(device)
            out = model(frames[sel.to(device)], ids, contrastive_weight=0.0)
            # caption_loss is the batch's per-token mean: weighted by its tokens (not its captions),
            # a long caption counts as much as it does in training
            tokens = int((ids[:, 1:] != SPECIAL_TOKENS.index(PAD)).sum())
            total += out["caption_loss"].item() * tokens
            n += tokens
    if len(data) > 1 and data.has[:, 0].all():
        video, _ = model.encode_video(data.frames.to(device))
        text = model.encode_text(data.ids[:, 0].to(device))
        # a retrieval hit: the clip's own short caption is the nearest, or ties it (templated
        # captions repeat across clips, so an identical caption counts)
        sim = video @ text.T
        best = sim.argmax(1).cpu()
        same = (data.ids[best, 0] == data.ids[:, 0]).all(1)
        hits = same.float().mean().item()
    model.train()
    return {"val_loss": total / max(n, 1), "val_r1": hits}


def _finite_on_every_rank(loss) -> bool:
    """Whether the loss is finite on every rank: under DDP all ranks must skip a step together, or
    the gradient all-reduce of the others would wait forever (one all-reduce when distributed)."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def _history_upto(out_dir, step: int) -> None:
    """Keep the history.jsonl records of steps <= `step`: the steps a killed run took after its last
    checkpoint are trained and logged again on resume (a line torn by the kill is dropped)."""
    path = Path(out_dir) / "history.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _append_history(out_dir, records: list) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # before the first checkpoint makes it
    with open(Path(out_dir) / "history.jsonl", "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def fit(model, tok, train: CaptionData, val: CaptionData, cfg: TrainConfig, out_dir, device="cpu",
        rank: int = 0, report=None, stop_at: int | None = None, log=print, data: dict | None = None) -> list[dict]:
    """Train `model` (possibly DDP-wrapped) from step 0, or resume from <out_dir>/checkpoint; a
    checkpoint of other settings or data (check_resume) is refused with a ValueError.

    `stop_at`: end this run after that step with a checkpoint (a time-sliced run; a later
    call resumes). `report(metrics)` is called at each log step (Ray Train passes its own).
    `data`: prepare's info["data"], recorded in each checkpoint.
    Returns the logged history (list of dicts: step, loss, caption_loss, contrastive_loss, lr, ...).
    """
    raw = getattr(model, "module", model)  # the captioner inside a DDP wrapper
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]  # norms, biases, logit scale
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    step, skipped, history = 0, 0, []
    ckpt = _latest_checkpoint(Path(out_dir))
    if ckpt is not None:
        check_resume(ckpt, cfg, data)
        step = load_checkpoint(ckpt, raw, opt, gen, rank)["step"]
        log(f"captioner: resumed from {ckpt} at step {step}")
    if rank == 0:  # history.jsonl is written with each checkpoint, so a killed run's steps up to it survive
        _history_upto(out_dir, step)
    flushed = 0  # records of `history` already in history.jsonl
    # word pairs the tokenizer knows, as ids (a caption without them is flipped unchanged)
    swap_ids = [(tok.token_to_id(a), tok.token_to_id(b)) for a, b in cfg.hflip_swap
                if tok.token_to_id(a) is not None and tok.token_to_id(b) is not None]
    use_bf16 = torch.device(device).type == "cuda"
    log(f"captioner: training on {device} ({'bf16 autocast' if use_bf16 else 'fp32'}), "
        f"{len(train)} train / {len(val)} val clips, steps {step}->{cfg.steps}")
    model.train()
    t0 = time.time()
    while step < cfg.steps:
        frames, ids = sample_batch(train, cfg.batch_size, gen, cfg.hflip, swap_ids, cfg.short_fraction,
                                   raw.cfg.num_frames, cfg.reverse)
        frames, ids = frames.to(device), ids.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(frames, ids, contrastive_weight=cfg.contrastive_weight)
        opt.zero_grad(set_to_none=True)
        step += 1
        finite, grad_norm = _finite_on_every_rank(out["loss"]), torch.tensor(float("nan"))
        if finite:
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        if finite and torch.isfinite(grad_norm):  # (DDP: the all-reduced gradients agree on every rank)
            opt.step()
        else:  # a NaN/inf loss or gradient: no update, counted and logged, never silent
            skipped += 1
            log(f"captioner: step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
            opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm.item(), "skipped": skipped,
                   **{k: v.item() for k, v in out.items()}, "sec": round(time.time() - t0, 1)}
            if len(val) and (step % cfg.eval_every == 0 or step == cfg.steps):
                rec.update(evaluate_loss(raw, val, device))
            history.append(rec)
            log("captioner: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in rec.items()))
            if report is not None:
                report(rec)
        last = step == cfg.steps or step == stop_at
        if step % cfg.ckpt_every == 0 or last:
            gen_states = gather_generator_states(gen, device)  # every rank joins the gather
            if rank == 0:  # the records first: a kill between the two leaves ones a resume drops
                _append_history(out_dir, history[flushed:])
                flushed = len(history)
                save_checkpoint(out_dir, raw, tok, opt, step, gen_states, {"train_config": asdict(cfg), "data": data})
        if step == stop_at:
            break
    if rank == 0:
        _append_history(out_dir, history[flushed:])
    return history


# ---------------------------------------------------------------- entry points

def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: the same prepare + fit, with DDP via ray.train.torch.prepare_model.

    config: {"dataset_root", "version", "out_dir", "train": asdict(TrainConfig)}.
    """
    import ray.train
    import ray.train.torch
    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    tok, mcfg, train, val, info = prepare(config["dataset_root"], config["version"], config["out_dir"], cfg)
    model = ray.train.torch.prepare_model(VideoCaptioner(mcfg))
    device = ray.train.torch.get_device()
    fit(model, tok, train, val, cfg, config["out_dir"], device=device, rank=ctx.get_world_rank(),
        report=lambda m: ray.train.report(m), data=info["data"])


def train_captioner(dataset_root, version: int | None, out_dir, cfg: TrainConfig | None = None,
                    num_workers: int = 0, stop_at: int | None = None, log=print) -> Path:
    """Train (or resume) a captioner on version `version` (None = latest) of <dataset_root>/clips.

    num_workers = 0 runs the loop in this process; >= 1 runs it under Ray Train's TorchTrainer
    with that many workers (one GPU each when CUDA is present). Returns the checkpoint dir,
    which `load_captioner` and `caption_dataset` take.
    """
    cfg = cfg or TrainConfig()
    out = Path(out_dir).resolve()
    # before any decoding, and here in the driver: a worker's error would reach the caller wrapped by Ray
    check_resume(_latest_checkpoint(out), cfg)
    if num_workers >= 1:
        # what prepare refuses, refused here too: in a worker it reaches the caller as a Ray Train
        # traceback after the cluster started. The version is pinned so every worker reads the same one
        table, version = read_clips(dataset_root, version)
        if training_rows(table).num_rows == 0:
            raise ValueError(f"no kept clips with teacher captions in {dataset_root} version {version}")
        preset(cfg.preset)
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from captioner.caption import cluster_gpus
        use_gpu = cluster_gpus() >= num_workers  # the cluster's: a job's driver may be a CPU head node
        log(f"captioner: Ray Train with {num_workers} worker(s), use_gpu={use_gpu}")
        TorchTrainer(train_loop_per_worker,
                     train_loop_config={"dataset_root": str(Path(dataset_root).resolve()), "version": version,
                                        "out_dir": str(out), "train": asdict(cfg)},
                     scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
                     run_config=RunConfig(storage_path=str(out / "ray_results"), name="captioner")).fit()
        return out / "checkpoint"
    torch.manual_seed(cfg.seed)
    tok, mcfg, train, val, info = prepare(dataset_root, version, out, cfg)
    log(f"captioner: data {json.dumps({k: v for k, v in info.items() if k != 'decode_errors'})}, "
        f"{len(info['decode_errors'])} unreadable clips skipped")
    model = VideoCaptioner(mcfg).to(_device())
    fit(model, tok, train, val, cfg, out, device=_device(), stop_at=stop_at, log=log, data=info["data"])
    return out / "checkpoint"
