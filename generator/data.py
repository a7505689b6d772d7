"""The latents table (pinned version) -> packed training batches for generator.train.train().

    batches = LatentBatches("data/demo", version=4, patch=(1, 2, 2), max_tokens=4096, seed=0)
    train(cfg, batches)

Rows are sorted by clip_id, then each epoch is a seeded permutation (seed, epoch); a batch takes
samples in that order while they fit in `max_tokens` (Patch n' Pack: mixed durations and aspect
ratios in one sequence), never straddling an epoch. Rank r of W reads every W-th sample of each
epoch's permutation. state_dict() = (epoch, position, table version, row count): resume is exact,
and refuses a table that is not the one the run started on.

The latent and text bytes stay in Arrow memory and are decoded per batch, so the Python heap holds
only the current batch's tensors. Only deltalake, pyarrow, safetensors and torch are imported.
"""
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from generator.patches import crop_to_patch
from generator.train import PackedBatches
from generator.precompute import arrow_table, latents_path, open_version, tensor_from_bytes


def read_latents(root, version: int | None = None, vae_sha: str | None = None,
                 text_encoder_sha: str | None = None, columns: list[str] | None = None) -> tuple[pa.Table, int]:
    """(rows of one encoder pair, the version read) from <root>/latents at `version` (None = latest).

    vae_sha / text_encoder_sha pick the encoder pair (prefix match); when the table holds several
    pairs one must be named (ValueError lists them). Rows are sorted by clip_id."""
    path = latents_path(root)
    dt = open_version(path, version, f"no latents table under {root} (run `spacetime precompute` first)")
    keys = ["clip_id", "vae_sha", "text_encoder_sha"]
    table = arrow_table(dt, None if columns is None else sorted(set(columns) | set(keys)))
    if vae_sha:
        table = table.filter(pc.starts_with(table["vae_sha"], vae_sha))
    if text_encoder_sha:
        table = table.filter(pc.starts_with(table["text_encoder_sha"], text_encoder_sha))
    pairs = sorted(set(zip(table["vae_sha"].to_pylist(), table["text_encoder_sha"].to_pylist())))
    if len(pairs) > 1:
        listed = ", ".join(f"vae {v[:12]} / text {t[:12]}" for v, t in pairs)
        raise ValueError(f"latents table holds {len(pairs)} encoder pairs ({listed}); pick one with vae_sha / "
                         f"text_encoder_sha")
    if table.num_rows == 0:
        raise ValueError(f"no latents rows in {path} version {dt.version()} for vae {vae_sha} / text {text_encoder_sha}")
    table = table.sort_by("clip_id")
    return table, dt.version()


def row_tensors(table: pa.Table, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent (C, t, h, w), text (L, D)) of row i."""
    return (tensor_from_bytes(table["latent"][i].as_py(), "latent"),
            tensor_from_bytes(table["text_embedding"][i].as_py(), "text"))


def load_pairs(root, version: int | None = None, **pick) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All (latent, text) pairs of a table version in memory, sorted by clip_id: the list form
    train() also accepts. `pick`: vae_sha / text_encoder_sha as for read_latents."""
    table, _ = read_latents(root, version, **pick)
    return [row_tensors(table, i) for i in range(table.num_rows)]


class LatentBatches(PackedBatches):
    """Endless deterministic packed batches {"packed", "text", "text_cu"} from a latents table version:
    PackedBatches' order and packing, with samples read from the table as they are needed."""

    def __init__(self, root, version: int | None, patch=(1, 2, 2), max_tokens: int = 4096, seed: int = 0,
                 rank: int = 0, world_size: int = 1, vae_sha: str | None = None, text_encoder_sha: str | None = None):
        self.root, self.patch, self.max_tokens, self.seed = str(Path(root)), tuple(patch), max_tokens, seed
        self.rank, self.world_size = rank, world_size
        self.table, self.version = read_latents(root, version, vae_sha, text_encoder_sha)
        b = self.table["bucket"]
        grid = zip(pc.struct_field(b, "frames").to_pylist(), pc.struct_field(b, "height").to_pylist(),
                   pc.struct_field(b, "width").to_pylist())
        # tokens per sample from the bucket column alone: no latent is decoded to plan batches
        self.tokens = [math.prod(s // p for s, p in zip(g, self.patch)) for g in grid]
        if min(self.tokens) < 1:
            raise ValueError(f"a latent is smaller than one patch {self.patch}")
        if max(self.tokens) > max_tokens:
            raise ValueError(f"a sample has {max(self.tokens)} tokens > max_tokens {max_tokens}")
        z, y = row_tensors(self.table, 0)
        self.channels, self.text_dim = z.shape[0], y.shape[1]
        self.vae_sha = self.table["vae_sha"][0].as_py()
        self.text_encoder_sha = self.table["text_encoder_sha"][0].as_py()
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    def __len__(self):
        return self.table.num_rows

    @classmethod
    def for_ray_worker(cls, *args, **kw) -> "LatentBatches":
        """Built inside a Ray Train worker: rank and world size come from its train context."""
        import ray.train

        ctx = ray.train.get_context()
        return cls(*args, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), **kw)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "latents_version": self.version, "rows": len(self)}

    def load_state_dict(self, s):
        if s.get("latents_version", self.version) != self.version or s.get("rows", len(self)) != len(self):
            raise ValueError(f"checkpoint was trained on latents version {s.get('latents_version')} ({s.get('rows')} "
                             f"rows), this run reads version {self.version} ({len(self)} rows): resume would not be exact")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._order = self._epoch_order()

    def _pairs(self, chosen: list[int]) -> list:
        return [(crop_to_patch(z, self.patch), y) for z, y in (row_tensors(self.table, i) for i in chosen)]
