"""Dataset specs: `datasets/<name>.yaml` validated into a `DatasetSpec`.

A spec says how footage becomes clips (analysis size, shot detection, clip lengths, transcode
or reference) and which clips are kept (filter thresholds, dedup). Unknown keys are errors, so a
typo never silently falls back to a default. `spec_hash` is the hash of the validated spec, the
lineage key every commit records.
"""
import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    # a NaN threshold passes every clip (each comparison is false) and an infinite max_seconds
    # fails every source's clip plan: neither is a setting anyone means
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AnalysisSpec(_Strict):
    short_side: int = Field(144, ge=32, le=1080, description="decode for analysis at this short side (pixels)")
    threads: int = Field(0, ge=0, description="decoder threads per video; 0 = auto (one thread for frames under 200k pixels, else the codec default)")
    timeout_s: float = Field(600.0, gt=0, description="per-source analysis time limit (s)")


class ShotSpec(_Strict):
    content_threshold: float = Field(27.0, gt=0, description="ContentDetector threshold (hard cuts)")
    adaptive_threshold: float = Field(3.0, gt=0, description="AdaptiveDetector ratio threshold (dissolves)")
    fade_threshold: float = Field(3.0, gt=0, description="ThresholdDetector mean level 0-255 below which a frame is black (fades); a dim shot stays above it")
    min_shot_frames: int = Field(4, ge=1, description="detector debounce; minimum clip length is a filter")


class ClipSpec(_Strict):
    mode: Literal["transcode", "reference"] = "transcode"
    min_seconds: float = Field(1.0, ge=0)
    max_seconds: float = Field(8.0, gt=0)
    trim_frames: int = Field(0, ge=0, description="frames dropped at each shot edge (transition residue)")
    crf: int = Field(20, ge=0, le=51)
    # libx264's presets: a typo failed every clip's transcode, after the whole decode and analysis
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                    "veryslow", "placebo"] = "veryfast"

    @model_validator(mode="after")
    def _order(self):
        if self.max_seconds <= self.min_seconds:
            raise ValueError(f"max_seconds ({self.max_seconds}) must exceed min_seconds ({self.min_seconds})")
        return self


class FilterSpec(_Strict):
    """Thresholds a clip must pass to be kept; None disables a threshold."""
    min_motion: Optional[float] = 0.05
    max_blur: Optional[float] = 0.85
    min_brightness: Optional[float] = 0.08
    max_brightness: Optional[float] = 0.95
    max_text_ratio: Optional[float] = None
    min_aesthetic: Optional[float] = None
    drop_static: bool = True

    @model_validator(mode="after")
    def _order(self):  # min above max filtered every clip, each with a reason that looked plausible
        if None not in (self.min_brightness, self.max_brightness) and self.min_brightness > self.max_brightness:
            raise ValueError(f"min_brightness ({self.min_brightness}) exceeds max_brightness ({self.max_brightness})")
        return self


class DedupSpec(_Strict):
    feature: Literal["auto", "embedding", "layout"] = Field(
        "auto", description="embedding = CLIP; layout = edge layout of a few frames; auto = CLIP when real "
                            "weights are given (embedding.pretrained), else layout (random CLIP embeds all alike)")
    threshold: float = Field(0.95, gt=0, le=1, description="CLIP cosine at or above which clips are duplicates")
    layout_threshold: float = Field(0.7, gt=0, le=1, description="edge-layout cosine for the layout feature")
    method: Literal["auto", "exact", "faiss"] = "auto"
    exact_max: int = Field(20000, ge=1, description="auto uses exact pairwise up to this many clips")


class EmbeddingSpec(_Strict):
    model: str = "ViT-B-32"
    pretrained: Optional[str] = Field(None, description="local path to open_clip weights; None = random init from config")
    frames_per_clip: int = Field(3, ge=1, le=16)
    aesthetic_weights: Optional[str] = Field(None, description="local safetensors/state-dict of the aesthetic MLP head")


class StageResources(_Strict):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    concurrency: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    threads: int = Field(0, ge=0, description="torch threads per actor; 0 = Ray's share (OMP_NUM_THREADS, >= 1)")


class ResourceSpec(_Strict):
    # Sized so every stage fits a 2-CPU machine at once (2 x 0.75 + 0.5): with 1 CPU each, the embed
    # actor waited for the analysis to end, and embedding ran after it instead of streaming beside it
    # (full demo runs 7-14% slower, resumes 1-3 s slower, measured side by side)
    analyze: StageResources = StageResources(num_cpus=0.75, concurrency=2, batch_size=1)
    # The embed actor claims half a CPU, so Ray gives it one torch thread; the analysis of the demo is
    # done in the first third of the run, and two threads embed 1.9x faster once it is (measured).
    embed: StageResources = StageResources(num_cpus=0.5, concurrency=1, batch_size=16, threads=2)
    caption: StageResources = StageResources(num_cpus=1, concurrency=1, batch_size=8)


class DatasetSpec(_Strict):
    name: str = "demo"
    analysis: AnalysisSpec = AnalysisSpec()
    shots: ShotSpec = ShotSpec()
    clips: ClipSpec = ClipSpec()
    filters: FilterSpec = FilterSpec()
    dedup: DedupSpec = DedupSpec()
    embedding: EmbeddingSpec = EmbeddingSpec()
    resources: ResourceSpec = ResourceSpec()

    def spec_hash(self, *sections: str) -> str:
        """Hash of the validated spec, or of only the named sections (what some result depends on)."""
        d = self.model_dump(mode="json")
        blob = json.dumps({k: d[k] for k in sections} if sections else d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class SpecError(ValueError):
    """A spec that does not validate; the message names each bad field."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML keeps the last one, so a
    second `filters:` section silently discarded every threshold of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                k = self.construct_object(key)
                if k in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {k!r}", key.start_mark)
                seen.add(k)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def load_spec(path: Optional[str | Path] = None) -> DatasetSpec:
    """Read and validate a YAML spec; None gives the built-in defaults (= datasets/demo.yaml)."""
    if path is None:
        return DatasetSpec()
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec {path} is a directory, not a YAML file" if path.is_dir() else f"spec file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:  # a spec saved as Latin-1, say: a traceback before
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:  # its text spans lines (context, then the problem): one line
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(f"{path}: not valid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return spec_from_dict(raw, str(path))


def spec_from_dict(raw: dict, where: str) -> DatasetSpec:
    """A spec from its mapping (a YAML file's, or one a commit recorded); SpecError in one line naming
    `where` and each bad field (pydantic's own message spans several lines per field)."""
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise SpecError(f"{where}: invalid spec: " + "; ".join(lines)) from None
