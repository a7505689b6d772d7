"""The latents table (pinned version) -> packed training batches for generator.train.train().

    batches = LatentBatches("data/demo", version=4, patch=(1, 2, 2), max_tokens=4096, seed=0)
    train(cfg, batches)

Rows are sorted by clip_id, then each epoch is a seeded permutation (seed, epoch; windowed over row
groups for tables of more than `window_rows` rows); a batch takes samples in that order while they
fit in `max_tokens` (Patch n' Pack: mixed durations and aspect ratios in one sequence), never
straddling an epoch. Rank r of W reads every W-th sample (of a large table, every W-th row group).
state_dict() = (epoch, position, table version, row count): resume is exact, and refuses a table
that is not the one the run started on.

Only the light columns are read up front; latent and text bytes are read a Parquet row group at a
time as batches need them (see LatentBatches), so memory does not grow with the table. Only
deltalake, pyarrow, safetensors and torch are imported.
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
    path, dt = _open_latents(root, version)
    keys = ["clip_id", "vae_sha", "text_encoder_sha"]
    table = arrow_table(dt, None if columns is None else sorted(set(columns) | set(keys)))
    return _one_pair(table, path, dt.version(), vae_sha, text_encoder_sha), dt.version()


def _open_latents(root, version):
    path = latents_path(root)
    return path, open_version(path, version, f"no latents table under {root} (run `spacetime precompute` first)")


def _one_pair(table: pa.Table, path: str, version: int, vae_sha, text_encoder_sha) -> pa.Table:
    """The rows of the encoder pair the sha prefixes pick (ValueError when none or several), by clip_id."""
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
        raise ValueError(f"no latents rows in {path} version {version} for vae {vae_sha} / text {text_encoder_sha}")
    return table.sort_by("clip_id")


def row_tensors(table: pa.Table, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent (C, t, h, w), text (L, D)) of row i."""
    return (tensor_from_bytes(table["latent"][i].as_py(), "latent"),
            tensor_from_bytes(table["text_embedding"][i].as_py(), "text"))


def load_pairs(root, version: int | None = None, **pick) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All (latent, text) pairs of a table version in memory, sorted by clip_id: the list form
    train() also accepts. `pick`: vae_sha / text_encoder_sha as for read_latents."""
    table, _ = read_latents(root, version, **pick)
    return [row_tensors(table, i) for i in range(table.num_rows)]


LIGHT = ["clip_id", "bucket", "vae_sha", "text_encoder_sha", "clips_version"]  # planning columns


class LatentBatches(PackedBatches):
    """Endless deterministic packed batches {"packed", "text", "text_cu"} from a latents table version:
    PackedBatches' packing, with samples read from the table as they are needed.

    Memory stays flat as the table grows: only the light columns (clip id, bucket, encoder shas) are
    read up front; latent and text bytes are read one Parquet row group (a "unit") at a time and
    dropped once `2 * window_rows` newer rows are cached. So that batches do not touch a random unit
    per sample, an epoch shuffles the units, groups them into windows of >= `window_rows` rows and
    shuffles rows within each window (WebDataset-style). A version of <= window_rows rows is one
    window: a full permutation of the rows sorted by clip_id, as PackedBatches draws it. With W ranks
    and >= 4 W units, rank r takes every W-th unit of the epoch's unit order and reads only those
    (epochs then differ by up to a unit's rows between ranks); otherwise every W-th row."""

    def __init__(self, root, version: int | None, patch=(1, 2, 2), max_tokens: int = 4096, seed: int = 0,
                 rank: int = 0, world_size: int = 1, vae_sha: str | None = None, text_encoder_sha: str | None = None,
                 window_rows: int = 2048):
        self.root, self.patch, self.max_tokens, self.seed = str(Path(root)), tuple(patch), max_tokens, seed
        self.rank, self.world_size, self.window_rows = rank, world_size, window_rows
        path, dt = _open_latents(root, version)
        self.version = dt.version()
        ds = dt.to_pyarrow_dataset()
        self._schema = ds.schema
        self._units = [rg for f in sorted(ds.get_fragments(), key=lambda f: f.path) for rg in f.split_by_row_group()]
        parts = []
        for u, frag in enumerate(self._units):  # the light columns only; use_threads=False: see arrow_table
            t = frag.to_table(schema=self._schema, columns=[c for c in LIGHT if c in self._schema.names],
                              use_threads=False)
            parts.append(t.append_column("_unit", pa.array([u] * t.num_rows, pa.int32()))
                          .append_column("_row", pa.array(range(t.num_rows), pa.int32())))
        if not parts:
            raise ValueError(f"no latents rows in {path} version {self.version}")
        self.table = _one_pair(pa.concat_tables(parts), path, self.version, vae_sha, text_encoder_sha)
        self._check_size()
        self._unit_of = self.table["_unit"].to_numpy()
        self._row_in_unit = self.table["_row"].to_numpy()
        self._unit_rows = {}  # unit -> its sample indices (into the clip_id-sorted table), in order
        for i, u in enumerate(self._unit_of.tolist()):
            self._unit_rows.setdefault(u, []).append(i)
        self._cache: dict = {}  # unit -> (latent bytes, text bytes) columns, least recently used first
        b = self.table["bucket"]
        grid = zip(pc.struct_field(b, "frames").to_pylist(), pc.struct_field(b, "height").to_pylist(),
                   pc.struct_field(b, "width").to_pylist())
        # tokens per sample from the bucket column alone: no latent is decoded to plan batches
        self.tokens = [math.prod(s // p for s, p in zip(g, self.patch)) for g in grid]
        if min(self.tokens) < 1:
            raise ValueError(f"a latent is smaller than one patch {self.patch}")
        if max(self.tokens) > max_tokens:
            raise ValueError(f"a sample has {max(self.tokens)} tokens > max_tokens {max_tokens}")
        z, y = self._sample(0)
        self.channels, self.text_dim = z.shape[0], y.shape[1]
        self.vae_sha = self.table["vae_sha"][0].as_py()
        self.text_encoder_sha = self.table["text_encoder_sha"][0].as_py()
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    def __len__(self):
        return self.table.num_rows

    def _epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if len(self) <= self.window_rows:  # one window: every row in one permutation
            return torch.randperm(len(self), generator=g)[self.rank::self.world_size].tolist()
        units = sorted(self._unit_rows)
        perm = torch.randperm(len(units), generator=g).tolist()
        # with enough units each rank takes every W-th unit and reads only those (I/O x 1); with few,
        # every W-th row of the whole order, so no rank is left without data
        shard = len(units) >= 4 * self.world_size
        if shard:
            perm = perm[self.rank::self.world_size]
        shuffled = lambda rows: [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()]
        order, window = [], []
        for k in perm:
            window += self._unit_rows[units[k]]
            if len(window) >= self.window_rows:
                order, window = order + shuffled(window), []
        order += shuffled(window)
        return order if shard else order[self.rank::self.world_size]

    def _columns(self, u: int):
        """Latent and text bytes of unit u, read on first use; the least recently used units are dropped
        while more than 2 * window_rows rows are cached."""
        if u in self._cache:
            self._cache[u] = self._cache.pop(u)  # most recently used last
        else:
            t = self._units[u].to_table(schema=self._schema, columns=["latent", "text_embedding"], use_threads=False)
            self._cache[u] = (t["latent"], t["text_embedding"])
            while sum(len(c[0]) for c in self._cache.values()) > 2 * self.window_rows and len(self._cache) > 1:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[u]

    def _sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        latent, text = self._columns(int(self._unit_of[i]))
        r = int(self._row_in_unit[i])
        return tensor_from_bytes(latent[r].as_py(), "latent"), tensor_from_bytes(text[r].as_py(), "text")

    @classmethod
    def for_ray_worker(cls, *args, **kw) -> "LatentBatches":
        """Built inside a Ray Train worker: rank and world size come from its train context."""
        import ray.train

        ctx = ray.train.get_context()
        return cls(*args, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), **kw)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "latents_version": self.version, "rows": len(self),
                "window_rows": self.window_rows}

    def load_state_dict(self, s):
        if s.get("latents_version", self.version) != self.version or s.get("rows", len(self)) != len(self):
            raise ValueError(f"checkpoint was trained on latents version {s.get('latents_version')} ({s.get('rows')} "
                             f"rows), this run reads version {self.version} ({len(self)} rows): resume would not be exact")
        was = s.get("window_rows", self.window_rows)
        if was != self.window_rows and len(self) > min(was, self.window_rows):  # the orders differ
            raise ValueError(f"checkpoint was trained with window_rows {was}, this run has {self.window_rows}: "
                             f"resume would not be exact")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._order = self._epoch_order()

    def _pairs(self, chosen: list[int]) -> list:
        return [(crop_to_patch(z, self.patch), y) for z, y in (self._sample(i) for i in chosen)]
