"""The DiT training loop with rectified flow (nanoGPT-style, written out); the VAE's is generator/vae_train.py.

One step, in order: batch -> forward under autocast (bf16 on CUDA only) -> NaN/inf guard (skip,
count, log) -> backward -> grad clip -> optimizer step -> EMA -> LR warmup -> log -> checkpoint.
With grad_accum K, the first K-1 of a step's K batches go forward and backward at once, with the
gradient sync across ranks held back (DDP no_sync / FSDP set_requires_gradient_sync), and the last
goes through the guard with every batch's loss.

Checkpoints are safetensors holding model, EMA, optimizer state, RNG states, data position and
step, so resume is exact. Each is written to a temp file and os.replace'd into place; then
`latest.json` (also atomically replaced) names it with its sha256, so a truncated or tampered file
is refused instead of silently loaded. `history.jsonl` beside them gets every step's record just before
each checkpoint (a resume first drops those past its step), so a killed and resumed run's is the
uninterrupted run's.

`train(cfg, data)` is the loop. `train_loop_per_worker(config)` is the Ray Train entry point: it
reads rank/world size from Ray and calls the same `train` (DDP, or FSDP with `strategy="fsdp"`, when
world size > 1). Ray is only imported there.

Under FSDP (torch's fully_shard, one unit per DiT block plus the root) model, EMA and optimizer
state are sharded across ranks; a checkpoint gathers them into the same full safetensors file a
single process writes, so a run can resume on a different world size or strategy, and `sample`
reads it as usual. Saving is then a collective: every rank calls save_checkpoint, rank 0 writes.
Each rank's RNG, data position and FLOPs count are saved, so a resumed multi-rank run is exact too.
"""
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from generator.conditioning import check_ratios, sample_clean_tokens
from generator.dit import DiT, DiTConfig, compile_blocks
from generator.flow import RectifiedFlow
from generator.patches import Packed, pack, pack_sequences
from generator.vae import load_state_strict

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    steps: int = 1000              # optimizer iterations (skipped ones included)
    lr: float = 1e-4
    warmup_steps: int = 100        # linear LR warmup, then constant (or cosine, below)
    # "constant" (DiT's recipe: long runs, EMA does the averaging) or "cosine" down to
    # lr * min_lr_ratio at `steps` (short fixed-budget runs end at a lower loss)
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1       # probability a sample's text is replaced by the null embedding
    # frame conditioning (generator/conditioning.py): {strategy: weight} over none/first/last/ends/random;
    # conditioning.TASK_MIX trains one model for animate/extend/loop/transition. Default: plain t2v.
    cond_ratios: dict = field(default_factory=lambda: {"none": 1.0})
    max_tokens: int = 4096         # tokens per packed batch (per worker)
    grad_accum: int = 1            # packed batches per optimizer step (the loss is their mean)
    # with world size > 1: "ddp" (a full replica per rank) or "fsdp" (parameters, gradients,
    # optimizer state and EMA sharded across ranks: models that do not fit one device)
    strategy: str = "ddp"
    base_tokens: int = 256         # resolution-shift reference (tokens per sample with shift 1)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    log_every: int = 10
    ckpt_dir: str | None = None
    ckpt_every: int = 0            # 0: only at the end
    keep_ckpts: int = 2             # step files kept (0: all of them)
    resume: bool = True            # continue from ckpt_dir/latest.json when present
    init_from: str | None = None   # fine-tune: start from this checkpoint dir's EMA weights (fresh optimizer)
    max_seconds: float | None = None  # compute budget: wall-clock seconds of this run
    max_flops: float | None = None    # compute budget: total training FLOPs (3x forward matmul FLOPs)
    compile: bool | None = None    # torch.compile the DiT blocks (dit.compile_blocks; the EMA stays eager); None: compile_default

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        dit = d.pop("dit", {})
        dit = dit if isinstance(dit, DiTConfig) else DiTConfig(**{**dit, "patch": tuple(dit.get("patch", (1, 2, 2)))})
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        return cls(dit=dit, **d)


class PackedBatches:
    """Endless, deterministic iterator of packed batches from in-memory (latent, text_embedding) pairs.

    latent (C, T, H, W), text (L, D_text). Each epoch is a seeded permutation (seed, epoch); a
    batch takes samples in order while they fit in `max_tokens`. With world_size > 1 each rank
    reads every world_size-th sample. state_dict() is the data position for exact resume."""

    def __init__(self, pairs, patch, max_tokens: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.pairs, self.patch, self.max_tokens, self.seed = pairs, tuple(patch), max_tokens, seed
        self.rank, self.world_size = rank, world_size
        self._check_size()
        self.tokens = [math.prod(s // p for s, p in zip(z.shape[1:], self.patch)) for z, _ in pairs]
        if max(self.tokens) > max_tokens:
            raise ValueError(f"a sample has {max(self.tokens)} tokens > max_tokens {max_tokens}")
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    def __len__(self):
        return len(self.pairs)

    def _check_size(self):
        if len(self) < self.world_size:  # a rank without samples would wait for a batch forever
            raise ValueError(f"{len(self)} sample(s) for {self.world_size} rank(s): every rank needs at least one")

    def _epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self), generator=g)[self.rank::self.world_size].tolist()

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._order = self._epoch_order()

    def __iter__(self):
        return self

    def _take(self) -> list[int]:
        """Next sample indices, in order, while they fit in max_tokens (batches don't straddle epochs)."""
        chosen, n = [], 0
        while True:
            if self.pos >= len(self._order):
                if chosen:
                    break
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order()
            i = self._order[self.pos]
            if chosen and n + self.tokens[i] > self.max_tokens:
                break
            chosen.append(i)
            n += self.tokens[i]
            self.pos += 1
        return chosen

    def _pairs(self, chosen: list[int]) -> list:
        return [self.pairs[i] for i in chosen]

    def __next__(self):
        pairs = self._pairs(self._take())
        packed = pack([z for z, _ in pairs], self.patch)
        text, text_cu = pack_sequences([y for _, y in pairs])
        return {"packed": packed, "text": text, "text_cu": text_cu}


@dataclass
class TrainResult:
    history: list          # one dict per logged step: step, loss, lr, grad_norm, skipped, tokens, flops (so far)
    model: DiT
    ema: DiT
    step: int
    skipped: int           # steps skipped for a non-finite loss or gradient
    stop_reason: str       # steps | max_seconds | max_flops | budget (another rank)
    flops: float = 0.0     # training FLOPs of this rank, the resumed part included


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or tampered with (its sha256 is not the recorded one)."""


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


STRATEGIES = ("ddp", "fsdp")


def _param_names(model) -> list[str]:
    """Parameter names in optimizer order (index i of a torch optimizer state dict is names[i])."""
    return [n for n, _ in model.named_parameters()]


def _fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _full_state(model, ema, opt) -> tuple[dict, dict, dict]:
    """Unsharded CPU state dicts of model, EMA and optimizer (optimizer state keyed by parameter
    index, as torch's own state_dict). Under FSDP this all-gathers: every rank must call it."""
    if not _fsdp(model):
        return model.state_dict(), ema.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    msd, esd = get_model_state_dict(model, options=opts), get_model_state_dict(ema, options=opts)
    if not osd:  # ranks other than 0 gather nothing with cpu_offload
        return msd, esd, osd
    index = {n: i for i, n in enumerate(_param_names(model))}
    osd = {"state": {index[k]: v for k, v in osd["state"].items()},
           "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in osd["param_groups"]]}
    return msd, esd, osd


def _load_weights(module, sd: dict, what: str):
    """Strict load (errors name the keys) of a full state dict; under FSDP each rank keeps its shard."""
    load_state_strict(module, sd, what, load=not _fsdp(module))
    if _fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))


def _load_full_state(model, ema, opt, msd: dict, esd: dict, osd: dict):
    """Inverse of _full_state: load full (unsharded) state dicts, sharding them under FSDP."""
    _load_weights(model, msd, "model")
    _load_weights(ema, esd, "EMA")
    if not _fsdp(model):
        opt.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _param_names(model)
    set_optimizer_state_dict(model, opt, {"state": {names[i]: v for i, v in osd["state"].items()},
                                          "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                                           for g in osd["param_groups"]]},
                             options=StateDictOptions(full_state_dict=True))


def _per_rank(obj, world_size: int) -> list:
    """[obj of rank 0, rank 1, ...]: an all-gather when distributed."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(ckpt_dir: str, model, ema, opt, gen, data, step: int, skipped: int, flops: float,
                    cfg: TrainConfig, keep: int = 2, rank: int = 0, world_size: int = 1) -> str | None:
    """Write step_<step>.safetensors atomically, then point latest.json (with its sha256) at it.
    With world_size > 1 every rank must call it (states are gathered); rank 0 writes."""
    msd, esd, osd = _full_state(model, ema, opt)
    rngs = _per_rank((gen.get_state().cpu(), torch.get_rng_state(),
                      torch.cuda.get_rng_state() if torch.cuda.is_available() else None), world_size)
    positions = _per_rank(data.state_dict(), world_size)
    flops = _per_rank(flops, world_size)  # each rank counts its own batches' FLOPs
    path = _write_checkpoint(ckpt_dir, msd, esd, osd, rngs, positions, step, skipped, flops, cfg, keep) if rank == 0 else None
    if world_size > 1:  # no rank goes on (and maybe reads latest.json) before the file is in place
        import torch.distributed as dist
        dist.barrier()
    return path


def _write_checkpoint(ckpt_dir, msd, esd, osd, rngs, positions, step, skipped, flops, cfg, keep) -> str:
    """rngs, positions, flops: one per rank."""
    tensors = {f"model.{k}": v for k, v in msd.items()}
    tensors.update({f"ema.{k}": v for k, v in esd.items()})
    tensors.update(optimizer_tensors(osd, "optim."))
    for r, (g, t, c) in enumerate(rngs):
        tensors[f"rng.generator.{r}"], tensors[f"rng.torch.{r}"] = g, t
        if c is not None:
            tensors[f"rng.cuda.{r}"] = c
    meta = {"step": step, "skipped": skipped, "flops": flops[0], "flops_ranks": flops, "data": positions[0],
            "data_ranks": positions, "world_size": len(positions), "param_groups": osd["param_groups"],
            "config": asdict(cfg)}
    return write_checkpoint_file(ckpt_dir, step, tensors, meta, keep)


def write_checkpoint_file(ckpt_dir: str, step: int, tensors: dict, meta: dict, keep: int = 2) -> str:
    """step_<step>.safetensors (tensors + `meta` as JSON under metadata "train"), written to a temp
    file and os.replace'd; then latest.json names it with its sha256. Keeps the last `keep` files."""
    os.makedirs(ckpt_dir, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    name = f"step_{step:08d}.safetensors"
    path = os.path.join(ckpt_dir, name)
    save_file(tensors, path + ".tmp", metadata={"train": json.dumps(meta)})
    os.replace(path + ".tmp", path)
    _atomic_write_text(os.path.join(ckpt_dir, "latest.json"),
                       json.dumps({"file": name, "sha256": sha256_file(path), "step": step}))
    old = sorted(f for f in os.listdir(ckpt_dir) if f.startswith("step_") and f.endswith(".safetensors"))
    for f in old[:-keep] if keep > 0 else ():  # 0: keep every checkpoint
        os.remove(os.path.join(ckpt_dir, f))
    return path


def checkpoint_file(ckpt_dir: str) -> str:
    """The step file latest.json names, its sha256 checked: CheckpointError when missing or not matching."""
    latest = os.path.join(ckpt_dir, "latest.json")
    if not os.path.isfile(latest):
        raise CheckpointError(f"checkpoint dir {ckpt_dir} has no latest.json")
    with open(latest) as f:
        info = json.load(f)
    path = os.path.join(ckpt_dir, info["file"])
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} named by latest.json is missing")
    digest = sha256_file(path)
    if digest != info["sha256"]:
        raise CheckpointError(f"checkpoint {path} is truncated or tampered: sha256 {digest} != recorded {info['sha256']}")
    return path


def prefixed(tensors: dict, prefix: str) -> dict:
    """The state dict stored under `prefix` in a checkpoint's flat tensors ("ema." -> the EMA weights)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _file_meta(path: str) -> dict:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("train", "{}"))


def checkpoint_meta(ckpt_dir: str) -> dict:
    """The JSON metadata (step, config, data position, ...) of the checkpoint latest.json names
    (sha256-checked), without loading its tensors."""
    return _file_meta(checkpoint_file(ckpt_dir))


def read_checkpoint_file(ckpt_dir: str) -> tuple[dict, dict]:
    """(tensors, meta) of the checkpoint latest.json names (sha256-checked)."""
    path = checkpoint_file(ckpt_dir)
    return load_file(path), _file_meta(path)


def optimizer_tensors(osd: dict, prefix: str) -> dict:
    """A torch optimizer state dict's per-parameter state as flat tensors `<prefix><index>.<name>`
    (param_groups go in the checkpoint's JSON metadata)."""
    return {f"{prefix}{idx}.{name}": v if torch.is_tensor(v) else torch.tensor(v)
            for idx, st in osd["state"].items() for name, v in st.items()}


def optimizer_state(tensors: dict, prefix: str, param_groups: list, device) -> dict:
    """Inverse of optimizer_tensors: a state dict for opt.load_state_dict (Adam's `step` stays on CPU)."""
    state = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            idx, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v.to(device) if name != "step" else v
    return {"state": state, "param_groups": param_groups}


def load_checkpoint(ckpt_dir: str, model, ema, opt, gen, data, device, rank: int = 0, world_size: int = 1) -> dict:
    """Restore everything save_checkpoint wrote; returns its metadata (step, skipped, flops, ...).
    Raises CheckpointError on a sha256 mismatch, ValueError (naming keys) on a model mismatch.
    Each rank takes its own RNG, data position and FLOPs when the checkpoint has the same world size."""
    tensors, meta = read_checkpoint_file(ckpt_dir)
    _load_full_state(model, ema, opt, prefixed(tensors, "model."), prefixed(tensors, "ema."),
                     optimizer_state(tensors, "optim.", meta["param_groups"], device))
    same = meta.get("world_size", 1) == world_size
    if not same:
        log.warning("checkpoint was written by %d rank(s), resuming on %d: weights and optimizer are exact, "
                    "RNG streams and data order are not", meta.get("world_size", 1), world_size)
    # older checkpoints hold one unsuffixed state; another world size takes rank 0's
    r = "" if "rng.generator" in tensors else f".{rank if same else 0}"
    gen.set_state(tensors["rng.generator" + r])
    torch.set_rng_state(tensors["rng.torch" + r])
    if f"rng.cuda{r}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.cuda{r}"])
    data.load_state_dict(meta["data_ranks"][rank] if same and "data_ranks" in meta else meta["data"])
    if same and "flops_ranks" in meta:  # this rank's own count ("flops" is rank 0's)
        meta["flops"] = meta["flops_ranks"][rank]
    return meta


# what a resume must keep for the loss curve to be the uninterrupted one: the model, the data order
# and packing, the noise/time distributions (steps, LR and the budget may change)
RUNTIME_ONLY = ("attention", "grad_checkpointing")  # DiTConfig fields that change how it computes, not what
EXACT_RESUME = ("dit", "seed", "max_tokens", "grad_accum", "base_tokens", "logit_mean", "logit_std", "cfg_dropout",
                "cond_ratios")


def check_resume_config(saved: dict, cfg, fields=EXACT_RESUME) -> None:
    """ValueError naming each of `fields` whose value in the config dataclass `cfg` differs from the
    checkpoint's saved config."""
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(asdict(cfg), default=str))
    for c in (saved, now):  # how attention is computed and what backward recomputes may change
        c = c.get("dit") or {}
        for k in RUNTIME_ONLY:
            c.pop(k, None)
    diff = [f"{k}: {saved[k]} -> {now[k]}" for k in fields if k in saved and saved[k] != now[k]]
    if diff:
        raise ValueError(f"resuming {cfg.ckpt_dir} with other settings would not continue it exactly ("
                         + "; ".join(diff) + "): pass the checkpoint's, or train into another directory")


HISTORY = "history.jsonl"  # every step's record, beside the checkpoints


def _history_upto(ckpt_dir: str, step: int) -> None:
    """Keep the history records of steps <= `step`: the steps a killed run took after its last
    checkpoint are trained again on resume, and recorded again."""
    path = os.path.join(ckpt_dir, HISTORY)
    if os.path.isfile(path):
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):  # torn by a kill mid-append: those steps are redone
                    continue
        _atomic_write_text(path, "".join(keep))


def _append_history(ckpt_dir: str, records: list) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(ckpt_dir, HISTORY), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def init_weights(ckpt_dir: str, model, ema) -> None:
    """Load a finished run's EMA weights into model and EMA (sha256-checked, keys strict)."""
    tensors, _ = read_checkpoint_file(ckpt_dir)
    weights = prefixed(tensors, "ema.")
    _load_weights(model, weights, "model (init_from)")
    _load_weights(ema, weights, "EMA (init_from)")




def _any_rank(flag: bool, world_size: int) -> bool:
    """Whether `flag` holds on any rank (one all-reduce when distributed). Budget stops use it: each
    rank has its own clock and its own batches' FLOPs, and a rank that stopped alone would leave the
    others waiting in a collective."""
    if world_size == 1:
        return flag
    import torch.distributed as dist
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _all_finite(loss, world_size: int) -> bool:
    """Whether the loss is finite on every rank (one all-reduce when distributed)."""
    return not _any_rank(not bool(torch.isfinite(loss.detach()).all()), world_size)


def guarded_update(loss, opt, params, grad_clip: float, world_size: int, what: str, step: int, check=None):
    """backward -> clip -> optimizer step -> clear gradients, unless the loss (on any rank: every rank
    then skips together, or the collectives would hang) or the gradient norm is not finite: then
    nothing is updated. `check`: the losses to test instead of `loss` (every accumulated batch's).
    Returns the gradient norm, or None for a skipped step (the caller counts it)."""
    if not _all_finite(loss if check is None else check, world_size):
        log.warning("%s %d: non-finite loss, step skipped", what, step)
        opt.zero_grad(set_to_none=True)
        return None
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor of the global norm
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        log.warning("%s %d: non-finite gradient norm, step skipped", what, step)
        opt.zero_grad(set_to_none=True)
        return None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def grad_sync(net, sync: bool):
    """Context for one accumulated batch's backward: with `sync` False the gradient all-reduce (DDP)
    or reduce-scatter (FSDP) is held back, so a step's batches cost one sync, not one each."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if _fsdp(net):
        @contextlib.contextmanager
        def unsynced():
            net.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                net.set_requires_gradient_sync(True)
        return unsynced()
    return contextlib.nullcontext()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    log.info("training on %s", dev)
    return dev


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def compile_default(device: torch.device) -> bool:
    """Whether to compile when not told: on CUDA where inductor can build its kernels (triton present;
    an H100's bf16 step 1.9-2.0x eager), not on CPU (1.03-1.06x for the compile's wait). Decided here,
    on the worker that trains: a Ray job's head may be a CPU node driving GPU workers."""
    import importlib.util
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process drives (a local one is started if none is running). Where
    Ray work runs is decided by these, not by this process's own CUDA: a Ray job's driver runs on the
    head node, often a CPU machine driving GPU workers, and asked for no GPU there would leave them idle."""
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    return float(ray.cluster_resources().get("GPU", 0))


def adamw(params, device: torch.device, sharded: bool = False, **kw) -> torch.optim.AdamW:
    """AdamW; on CUDA the fused kernel (nanoGPT's choice): one pass over each parameter's state instead
    of the foreach implementation's several. Not under FSDP (DTensor parameters: foreach is the path
    tested there). The state_dict is the same either way, so checkpoints move between the two."""
    return torch.optim.AdamW(params, fused=True if device.type == "cuda" and not sharded else None, **kw)


def train(cfg: TrainConfig, data, rank: int = 0, world_size: int = 1, report=None) -> TrainResult:
    """Train a DiT with rectified flow. `data`: a list of (latent (C, T, H, W), text (L, D_text))
    pairs, or an iterator of batches {"packed": Packed, "text", "text_cu"} with state_dict() /
    load_state_dict() (e.g. one fed from the Delta latents table). `report(metrics)` is called at
    each log step (Ray Train's ray.train.report). Resumes from cfg.ckpt_dir when it holds one."""
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    check_ratios(cfg.cond_ratios)  # fail before building anything
    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    fsdp = world_size > 1 and cfg.strategy == "fsdp"
    torch.manual_seed(cfg.seed)
    model = DiT(cfg.dit).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if fsdp:  # shard before the optimizer is built: it must hold the sharded parameters
        from torch.distributed.fsdp import fully_shard
        for m in (model, ema):  # the EMA sharded the same way, so its update stays shard-local
            for block in m.blocks:
                fully_shard(block)
            fully_shard(m)
    opt = adamw(model.parameters(), device, fsdp, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    batches = data if hasattr(data, "state_dict") else PackedBatches(data, cfg.dit.patch, cfg.max_tokens, cfg.seed,
                                                                     rank, world_size)
    flow = RectifiedFlow(cfg.base_tokens, cfg.logit_mean, cfg.logit_std)
    step, skipped, flops = 0, 0, 0.0
    if cfg.ckpt_dir and cfg.resume and os.path.exists(os.path.join(cfg.ckpt_dir, "latest.json")):
        meta = load_checkpoint(cfg.ckpt_dir, model, ema, opt, gen, batches, device, rank, world_size)
        check_resume_config(meta.get("config", {}), cfg)
        step, skipped, flops = meta["step"], meta["skipped"], meta["flops"]
        log.info("resumed from %s at step %d", cfg.ckpt_dir, step)
    elif cfg.init_from:
        init_weights(cfg.init_from, model, ema)
        log.info("initialised from %s (fine-tuning)", cfg.init_from)
    if cfg.ckpt_dir and rank == 0:  # history.jsonl is written with each checkpoint: a resume continues it exactly
        _history_upto(cfg.ckpt_dir, step)
    flushed = 0  # records of `history` already in history.jsonl
    if compile_default(device) if cfg.compile is None else cfg.compile:  # after sharding (FSDP2 wraps the blocks first), before DDP's wrapper
        compile_blocks(model)
    net = model
    if world_size > 1 and not fsdp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if cuda else None)
    history, t_start, stop = [], time.time(), "steps"
    while step < cfg.steps:
        over = ("max_seconds" if cfg.max_seconds is not None and time.time() - t_start >= cfg.max_seconds else
                "max_flops" if cfg.max_flops is not None and flops >= cfg.max_flops else None)
        if (cfg.max_seconds is not None or cfg.max_flops is not None) and _any_rank(over is not None, world_size):
            stop = over or "budget (another rank)"
            break
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        losses, n_tok = [], 0
        for k in range(cfg.grad_accum):
            batch = next(batches)
            packed: Packed = batch["packed"].to(device)
            text, text_cu = batch["text"].to(device), batch["text_cu"].to(device)
            drop = torch.rand(len(packed.grids), generator=gen, device=device) < cfg.cfg_dropout
            clean = sample_clean_tokens(packed, cfg.cond_ratios, gen)  # (N,) bool held at t = 0, or None

            def model_fn(z, t):
                return net(z, t, packed.positions, packed.cu_seqlens, text, text_cu, drop)

            last = k == cfg.grad_accum - 1
            with grad_sync(net, last):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = flow.loss(model_fn, packed.tokens, packed.cu_seqlens, generator=gen, clean=clean)
                losses.append(loss.detach())
                if not last:
                    (loss / cfg.grad_accum).backward()
            n = packed.tokens.shape[0]
            n_tok += n
            # cross-attention: each sample's tokens attend to its own text (a CFG-dropped one: 1 null token)
            seqlens, cu = batch["packed"].seqlens.cpu().double(), batch["text_cu"].cpu()
            text_lens = torch.where(drop.cpu(), 1, cu[1:] - cu[:-1]).double()
            text_len = float((seqlens * text_lens).sum() / seqlens.sum())
            flops += 3 * model.flops_per_token(seqlens.tolist(), text_len) * n
        step += 1
        grad_norm = guarded_update(loss / cfg.grad_accum, opt, model.parameters(), cfg.grad_clip, world_size, "step",
                                   step, check=torch.stack(losses))
        if grad_norm is None:  # no EMA update and no record, but still its checkpoint (below)
            skipped += 1
        else:
            with torch.no_grad():  # EMA, with a warmup so short runs are not dominated by the init
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            rec = {"step": step, "loss": torch.stack(losses).mean().item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "skipped": skipped, "tokens": n_tok, "flops": flops}
            history.append(rec)
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
                log.info("step %d loss %.4f lr %.2e grad %.3f skipped %d", step, rec["loss"], lr, rec["grad_norm"],
                         skipped)
                if report is not None:
                    report(rec)
        # every rank calls save_checkpoint: a multi-rank save gathers from all of them, rank 0 writes
        if cfg.ckpt_dir and cfg.ckpt_every and step % cfg.ckpt_every == 0:
            if rank == 0:  # before the checkpoint: a kill between the two leaves records a resume drops
                _append_history(cfg.ckpt_dir, history[flushed:])
                flushed = len(history)
            save_checkpoint(cfg.ckpt_dir, model, ema, opt, gen, batches, step, skipped, flops, cfg, cfg.keep_ckpts,
                            rank, world_size)
    if cfg.ckpt_dir:
        if rank == 0:
            _append_history(cfg.ckpt_dir, history[flushed:])
        save_checkpoint(cfg.ckpt_dir, model, ema, opt, gen, batches, step, skipped, flops, cfg, cfg.keep_ckpts,
                        rank, world_size)
    return TrainResult(history, model, ema, step, skipped, stop, flops)


def ray_worker(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this Ray Train worker; on a GPU worker, its GPU made current."""
    import ray.train

    ctx = ray.train.get_context()
    if torch.cuda.is_available():
        import ray.train.torch
        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        device = str(dev)
    return ctx.get_world_rank(), ctx.get_world_size(), device


def train_loop_per_worker(config: dict):
    """Ray Train entry point (TorchTrainer). config: {"train": TrainConfig as a dict, "data": a list of
    (latent, text) pairs or a zero-argument callable returning the pairs / a batch iterator}.
    The process group is set up by TorchTrainer; this only runs `train` with this worker's rank."""
    import ray.train

    cfg = TrainConfig.from_dict(config["train"])
    rank, world_size, cfg.device = ray_worker(cfg.device)
    data = config["data"]() if callable(config["data"]) else config["data"]
    train(cfg, data, rank=rank, world_size=world_size, report=ray.train.report)
