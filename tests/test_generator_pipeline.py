"""Generator data path end to end: clips table -> train-vae -> precompute (Ray) -> latents table -> DiT training.

A tiny dataset is built here: mp4 clips rendered with PyAV (one a rotated source read by frame
range), a PNG image (a 1-frame clip), an unreadable file, and a clips Delta table with the contract
columns. Everything runs through the real CLI commands, real Ray Data and real Delta files.
"""
import json
import subprocess
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
import typer
from deltalake import DeltaTable, write_deltalake
from typer.testing import CliRunner

from generator.conditioning import TASK_MIX, check_ratios
from generator.data import LatentBatches, load_pairs, read_latents
from generator.precompute import decode_clip, pick_frames, pick_size, tensor_from_bytes
from pipeline.schema import CLIPS_SCHEMA
from spacetime.cli_generator import register

VAE_CHANNELS = "8,16,16"   # space factor 4, time factor 4: seconds to train on CPU
# a small open_clip config (text width 256) keeps model builds to about a second; ViT-B-32 is the default
ENCODERS = ["--text-encoder", "open_clip:ViT-S-32-alt", "--short-sides", "32", "--frame-buckets", "1,5,9,17"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):  # conftest: one torch thread for this module
    yield


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)
    return a


def frame_image(i: int, w: int, h: int) -> np.ndarray:
    """RGB frame i: grey level 10*i (capped) in the top-right block, a blue top-left marker, a moving red bar."""
    img = np.full((h, w, 3), 60, np.uint8)
    img[: h // 4, -w // 4:] = min(10 * i, 255)
    img[: h // 4, : w // 4] = (0, 0, 255)
    x = (3 * i) % (w - 8)
    img[h // 2: h // 2 + 8, x:x + 8] = (230, 40, 40)
    return img


def render(path, n: int, w: int, h: int):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=12, options={"crf": "12"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(frame_image(i, w, h), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def clip_row(clip_id, uri, start, end, status="kept", **kw):
    return {"clip_id": clip_id, "clip_uri": uri, "source_uri": uri, "start_frame": start, "end_frame": end,
            "fps": 12.0, "status": status, **kw}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import imageio_ffmpeg

    d = tmp_path_factory.mktemp("gen_ds")
    media = d / "media"
    media.mkdir()
    render(media / "a.mp4", 20, 64, 48)
    render(media / "b.mp4", 12, 48, 48)
    render(media / "upright.mp4", 30, 64, 48)
    # the source of a reference clip, stored sideways: its display matrix turns it 90 degrees ccw
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-display_rotation", "90",
                    "-i", str(media / "upright.mp4"), "-c", "copy", str(media / "rotated.mp4")], check=True)
    cv2.imwrite(str(media / "image.png"), cv2.cvtColor(frame_image(3, 40, 56), cv2.COLOR_RGB2BGR))
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    rows = [
        clip_row("clip-a", str(media / "a.mp4"), 0, 20, caption_dense="a red bar slides right over grey"),
        clip_row("clip-b", str(media / "b.mp4"), 0, 12, caption_teacher_dense="a square frame with a red bar"),
        clip_row("clip-ref", f"{media / 'rotated.mp4'}#frames=4-14", 4, 14, caption_short="a sideways clip",
                 rotation=270),
        clip_row("clip-img", str(media / "image.png"), 0, 1, caption_dense="a still image"),
        clip_row("clip-broken", str(media / "broken.mp4"), 0, 10, caption_dense="never decoded"),
        clip_row("clip-filtered", str(media / "a.mp4"), 0, 20, status="filtered", reason="motion < 0.1"),
        clip_row(None, str(media / "missing.mp4"), None, None, status="rejected", reason="unreadable"),
    ]
    table = pa.Table.from_pylist([{c: r.get(c) for c in CLIPS_SCHEMA.names} for r in rows], schema=CLIPS_SCHEMA)
    write_deltalake(str(d / "clips"), table)
    return d


def test_buckets_and_decode(dataset):
    assert pick_frames(20) == 17 and pick_frames(1) == 1 and pick_frames(33) == 33
    assert pick_size(1920, 1080, multiple=16) == (448, 256)       # aspect kept, long side rounded down
    assert pick_size(1080, 1920, multiple=16) == (256, 448)
    assert pick_size(48, 40, multiple=16) == (64, 64)             # smaller than every bucket: upscaled
    assert pick_size(1000, 100, (64,), 16, max_aspect=2.0) == (128, 64)
    media = dataset / "media"
    # reference URI: source frames 4..13 (10 frames) -> the 9-frame bucket from the middle (offset 0)
    v, off = decode_clip(f"{media / 'rotated.mp4'}#frames=4-14", 10, short_sides=(32,), multiple=8)
    assert off == 0 and v.shape == (9, 40, 32, 3)                  # displayed portrait: rotation honoured
    grey = [int(f[:3, :3].mean()) for f in v]                      # the top-right grey block ends up top-left
    assert abs(grey[0] - 40) < 8 and abs(grey[-1] - 120) < 8, grey  # first = source frame 4, last = 12
    blue = v[0, -4:, :4].astype(int).mean((0, 1))                  # the top-left marker ends up bottom-left
    assert blue[2] > 150 and blue[0] < 80, blue
    v, off = decode_clip(str(media / "a.mp4"), 20, short_sides=(32,), multiple=8)
    assert v.shape == (17, 32, 40, 3) and off == 1
    img, _ = decode_clip(str(media / "image.png"), 1, short_sides=(32,), multiple=8)
    assert img.shape == (1, 40, 32, 3)


@pytest.fixture(scope="module")
def vae_dir(app, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    r = CliRunner().invoke(app, ["train-vae", "--dataset", str(dataset), "--out", str(out), "--steps", "20",
                                 "--frames", "5", "--size", "32", "--channels", VAE_CHANNELS, "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    return out


def test_train_vae_cli(vae_dir):
    info = json.loads((vae_dir / "vae.json").read_text())
    assert info["clips"] == 3                       # a, b and the reference clip have >= 5 frames; the image not
    assert info["clips_version"] == 0 and info["steps"] == 20
    from generator.vae import load_vae

    vae = load_vae(str(vae_dir / "vae.safetensors"))
    assert vae.cfg.channels == (8, 16, 16) and vae.cfg.scaling_factor > 0 and vae.cfg.scaling_factor != 1.0
    assert vae.cfg.shift_factor != 0.0                # zero-mean latents for the DiT


def test_train_vae_cli_with_perceptual_and_adversarial_losses_resumes(app, dataset, vgg16_weights, tmp_path):
    """--perceptual (local VGG16 weights) and --adversarial-weight; a second run into the same --out
    needs --resume, and then continues the checkpoint to the new --steps."""
    out = tmp_path / "vae"
    args = ["train-vae", "--dataset", str(dataset), "--out", str(out), "--frames", "5", "--size", "32",
            "--channels", VAE_CHANNELS, "--batch-size", "2", "--perceptual", vgg16_weights,
            "--adversarial-weight", "0.1", "--disc-start", "2", "--ckpt-every", "2"]
    r = CliRunner().invoke(app, [*args, "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert "perceptual + adversarial (from step 2)" in r.output and "d_loss" in r.output
    info = json.loads((out / "vae.json").read_text())
    assert info["steps"] == 4 and info["train"]["perceptual"] == vgg16_weights and info["recon_psnr"] > 0
    r = CliRunner().invoke(app, [*args, "--steps", "6"])
    assert r.exit_code == 2 and "--resume" in r.output
    r = CliRunner().invoke(app, [*args, "--steps", "6", "--resume"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "vae.json").read_text())
    assert info["steps"] == 6 and info["final_loss"] > 0
    r = CliRunner().invoke(app, [*args, "--steps", "6", "--resume"])  # nothing left to train: its figures stand
    assert r.exit_code == 0, r.output
    again = json.loads((out / "vae.json").read_text())
    assert (again["steps"], again["final_loss"], again["final_psnr"]) == (6, info["final_loss"], info["final_psnr"])
    r = CliRunner().invoke(app, [*args[:-6], "--steps", "8", "--resume"])  # the checkpoint has a discriminator
    assert r.exit_code == 2 and "discriminator" in r.output
    r = CliRunner().invoke(app, ["train-vae", "--dataset", str(dataset), "--out", str(tmp_path / "x"),
                                 "--perceptual", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "perceptual weights not found" in r.output


def test_train_vae_and_train_refuse_an_out_that_is_a_file(app, tmp_path):
    """--out naming a file ended in a traceback: train-vae's after decoding every training clip, train's
    after loading the latents."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for args in (["train-vae", "--dataset", str(tmp_path / "ds"), "--out", str(f)],
                 ["train", "--dataset", str(tmp_path / "ds"), "--latents-version", "0", "--out", str(f)]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "is not a directory" in r.output and r.exception.__class__ is SystemExit, \
            (args, r.output)
    assert f.read_text() == "mine"


@pytest.mark.slow
def test_train_vae_over_ray_train_workers(app, dataset, tmp_path):
    """--workers 2: the clips decoded once, shared through the object store; DDP over gloo; rank 0's checkpoint."""
    out = tmp_path / "vae"
    r = CliRunner().invoke(app, ["train-vae", "--dataset", str(dataset), "--out", str(out), "--steps", "4",
                                 "--frames", "5", "--size", "32", "--channels", VAE_CHANNELS, "--batch-size", "1",
                                 "--adversarial-weight", "0.1", "--workers", "2"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "vae.json").read_text())
    assert info["workers"] == 2 and info["steps"] == 4


@pytest.fixture(scope="module")
def latents(app, dataset, vae_dir, ray_session):
    r = CliRunner().invoke(app, ["precompute", "--dataset", str(dataset), "--version", "0", "--vae", str(vae_dir),
                                 *ENCODERS])
    return r


def test_precompute_writes_the_latents_table(latents, dataset, vae_dir):
    assert latents.exit_code == 3, latents.output           # finished, but one clip was unreadable
    assert "clip-broken" in latents.output
    dt = DeltaTable(str(dataset / "latents"))
    assert dt.version() == 0
    t = dt.to_pyarrow_table().sort_by("clip_id")
    rows = {r["clip_id"]: r for r in t.to_pylist()}
    assert sorted(rows) == ["clip-a", "clip-b", "clip-img", "clip-ref"]   # kept and readable only
    # bucket = latent (frames, height, width): 17 -> 5, 9 -> 3, 1 -> 1 frames; 4x spatial
    assert rows["clip-a"]["bucket"] == {"frames": 5, "height": 8, "width": 10}
    assert rows["clip-b"]["bucket"] == {"frames": 3, "height": 8, "width": 8}
    assert rows["clip-ref"]["bucket"] == {"frames": 3, "height": 10, "width": 8}
    assert rows["clip-img"]["bucket"] == {"frames": 1, "height": 10, "width": 8}
    for r in rows.values():
        z = tensor_from_bytes(r["latent"], "latent")
        assert z.shape == (4, *r["bucket"].values()) and torch.isfinite(z).all()
        y = tensor_from_bytes(r["text_embedding"], "text")
        assert y.ndim == 2 and y.shape[1] == 256 and y.shape[0] >= 3
        assert r["clips_version"] == 0 and len(r["vae_sha"]) == 64 and len(r["text_encoder_sha"]) == 64
    # caption fallbacks: dense, else the teacher's dense, else short
    assert rows["clip-b"]["caption"] == "a square frame with a red bar"
    assert rows["clip-ref"]["caption"] == "a sideways clip"
    vae_sha = json.loads((vae_dir / "vae.json").read_text())["sha256"]
    assert rows["clip-a"]["vae_sha"] == vae_sha
    lineage = json.loads(dt.history(1)[0]["spacetime"])
    assert lineage["clips_version"] == 0 and lineage["rows_written"] == 4 and lineage["errors"] == 1
    assert lineage["vae_sha"] == vae_sha and lineage["error_list"][0]["clip_id"] == "clip-broken"


def test_precompute_rerun_skips_everything(app, latents, dataset, vae_dir):
    r = CliRunner().invoke(app, ["precompute", "--dataset", str(dataset), "--version", "0", "--vae", str(vae_dir),
                                 *ENCODERS])
    assert r.exit_code == 3 and "wrote 0, skipped 4 (already encoded), errors 0, 1 skipped as unreadable" in r.output, \
        r.output                                                     # the error log remembers the broken clip
    assert DeltaTable(str(dataset / "latents")).version() == 0      # no new commit
    logged = [json.loads(line) for line in (dataset / "latents_errors.jsonl").read_text().splitlines()]
    assert [e["clip_id"] for e in logged] == ["clip-broken"] and logged[0]["reason"]


def test_precompute_stores_16_bit_latents_that_read_back_as_float32(latents, dataset, vae_dir, tmp_path):
    from safetensors import safe_open

    from generator.precompute import precompute
    out = str(tmp_path / "latents_bf16")
    res = precompute(dataset, 0, str(vae_dir / "vae.safetensors"), "open_clip:ViT-S-32-alt", short_sides=(32,),
                     frame_buckets=(1, 5, 9, 17), out=out, dtype="bfloat16")
    assert res.written == 4
    full = {r["clip_id"]: r for r in DeltaTable(str(dataset / "latents")).to_pyarrow_table().to_pylist()}
    half = {r["clip_id"]: r for r in DeltaTable(out).to_pyarrow_table().to_pylist()}
    assert json.loads(DeltaTable(out).history(1)[0]["spacetime"])["dtype"] == "bfloat16"
    for cid, r in half.items():
        for col, name in (("latent", "latent"), ("text_embedding", "text")):
            path = tmp_path / f"{cid}.{name}.safetensors"
            path.write_bytes(r[col])
            with safe_open(str(path), "pt") as f:
                assert f.get_slice(name).get_dtype() == "BF16"
            assert len(r[col]) < 0.6 * len(full[cid][col])      # half the bytes (plus the header)
            a, b = tensor_from_bytes(r[col], name), tensor_from_bytes(full[cid][col], name)
            assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        precompute(dataset, 0, str(vae_dir / "vae.safetensors"), out=out, dtype="int8")


def test_precompute_error_log_holds_only_under_its_bucket_settings(dataset, vae_dir, ray_session, tmp_path):
    """A readable clip shorter than every frame bucket of one run is logged there, and encoded by a later
    run whose buckets it fits (it was skipped as 'unreadable before'). A short side off the grid is one
    error up front (it made every clip an error-log entry, so a fixed rerun skipped them all)."""
    from generator.precompute import precompute
    vae, out = str(vae_dir / "vae.safetensors"), str(tmp_path / "latents")
    run = lambda **kw: precompute(dataset, 0, vae, "open_clip:ViT-S-32-alt", out=out, **kw)
    with pytest.raises(ValueError, match=r"short sides \[30\] are not multiples of 8"):
        run(short_sides=(30,), frame_buckets=(1, 5, 9, 17))
    assert not (tmp_path / "latents_errors.jsonl").exists()
    res = run(short_sides=(32,), frame_buckets=(33,))          # every clip is shorter than 33 frames
    assert res.written == 0 and len(res.errors) == 5
    res = run(short_sides=(32,), frame_buckets=(1, 5, 9, 17))
    assert res.written == 4 and res.known_errors == 0 and [e["clip_id"] for e in res.errors] == ["clip-broken"]
    res = run(short_sides=(32,), frame_buckets=(1, 5, 9, 17))  # the same settings: the broken clip is known
    assert res.written == 0 and res.known_errors == 1 and not res.errors


def test_precompute_under_other_settings_is_refused_or_replaced_in_one_commit(app, latents, dataset, vae_dir,
                                                                             ray_session, tmp_path):
    """A rerun with another --dtype or bucket setting silently kept the old rows (the skip key was clip +
    encoders), so a user who changed buckets believed they had new latents. Each row records its settings:
    such a rerun is one error line naming old and new; the same settings still resume; replace rewrites
    those clips' rows with the new settings in one commit."""
    from generator.precompute import precompute
    r = CliRunner().invoke(app, ["precompute", "--dataset", str(dataset), "--version", "0", "--vae", str(vae_dir),
                                 *ENCODERS, "--dtype", "bfloat16"])
    assert r.exit_code == 2 and "dtype: float32 -> bfloat16" in r.output and "--replace" in r.output, r.output
    vae, out = str(vae_dir / "vae.safetensors"), str(tmp_path / "latents")
    run = lambda buckets, **kw: precompute(dataset, 0, vae, "open_clip:ViT-S-32-alt", out=out, short_sides=(32,),
                                           frame_buckets=buckets, **kw)
    assert run((1, 5, 9, 17), max_clips=2).written == 2                   # clip-a and clip-b
    with pytest.raises(ValueError, match=r"2 clip\(s\) .* settings \(frame_buckets: \[1, 5, 9, 17\] -> \[1, 5, 9\]\)"):
        run((1, 5, 9))
    assert DeltaTable(out).version() == 0
    res = run((1, 5, 9, 17))                                             # the same settings: a resume
    assert res.skipped == 2 and res.written == 2 and DeltaTable(out).version() == 1
    res = run((1, 5, 9), replace=True)
    assert res.skipped == 0 and res.written == 4
    dt = DeltaTable(out)
    assert dt.version() == 2 and json.loads(dt.history(1)[0]["spacetime"])["rows_replaced"] == 4  # one commit
    rows = {r["clip_id"]: r for r in dt.to_pyarrow_table().to_pylist()}
    assert sorted(rows) == ["clip-a", "clip-b", "clip-img", "clip-ref"]  # each clip once
    assert rows["clip-a"]["pixels"]["frames"] == 9 and rows["clip-a"]["bucket"]["frames"] == 3
    assert all(json.loads(r["settings"])["frame_buckets"] == [1, 5, 9] for r in rows.values())
    assert run((1, 5, 9)).written == 0                                   # and those now resume


def test_append_new_replace_rewrites_rows_of_other_settings_in_a_table_without_the_column(tmp_path):
    """A latents table written before rows recorded their settings gains the column on append; replace
    swaps a clip's row in one merge commit; without replace a present clip is never written twice."""
    from generator.precompute import append_new
    out = str(tmp_path / "latents")
    write_deltalake(out, pa.table({"clip_id": ["a", "b"], "vae_sha": ["v"] * 2, "text_encoder_sha": ["t"] * 2}))
    rows = lambda *ids, s="new": pa.table({"clip_id": list(ids), "vae_sha": ["v"] * len(ids),
                                           "text_encoder_sha": ["t"] * len(ids), "settings": [s] * len(ids)})
    assert append_new(out, rows("a", "c"), {}) == (1, 1)                 # c only: a is present
    assert append_new(out, rows("a", "c"), {}, replace=True) == (2, 1)   # a: unrecorded -> new; c the same
    t = DeltaTable(out).to_pyarrow_table().sort_by("clip_id")
    assert t["clip_id"].to_pylist() == ["a", "b", "c"] and t["settings"].to_pylist() == ["new", None, "new"]
    assert DeltaTable(out).history(1)[0]["operation"] == "MERGE"


def test_precompute_out_of_memory_is_not_logged_as_unreadable(app, dataset, vae_dir, ray_session, tmp_path,
                                                              monkeypatch):
    """A CUDA out-of-memory in the VAE encode was caught like a bad file and went into the error log, so
    the clip was skipped as 'unreadable before' by every later run. It is not the clip's fault: the run
    names it, exits 1, logs nothing for it, and the next run encodes it."""
    import shutil

    import generator.precompute as pre
    from generator.precompute import logged_errors

    class OutOfMemory(pre.VAEEncoder):  # a local class: Ray ships it to the actor by value
        def encode(self, video):
            if video.shape[0] == 17:  # clip-a, the one 17-frame clip
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().encode(video)

    shutil.copytree(dataset / "clips", tmp_path / "clips")  # a root of its own (the clips point at the same media)
    args = ["precompute", "--dataset", str(tmp_path), "--version", "0", "--vae", str(vae_dir), *ENCODERS]
    monkeypatch.setattr(pre, "VAEEncoder", OutOfMemory)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "out of memory (not logged; a rerun retries it): clip-a" in r.output, r.output
    assert "wrote 3," in r.output and "1 clip(s) ran out of memory" in r.output, r.output
    assert {k[0] for k in logged_errors(str(tmp_path / "latents"))} == {"clip-broken"}
    monkeypatch.undo()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 3 and "wrote 1, skipped 3" in r.output and "1 skipped as unreadable" in r.output, r.output


def copy_with_latents(dataset: Path, to: Path) -> None:
    """A copy of the dataset's clips and latents tables and its precompute error log, in `to`."""
    import shutil
    for name in ("clips", "latents", "latents_errors.jsonl"):
        (shutil.copytree if (dataset / name).is_dir() else shutil.copy)(dataset / name, to / name)


def precompute_seen_by_vae(app, monkeypatch, args: list[str]):
    """The precompute CLI's result with `args`, and the clip_ids its VAE actors were given."""
    import tempfile

    import generator.precompute as pre
    seen = Path(tempfile.mkdtemp()) / "vae_clips"  # the actors run in other processes: they tell us in a file

    class Counting(pre.VAEEncoder):  # a local class: Ray ships it to the actor by value
        def __call__(self, batch):
            with open(seen, "a") as f:
                f.writelines(f"{c}\n" for c in batch["clip_id"])
            return super().__call__(batch)

    with monkeypatch.context() as m:
        m.setattr(pre, "VAEEncoder", Counting)
        r = CliRunner().invoke(app, ["precompute", *args])
    return r, (seen.read_text().split() if seen.exists() else [])


def test_precompute_of_a_recaptioned_version_embeds_its_captions(app, latents, dataset, vae_dir, tmp_path):
    """The captioner writes new captions as a new clips version; precompute of that version skipped every
    clip already encoded (the key is clip + encoders), so the DiT silently trained on the old captions. A
    clip whose caption changed is encoded again and its row replaced, in the run's one commit."""
    copy_with_latents(dataset, tmp_path)
    clips = DeltaTable(str(tmp_path / "clips")).to_pyarrow_table()
    dense = ["a blue bar" if c == "clip-a" else d for c, d in zip(clips["clip_id"].to_pylist(),
                                                                   clips["caption_dense"].to_pylist())]
    write_deltalake(str(tmp_path / "clips"), clips.set_column(clips.schema.get_field_index("caption_dense"),
                                                              "caption_dense", pa.array(dense, pa.string())),
                    mode="overwrite")  # version 1: recaptioned
    r = CliRunner().invoke(app, ["precompute", "--dataset", str(tmp_path), "--version", "1", "--vae", str(vae_dir),
                                 *ENCODERS])
    assert r.exit_code == 3 and "wrote 1, skipped 3" in r.output, r.output
    old = {r["clip_id"]: r for r in DeltaTable(str(dataset / "latents")).to_pyarrow_table().to_pylist()}
    dt = DeltaTable(str(tmp_path / "latents"))
    new = {r["clip_id"]: r for r in dt.to_pyarrow_table().to_pylist()}
    assert dt.version() == 1 and sorted(new) == sorted(old) and dt.to_pyarrow_table().num_rows == 4  # replaced
    assert new["clip-a"]["caption"] == "a blue bar" and new["clip-a"]["clips_version"] == 1
    assert new["clip-a"]["text_embedding"] != old["clip-a"]["text_embedding"]
    assert new["clip-b"] == old["clip-b"]                                 # unchanged captions: the rows as they were


def test_precompute_of_a_recaption_keeps_the_latents_and_runs_only_the_text_encoder(app, latents, dataset, vae_dir,
                                                                                  tmp_path, monkeypatch):
    """A clip whose caption alone changed was decoded and run through the VAE again for the very latent its
    row held (the VAE is most of precompute's cost, so a recaption cost a fresh precompute). It keeps its
    latent bytes and only its caption is embedded; a recaptioned clip whose row has other settings (under
    --replace) and a clip new to the version still go through the VAE. One merge commit, and the table is
    what a precompute of the new version from scratch writes."""
    from generator.precompute import TextEncoder, precompute
    copy_with_latents(dataset, tmp_path)
    clips = DeltaTable(str(tmp_path / "clips")).to_pyarrow_table()
    ids = clips["clip_id"].to_pylist()
    dense = {"clip-a": "a blue bar", "clip-ref": "a sideways clip, recaptioned", "clip-filtered": "a bar, kept now"}
    status = {"clip-filtered": "kept"}
    for col, new in (("caption_dense", dense), ("status", status)):
        values = [new.get(c, v) for c, v in zip(ids, clips[col].to_pylist())]
        clips = clips.set_column(clips.schema.get_field_index(col), col, pa.array(values, pa.string()))
    write_deltalake(str(tmp_path / "clips"), clips, mode="overwrite")  # version 1: two recaptioned, one new clip
    settings = json.loads(DeltaTable(str(tmp_path / "latents")).to_pyarrow_table()["settings"][0].as_py())
    DeltaTable(str(tmp_path / "latents")).update(  # clip-ref's row as if made under other frame buckets
        new_values={"settings": json.dumps({**settings, "frame_buckets": [1, 5, 9]}, sort_keys=True)},
        predicate="clip_id = 'clip-ref'")
    old = {r["clip_id"]: r for r in DeltaTable(str(tmp_path / "latents")).to_pyarrow_table().to_pylist()}

    r, seen = precompute_seen_by_vae(app, monkeypatch, ["--dataset", str(tmp_path), "--version", "1", "--vae",
                                                         str(vae_dir), *ENCODERS, "--replace"])
    assert sorted(seen) == ["clip-filtered", "clip-ref"], r.output  # not clip-a: latent kept
    assert r.exit_code == 3 and "wrote 3, skipped 2" in r.output and "1 with a stored latent for this VAE" in r.output, r.output
    dt = DeltaTable(str(tmp_path / "latents"))
    assert dt.version() == 2 and dt.history(1)[0]["operation"] == "MERGE"   # one commit, as before
    lineage = json.loads(dt.history(1)[0]["spacetime"])
    assert lineage["rows_written"] == 3 and lineage["rows_replaced"] == 2 and lineage["latents_reused"] == 1
    new = {r["clip_id"]: r for r in dt.to_pyarrow_table().to_pylist()}
    assert sorted(new) == ["clip-a", "clip-b", "clip-filtered", "clip-img", "clip-ref"]
    a = new["clip-a"]
    assert a["caption"] == "a blue bar" and a["clips_version"] == 1 and a["settings"] == old["clip-a"]["settings"]
    assert all(a[k] == old["clip-a"][k] for k in ("latent", "bucket", "pixels", "frame_offset", "fps"))
    assert torch.equal(tensor_from_bytes(a["text_embedding"], "text"),
                       TextEncoder("open_clip:ViT-S-32-alt")(["a blue bar"])[0])
    fresh = str(tmp_path / "fresh")
    precompute(tmp_path, 1, str(vae_dir / "vae.safetensors"), "open_clip:ViT-S-32-alt", out=fresh, short_sides=(32,),
               frame_buckets=(1, 5, 9, 17))
    fresh = {r["clip_id"]: r for r in DeltaTable(fresh).to_pyarrow_table().to_pylist()}
    without_version = lambda row: {k: v for k, v in row.items() if k != "clips_version"}
    assert {c: without_version(r) for c, r in new.items()} == {c: without_version(r) for c, r in fresh.items()}


def test_precompute_with_another_text_encoder_keeps_the_vaes_latents(app, latents, dataset, vae_dir, tmp_path,
                                                                     monkeypatch):
    """A second text encoder (a T5 after CLIP, or new CLIP weights) over the same VAE decoded and VAE-encoded
    every clip again for latents the table already held under the first encoder. Its rows reuse them: no
    clip reaches the VAE, each new row's latent is the first encoder's row's, its text embedding the new one's."""
    import open_clip
    from safetensors.torch import save_file

    from generator.precompute import TextEncoder
    copy_with_latents(dataset, tmp_path)
    torch.manual_seed(1)  # other weights for the same tower: another text encoder sha
    weights = str(tmp_path / "clip_seed1.safetensors")
    save_file({k: v.contiguous() for k, v in open_clip.create_model("ViT-S-32-alt").state_dict().items()}, weights)
    r, seen = precompute_seen_by_vae(app, monkeypatch, ["--dataset", str(tmp_path), "--version", "0", "--vae",
                                                         str(vae_dir), *ENCODERS, "--text-weights", weights])
    # only the unreadable clip (its error is logged per encoder pair) reaches the VAE stage, which passes
    # its decode error through: no readable clip is decoded or encoded again
    assert seen == ["clip-broken"]
    assert r.exit_code == 3 and "wrote 4, skipped 0" in r.output and "4 with a stored latent" in r.output, r.output
    rows = DeltaTable(str(tmp_path / "latents")).to_pyarrow_table().to_pylist()
    sha = TextEncoder("open_clip:ViT-S-32-alt", weights).sha
    old = {r["clip_id"]: r for r in rows if r["text_encoder_sha"] != sha}
    new = {r["clip_id"]: r for r in rows if r["text_encoder_sha"] == sha}
    assert sorted(new) == sorted(old) and len(rows) == 8
    for c, row in new.items():
        assert all(row[k] == old[c][k] for k in ("latent", "bucket", "pixels", "frame_offset", "vae_sha", "settings"))
        assert row["text_embedding"] != old[c]["text_embedding"]


@pytest.mark.slow  # ~60 s: a second Ray; the captioner actors' twin of this check runs by default
def test_precompute_encodes_on_the_clusters_gpus_from_a_cpu_driver(dataset, vae_dir, tmp_path, ray_with_fake_gpu):
    """use_gpu defaulted to the driver's own CUDA: from a CPU head node (`spacetime submit`) the encoders
    ran on CPU beside idle GPU workers. It follows the Ray cluster's GPUs: here one declared on this CPU
    machine (a fresh Ray in a subprocess; 4 logical CPUs: each GPU actor holds one); the actors ask for it
    and fall back to CPU torch."""
    vae, out = str(vae_dir / "vae.safetensors"), str(tmp_path / "latents")
    stdout = ray_with_fake_gpu(f"from generator.precompute import precompute\n"
                               f"res = precompute({str(dataset)!r}, 0, {vae!r}, 'open_clip:ViT-S-32-alt', out={out!r}, "
                               f"short_sides=(32,), frame_buckets=(1, 5, 9, 17), max_clips=1)\n"
                               f"print('RESULT', res.gpu, res.written)", num_cpus=4)
    assert "RESULT True 1" in stdout, stdout
    assert json.loads(DeltaTable(out).history(1)[0]["spacetime"])["gpu"] is True


def test_precompute_refuses_max_clips_below_one_and_a_patch_not_of_three(app, tmp_path):
    """--max-clips 0 wrote nothing and exited 0 ("nothing new to write") with every clip still to
    encode; -1 sliced off the last clip. --patch 1,2 failed mid-run with an IndexError (exit 1)."""
    from generator.precompute import precompute
    for n in (0, -1):
        with pytest.raises(ValueError, match="max_clips must be >= 1"):
            precompute(tmp_path, 0, str(tmp_path / "vae.safetensors"), max_clips=n)
        r = CliRunner().invoke(app, ["precompute", "--dataset", str(tmp_path), "--version", "0", "--vae",
                                     str(tmp_path), "--max-clips", str(n)])
        assert r.exit_code == 2 and "--max-clips" in r.output, r.output
    (tmp_path / "vae.safetensors").write_bytes(b"")  # refused before it is read
    for patch in ("1,2", "1,2,2,2"):  # two values failed after the VAE loaded (exit 1); four ran on three
        r = CliRunner().invoke(app, ["precompute", "--dataset", str(tmp_path), "--version", "0", "--vae",
                                     str(tmp_path / "vae.safetensors"), "--patch", patch])
        assert r.exit_code == 2 and "patch must be three integers" in r.output, r.output


def test_a_torn_error_log_line_does_not_stop_precompute(tmp_path):
    """A run killed while appending to the error log leaves half a line: later runs read the whole
    lines (that one clip is retried) instead of failing on the JSON every time."""
    from generator.precompute import errors_path, logged_errors
    table = str(tmp_path / "latents")
    whole = json.dumps({"clip_id": "a", "vae_sha": "v", "text_encoder_sha": "t", "reason": "bad"})
    errors_path(table).write_text(whole + "\n" + whole.replace('"a"', '"b"')[:30])
    assert logged_errors(table) == {("a", "v", "t")}


def test_append_new_returns_the_version_it_committed(tmp_path):
    """The version precompute reports (and a user pins with train --latents-version) is the commit's:
    it said one more, since write_deltalake advances the DeltaTable snapshot it is handed."""
    from generator.precompute import append_new
    out = str(tmp_path / "latents")
    rows = lambda *ids: pa.table({"clip_id": list(ids), "vae_sha": ["v"] * len(ids), "text_encoder_sha": ["t"] * len(ids)})
    assert append_new(out, rows("a"), {"stage": "precompute"}) == (0, 1)
    for want, ids in ((1, ("a", "b")), (2, ("c",))):
        assert append_new(out, rows(*ids), {"stage": "precompute"}) == (want, 1)
        assert DeltaTable(out).version() == want


def test_concurrent_precompute_commits_never_duplicate_a_clip(latents, dataset, tmp_path):
    """Two runs that encoded overlapping clips race to append: every clip lands exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    from generator.precompute import append_new
    rows = DeltaTable(str(dataset / "latents")).to_pyarrow_table()
    out = str(tmp_path / "latents")
    a, b = rows.slice(0, 3), rows.slice(1, 3)           # clips 1 and 2 are in both runs
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: append_new(out, t, {"stage": "precompute"}), [a, b, a, b]))
    t = DeltaTable(out).to_pyarrow_table()
    assert sorted(t["clip_id"].to_pylist()) == sorted(rows["clip_id"].to_pylist())
    assert sum(n for _, n in results) == rows.num_rows
    assert append_new(out, rows, {"stage": "precompute"}) == (None, 0)


def test_latent_batches_pack_mixed_buckets_and_resume(latents, dataset):
    a = LatentBatches(dataset, 0, (1, 2, 2), max_tokens=10_000, seed=3)
    assert len(a) == 4 and a.channels == 4 and a.text_dim == 256
    first = next(a)
    grids = sorted(first["packed"].grids)
    assert grids == [(1, 5, 4), (3, 4, 4), (3, 5, 4), (5, 4, 5)]     # image and videos in one packed batch
    # a tight token budget: several batches per epoch; resume from a state_dict continues exactly
    b = LatentBatches(dataset, 0, (1, 2, 2), max_tokens=110, seed=3)
    seq = [next(b)["packed"].tokens for _ in range(3)]
    state = b.state_dict()
    after = [next(b)["packed"].tokens for _ in range(4)]
    c = LatentBatches(dataset, 0, (1, 2, 2), max_tokens=110, seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(after, [next(c)["packed"].tokens for _ in range(4)]))
    d = LatentBatches(dataset, 0, (1, 2, 2), max_tokens=110, seed=3)
    assert all(torch.equal(x, next(d)["packed"].tokens) for x in seq)  # same seed, same order
    with pytest.raises(ValueError, match="resume would not be exact"):
        d.load_state_dict({**state, "rows": 99})
    assert len(load_pairs(dataset, 0)) == 4
    table, version = read_latents(dataset, vae_sha=a.vae_sha[:8])
    assert table.num_rows == 4 and version == 0
    with pytest.raises(ValueError, match="no latents rows .* for vae ffff"):  # a sha no row has
        read_latents(dataset, vae_sha="ffff")


def test_latent_batches_window_row_groups_and_bound_memory(latents, dataset, tmp_path):
    # a table of 8 commits (8 files, one row group each) of 2 rows, read with window_rows=4: every
    # epoch visits each row once, a window is whole units, the byte cache stays bounded, two ranks
    # split the units, resume is exact, and each sample is the one load_pairs gives for that clip
    import pyarrow.compute as pc

    src = DeltaTable(str(dataset / "latents")).to_pyarrow_table().sort_by("clip_id")
    root = tmp_path / "big"
    for k in range(8):
        part = src.slice(k % 2 * 2, 2)
        ids = pc.binary_join_element_wise(part["clip_id"], pa.scalar(f"-{k}"), "")
        write_deltalake(str(root / "latents"), part.set_column(part.schema.get_field_index("clip_id"), "clip_id", ids),
                        mode="append")
    a = LatentBatches(root, None, (1, 2, 2), max_tokens=10_000, seed=1, window_rows=4)
    assert len(a) == 16 and len(a._units) == 8
    reference = load_pairs(root)
    for epoch in range(2):
        a.epoch = epoch
        order = a._epoch_order()
        assert sorted(order) == list(range(16))
        for w in range(4):  # 4 windows of 2 whole units each
            assert len({int(a._unit_of[i]) for i in order[4 * w: 4 * w + 4]}) == 2
    a.epoch, a._order = 0, a._epoch_order()
    seen = []
    for _ in range(16):
        chosen = a._take()
        for i, (z, y) in zip(chosen, a._pairs(chosen)):
            assert torch.equal(z, reference[i][0][:, :, : z.shape[2], : z.shape[3]]) and torch.equal(y, reference[i][1])
        seen += chosen
        assert sum(len(c[0]) for c in a._cache.values()) <= 2 * a.window_rows
    assert sorted(seen[:16]) == list(range(16))
    ranks = [LatentBatches(root, None, (1, 2, 2), 10_000, 1, rank=r, world_size=2, window_rows=4) for r in (0, 1)]
    assert sorted(ranks[0]._order + ranks[1]._order) == list(range(16))
    units = [{int(b._unit_of[i]) for i in b._order} for b in ranks]
    assert len(units[0]) == len(units[1]) == 4 and not units[0] & units[1]  # each rank reads only its units
    b = LatentBatches(root, None, (1, 2, 2), max_tokens=110, seed=1, window_rows=4)
    [next(b) for _ in range(5)]
    state, after = b.state_dict(), [next(b)["packed"].tokens for _ in range(4)]
    c = LatentBatches(root, None, (1, 2, 2), max_tokens=110, seed=1, window_rows=4)
    c.load_state_dict(state)
    assert all(torch.equal(x, next(c)["packed"].tokens) for x in after)
    with pytest.raises(ValueError, match="window_rows 4, this run has 8"):  # another window: another order
        LatentBatches(root, None, (1, 2, 2), max_tokens=110, seed=1, window_rows=8).load_state_dict(state)


def tiny_latents(root, n: int = 6, vae: str = "v"):
    """A latents table of n random 1 x 4 x 4 latents with 3 x 16 text embeddings, without Ray or a VAE
    (its sha `vae` * 64); a second call appends a version."""
    from generator.precompute import LATENTS_SCHEMA, append_new, tensor_to_bytes
    g = torch.Generator().manual_seed(0)
    rows = [{"clip_id": f"c{i}", "bucket": {"frames": 1, "height": 4, "width": 4},
             "pixels": {"frames": 1, "height": 16, "width": 16}, "frame_offset": 0, "fps": 12.0,
             "latent": tensor_to_bytes(torch.randn(4, 1, 4, 4, generator=g), "latent"),
             "text_embedding": tensor_to_bytes(torch.randn(3, 16, generator=g), "text"), "caption": "x",
             "vae_sha": vae * 64, "text_encoder_sha": "t" * 64, "clips_version": 0} for i in range(n)]
    append_new(str(root / "latents"), pa.Table.from_pylist(rows, schema=LATENTS_SCHEMA), {"stage": "precompute"})


def test_train_refuses_another_window_before_rewriting_run_json(app, tmp_path):
    """A resume with another --window-rows (the table larger than either) would not be exact: refused
    before run.json is rewritten (it lost the run's result and checkpoint and named the refused --steps)."""
    tiny_latents(tmp_path)
    out = tmp_path / "dit"
    args = ["train", "--dataset", str(tmp_path), "--latents-version", "0", "--out", str(out), "--preset", "DiT_T",
            "--max-tokens", "64", "--warmup-steps", "1"]
    r = CliRunner().invoke(app, [*args, "--steps", "2", "--window-rows", "4"])
    assert r.exit_code == 0, r.output
    before = (out / "run.json").read_bytes()
    r = CliRunner().invoke(app, [*args, "--steps", "4", "--resume"])
    assert r.exit_code == 2 and "window_rows 4, this run has 2048" in r.output, r.output
    assert (out / "run.json").read_bytes() == before
    r = CliRunner().invoke(app, [*args, "--steps", "4", "--resume", "--window-rows", "4"])
    assert r.exit_code == 0 and json.loads((out / "run.json").read_text())["result"]["step"] == 4, r.output


def test_train_resume_on_another_vae_names_it(app, tmp_path):
    """A resume on the same table version with another --vae-sha said 'trained on latents version 1,
    not 1'; it names the VAE and the --vae-sha to pass."""
    tiny_latents(tmp_path)
    tiny_latents(tmp_path, vae="w")  # version 1 holds both VAEs' latents
    args = ["train", "--dataset", str(tmp_path), "--latents-version", "1", "--max-tokens", "64", "--preset", "DiT_T",
            "--out", str(tmp_path / "dit")]
    r = CliRunner().invoke(app, [*args, "--steps", "1", "--vae-sha", "vvvv"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*args, "--steps", "2", "--vae-sha", "wwww", "--resume"])
    assert r.exit_code == 2 and "latents of VAE vvvvvvvvvvvv, not wwwwwwwwwwww" in r.output, r.output
    assert "--vae-sha vvvvvvvvvvvv" in r.output


def test_train_resume_on_another_dataset_or_version_is_refused(app, tmp_path, monkeypatch):
    """A resume with another --dataset whose table has the same version, rows and encoders went on
    silently on the other data. It is refused in one line naming both roots, before run.json is
    rewritten; so is another --latents-version. A relative path to the same root resumes."""
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_latents(a)
    tiny_latents(b)
    out = tmp_path / "dit"
    args = ["train", "--max-tokens", "64", "--preset", "DiT_T", "--warmup-steps", "1", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--dataset", str(a), "--latents-version", "0", "--steps", "1"])
    assert r.exit_code == 0, r.output
    before = (out / "run.json").read_bytes()
    r = CliRunner().invoke(app, [*args, "--dataset", str(b), "--latents-version", "0", "--steps", "2", "--resume"])
    assert r.exit_code == 2 and f"trained on --dataset {a.resolve()}, not {b.resolve()}" in r.output, r.output
    tiny_latents(a, n=8)  # version 1
    r = CliRunner().invoke(app, [*args, "--dataset", str(a), "--latents-version", "1", "--steps", "2", "--resume"])
    assert r.exit_code == 2 and "trained on latents version 0, not 1" in r.output, r.output
    assert (out / "run.json").read_bytes() == before
    monkeypatch.chdir(b)
    r = CliRunner().invoke(app, [*args, "--dataset", "../a", "--latents-version", "0", "--steps", "2", "--resume"])
    assert r.exit_code == 0 and json.loads((out / "run.json").read_text())["result"]["step"] == 2, r.output


def test_train_refuses_init_from_another_model_before_writing_run_json(app, tmp_path):
    """--init-from a run of another preset or patch is one error line and leaves --out as it was (it
    failed inside training, after run.json had recorded a run that never started). So is a run trained on
    another VAE's latents of the same shape (it fine-tuned silently in another latent space)."""
    tiny_latents(tmp_path)
    args = ["train", "--dataset", str(tmp_path), "--latents-version", "0", "--max-tokens", "64", "--steps", "1"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "base"), "--preset", "DiT_T"])
    assert r.exit_code == 0, r.output
    for other, named in ((["--preset", "DiT_XS"], "depth: 2 -> 6"), (["--preset", "DiT_T", "--patch", "1,4,4"], "patch")):
        r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ft"), "--init-from", str(tmp_path / "base"), *other])
        assert r.exit_code == 2 and "is another model" in r.output and named in r.output, r.output
        assert not (tmp_path / "ft").exists()
    tiny_latents(tmp_path, vae="w")  # version 1: latents of another VAE too, the same shapes
    r = CliRunner().invoke(app, [*args[:4], "1", *args[5:], "--vae-sha", "wwww", "--out", str(tmp_path / "ft"),
                                 "--init-from", str(tmp_path / "base"), "--preset", "DiT_T"])
    assert r.exit_code == 2 and "trained with VAE vvvvvvvvvvvv, these latents are of wwwwwwwwwwww" in r.output, r.output
    assert "--vae-sha vvvvvvvvvvvv" in r.output and not (tmp_path / "ft").exists()  # fine-tuned in another latent space
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ft"), "--init-from", str(tmp_path / "base"),
                                 "--preset", "DiT_T"])
    assert r.exit_code == 0, r.output


def test_train_refuses_resume_with_init_from(app, tmp_path):
    """--resume --init-from X continued --out's checkpoint and silently ignored X (or, with no checkpoint
    yet, fine-tuned from X): the two are refused together, in one line, before anything is written."""
    tiny_latents(tmp_path)
    args = ["train", "--dataset", str(tmp_path), "--latents-version", "0", "--max-tokens", "64", "--steps", "1",
            "--preset", "DiT_T"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "base")])
    assert r.exit_code == 0, r.output
    before = (tmp_path / "base" / "run.json").read_bytes()
    for out in ("base", "ft"):  # a run to resume, and a fresh --out
        r = CliRunner().invoke(app, [*args, "--steps", "2", "--out", str(tmp_path / out), "--resume",
                                     "--init-from", str(tmp_path / "base")])
        assert r.exit_code == 2 and "--resume" in r.output and "pass one of them" in r.output, r.output
    assert (tmp_path / "base" / "run.json").read_bytes() == before and not (tmp_path / "ft").exists()


def test_train_dit_from_the_table_loss_falls(app, latents, dataset, tmp_path):
    out = tmp_path / "dit"
    args = ["train", "--dataset", str(dataset), "--latents-version", "0", "--out", str(out), "--preset", "DiT_T",
            "--lr", "2e-3", "--warmup-steps", "5", "--max-tokens", "400", "--base-tokens", "64", "--log-every", "20"]
    r = CliRunner().invoke(app, [*args, "--steps", "80"])
    assert r.exit_code == 0, r.output
    losses = [json.loads(line)["loss"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(losses) == 80
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15]), (losses[:15], losses[-15:])
    run = json.loads((out / "run.json").read_text())
    assert run["latents_version"] == 0 and run["clips_versions"] == [0] and run["result"]["step"] == 80
    # the caption encoder precompute used, from its lineage: `spacetime sample` defaults to it
    assert run["text_encoder"] == "open_clip:ViT-S-32-alt" and run["text_weights"] is None
    assert (out / run["checkpoint"]["file"]).is_file()
    # an existing checkpoint is never silently overwritten or resumed
    r = CliRunner().invoke(app, [*args, "--steps", "90"])
    assert r.exit_code == 2 and "--resume" in r.output
    # trained by default with the task conditioning mix; resuming under another mix would not be exact
    assert run["train"]["cond_ratios"] == check_ratios(TASK_MIX)
    r = CliRunner().invoke(app, [*args, "--steps", "85", "--resume", "--cond-mix", "t2v"])
    assert r.exit_code == 2 and "--cond-mix none=0.4,first=0.2,last=0.2" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--steps", "85", "--resume", "--cond-mix", "none=1,sideways=2"])
    assert r.exit_code == 2 and "sideways" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--steps", "85", "--resume", "--workers", "9"])  # 4 latents
    assert r.exit_code == 2 and "every worker needs at least one" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--steps", "85", "--resume", "--grad-accum", "2"])
    assert r.exit_code == 2 and "--grad-accum 1" in r.output, r.output
    before = (out / "run.json").read_bytes()  # a refused resume leaves the run's record as it was
    r = CliRunner().invoke(app, [*args, "--steps", "85", "--resume", "--seed", "1"])
    assert r.exit_code == 2 and "seed: 0 -> 1" in r.output and (out / "run.json").read_bytes() == before, r.output
    (out / "run.json").write_text(json.dumps({**json.loads(before), "text_encoder_sha": "f" * 64}))
    r = CliRunner().invoke(app, [*args, "--steps", "85", "--resume"])  # other embeddings than it trained on
    assert r.exit_code == 2 and "trained on text encoder ffffffffffff" in r.output, r.output
    (out / "run.json").write_bytes(before)
    r = CliRunner().invoke(app, [*args, "--steps", "85", "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run.json").read_text())["result"]["step"] == 85


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_train_dit_over_ray_train_workers(app, latents, dataset, tmp_path, strategy):
    """--workers 2: Ray Train TorchTrainer, DDP or FSDP over gloo on CPU; rank 0 writes the checkpoint."""
    out = tmp_path / strategy
    r = CliRunner().invoke(app, ["train", "--dataset", str(dataset), "--latents-version", "0", "--out", str(out),
                                 "--preset", "DiT_T", "--steps", "6", "--max-tokens", "200", "--workers", "2",
                                 "--log-every", "3", "--strategy", strategy])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert run["workers"] == 2 and run["checkpoint"]["step"] == 6


def test_ray_train_workers_take_the_clusters_gpus_from_a_cpu_driver(ray_session, monkeypatch, tmp_path):
    """`train --workers K` and `train-vae --workers K` asked Ray Train for GPUs only when the driver had
    CUDA: submitted from a CPU head node they trained on the GPU workers' CPUs. They follow the cluster:
    a GPU per worker when it has that many, else CPU."""
    import ray.train.torch

    from spacetime.cli_generator import _fit_on_workers
    asked = []

    class Trainer:
        def __init__(self, loop, train_loop_config, scaling_config, run_config):
            asked.append(scaling_config.use_gpu)

        def fit(self):
            return type("Result", (), {"metrics": {"step": 1}})()

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    monkeypatch.setattr(ray_session, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 2.0})
    assert _fit_on_workers(None, {}, 2, tmp_path, "dit") == {"step": 1}
    _fit_on_workers(None, {}, 3, tmp_path, "dit")  # fewer GPUs than workers: Ray would wait forever
    monkeypatch.setattr(ray_session, "cluster_resources", lambda: {"CPU": 2.0})
    _fit_on_workers(None, {}, 2, tmp_path, "vae")
    assert asked == [True, False, False]
