"""CLIP embeddings of a few frames per clip, and the aesthetic head that scores them.

`ClipEmbedder` is the Ray Data stage (a callable class: the model loads once per actor in
`__init__`, `__call__` embeds one batch). It reads the `frames` column (per row, a list of JPEG bytes:
a few frames of the clip, e.g. the decode pass's thumbnails) and adds
    embedding    float32 (D,): L2-normalised mean of the L2-normalised frame embeddings; None on failure
    aesthetic    float32: the aesthetic head's score of that embedding; NaN without a head or on failure
    embed_error  str or None: why this row has no embedding (a corrupt JPEG, no frames, ...)
A bad row never fails its batch.

The model is an open_clip model built without any download: a built-in config name with
`pretrained=None` (random init, seeded, so every actor builds the same network) or a local checkpoint
file, or `local-dir:/path` holding `open_clip_config.json` (and optionally its weights).

`AestheticHead` is the LAION improved-aesthetic-predictor MLP (D-1024-128-64-16-1, dropout, no
activations: their layout, so their published state dicts load as they are); `train_aesthetic` fits one
on our own labels and saves it as safetensors.
"""
import io
import logging
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)


class AestheticHead(nn.Module):
    """Score L2-normalised CLIP embeddings (N, D) -> (N,). Higher = better looking."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)  # (N,)

    @classmethod
    def load(cls, path: str | Path) -> "AestheticHead":
        """From a local .safetensors file, or a state dict saved by torch (loaded with weights_only=True)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"aesthetic head weights not found: {path}")
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        head = cls(int(state["layers.0.weight"].shape[1]))
        head.load_state_dict(state)
        return head.eval()

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"embed_dim": str(self.embed_dim)})


def train_aesthetic(embeddings: np.ndarray, labels: np.ndarray, out_path: str | Path, *, epochs: int = 300,
                    lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 1e-2,
                    seed: int = 0) -> dict[str, list[float]]:
    """Fit an AestheticHead by MSE to `labels` (1 good / 0 low quality, or any real-valued score).

    embeddings: (N, D) CLIP embeddings (re-normalised here, as ClipEmbedder's are). Saves the head to
    `out_path` (safetensors) and returns {"loss": mean training loss per epoch}.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32)).reshape(-1)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as embeddings, got {len(y)} labels for {len(x)} embeddings")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = AestheticHead(x.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": []}
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.mse_loss(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history["loss"].append(total / len(x))
    head.eval()
    head.save(out_path)
    return history


def _decode_jpeg(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(bytes(data)))
    img.load()  # decode now, so a corrupt file fails here with its row, not later in the batch
    return img.convert("RGB")


class ClipEmbedder:
    """Ray Data stage: `ds.map_batches(ClipEmbedder, fn_constructor_kwargs={...}, concurrency=, num_gpus=)`.

    model: an open_clip config name ("ViT-B-32") or "local-dir:/path" (open_clip_config.json + optional
    weights). pretrained: None (random init from config, seeded by `seed`) or a local checkpoint file.
    aesthetic_weights: local file for AestheticHead.load; None leaves `aesthetic` NaN. Uses CUDA when
    available, else CPU, and logs which.
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None,
                 aesthetic_weights: str | None = None, seed: int = 0, device: str | None = None,
                 max_batch: int = 64):
        if model.startswith("hf-hub:"):
            raise ValueError(f"{model}: no model hub at run time; use a config name or local-dir:/path")
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip weights must be a local file (no downloads): {pretrained}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # a random-init model must be the same network in every actor
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained, device=self.device)
        self.model.eval()
        self.model_name = model
        self.head = AestheticHead.load(aesthetic_weights).to(self.device) if aesthetic_weights else None
        dim = getattr(self.model.visual, "output_dim", None)
        if self.head is not None and dim is not None and dim != self.head.embed_dim:
            raise ValueError(f"aesthetic head {aesthetic_weights} expects {self.head.embed_dim}-d embeddings, "
                             f"{model} makes {dim}-d")
        self.max_batch = max_batch
        log.info("ClipEmbedder %s (weights: %s, aesthetic head: %s) on %s", model, pretrained or "random init",
                 aesthetic_weights or "none", self.device)

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed -> (N, D) L2-normalised float32, in chunks of max_batch."""
        out = []
        for i in range(0, len(images), self.max_batch):
            with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                f = self.model.encode_image(images[i:i + self.max_batch].to(self.device))
            out.append(nn.functional.normalize(f.float(), dim=-1))
        return torch.cat(out)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """(N, D) float32 L2-normalised text embeddings in the same space (for text search over clips)."""
        tokens = open_clip.get_tokenizer(self.model_name)(texts).to(self.device)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()

    def _rows(self, pixels: list[torch.Tensor], owners: list[int], n: int):
        """Per-row mean embeddings from per-frame pixels: (n, D), L2-normalised (zero for a row with no
        frames; such a row already carries its error)."""
        feats = self._encode(torch.stack(pixels))
        sums = torch.zeros(n, feats.shape[1], device=feats.device).index_add_(
            0, torch.as_tensor(owners, device=feats.device), feats)
        return nn.functional.normalize(sums, dim=-1)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        """Add embedding / aesthetic / embed_error to a batch. Prefer `batch_format="pyarrow"`: the
        result is then typed (embedding list<float32> with nulls) and `frames` stays list<binary>; a
        numpy batch gets numpy columns back (embedding an object array holding None for failed rows)."""
        arrow = isinstance(batch, pa.Table)
        frames = batch.column("frames").to_pylist() if arrow else batch["frames"]
        n = len(frames)
        errors: list[str | None] = [None] * n
        pixels, owners = [], []
        for r, jpegs in enumerate(frames):
            try:
                if jpegs is None or len(jpegs) == 0:
                    raise ValueError("no frames")
                row = [self.preprocess(_decode_jpeg(j)) for j in jpegs]
            except Exception as e:  # a corrupt or missing frame fails its row only
                errors[r] = f"frame decode failed: {type(e).__name__}: {e}"
                continue
            pixels += row
            owners += [r] * len(row)

        emb = torch.full((n, 1), float("nan"))
        if pixels:
            try:
                emb = self._rows(pixels, owners, n)
            except Exception as e:  # e.g. out of memory: retry row by row so one row cannot sink the rest
                log.warning("batched embedding failed (%s); retrying row by row", e)
                emb = None
                for r in sorted(set(owners)):
                    mine = [p for p, o in zip(pixels, owners) if o == r]
                    try:
                        e_r = self._rows(mine, [0] * len(mine), 1)
                    except Exception as e2:
                        errors[r] = f"embedding failed: {type(e2).__name__}: {e2}"
                        continue
                    if emb is None:
                        emb = torch.full((n, e_r.shape[1]), float("nan"), device=e_r.device)
                    emb[r] = e_r[0]
                if emb is None:
                    emb = torch.full((n, 1), float("nan"))

        aesthetic = torch.full((n,), float("nan"))
        if self.head is not None and emb.shape[1] == self.head.embed_dim:  # (n, 1) when no row embedded
            aesthetic = self.head(torch.nan_to_num(emb.to(self.device))).float()
        emb_np = emb.cpu().numpy().astype(np.float32)
        aesthetic_np = aesthetic.cpu().numpy().astype(np.float32)

        for r in range(n):
            if errors[r] is None and not np.isfinite(emb_np[r]).all():
                errors[r] = "embedding not finite"
            if errors[r] is not None:
                aesthetic_np[r] = np.nan
        embedding = [emb_np[r] if errors[r] is None else None for r in range(n)]
        if arrow:
            for name, col in (("embedding", pa.array(embedding, type=pa.list_(pa.float32()))),
                              ("aesthetic", pa.array(aesthetic_np, type=pa.float32())),
                              ("embed_error", pa.array(errors, type=pa.string()))):
                if name in batch.column_names:
                    batch = batch.drop_columns([name])
                batch = batch.append_column(name, col)
            return batch
        out = np.empty(n, dtype=object)
        out[:] = embedding
        batch = dict(batch)
        batch["embedding"] = out
        batch["aesthetic"] = aesthetic_np
        batch["embed_error"] = np.array(errors, dtype=object)
        return batch
