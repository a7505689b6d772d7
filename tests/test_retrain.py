"""The retrain workflow's stage reuse, the scaling study, and (slow) the whole retrain on demo footage."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spacetime.retrain import Manifest, RetrainConfig, retrain
from spacetime.scale_study import final_losses, scale_study


def test_stage_reuse_is_keyed_by_inputs_and_survives_a_crash(tmp_path):
    calls = []

    def stage(tag):
        def fn():
            calls.append(tag)
            return {"out": str(tmp_path / f"{tag}.txt")}
        return fn

    m = Manifest.load(tmp_path)
    m.run("a", {"x": 1}, stage("a1"), log=lambda s: None)
    m.run("a", {"x": 1}, stage("a2"), log=lambda s: None)          # same inputs: reused
    assert calls == ["a1"] and m.reused == ["a"]
    m.run("a", {"x": 2}, stage("a3"), log=lambda s: None)          # changed inputs: recomputed
    assert calls == ["a1", "a3"]

    def crash():
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError):
        m.run("b", {"y": 1}, crash, log=lambda s: None)
    again = Manifest.load(tmp_path)                                 # what a re-run after the crash sees
    assert "a" in again.stages and "b" not in again.stages
    again.run("a", {"x": 2}, stage("a4"), log=lambda s: None)
    assert calls == ["a1", "a3"]
    # outputs that vanished are recomputed even with the same inputs
    again.run("a", {"x": 2}, stage("a5"), exists=lambda o: Path(o["out"]).exists(), log=lambda s: None)
    assert calls[-1] == "a5"


def test_vae_stage_passes_the_loss_options_and_keys_them(tmp_path):
    from dataclasses import replace

    from typer.testing import CliRunner

    from spacetime.cli import app
    from spacetime.retrain import train_vae_stage

    vgg = tmp_path / "vgg.safetensors"
    vgg.write_bytes(b"weights")
    plain_in, plain = train_vae_stage(RetrainConfig.tiny(), "ROOT", 3, tmp_path / "vae")
    cfg = replace(RetrainConfig.tiny(), vae_perceptual=str(vgg), vae_adversarial_weight=0.1)
    gan_in, gan = train_vae_stage(cfg, "ROOT", 3, tmp_path / "vae")
    assert "--perceptual" not in plain and "--adversarial-weight" not in plain
    assert gan[gan.index("--perceptual") + 1] == str(vgg) and gan[gan.index("--disc-start") + 1] == str(cfg.vae_steps // 2)
    assert gan_in != plain_in and gan_in["perceptual"] != str(vgg)  # keyed by the file's content
    vgg.write_bytes(b"other weights")
    assert train_vae_stage(cfg, "ROOT", 3, tmp_path / "vae")[0] != gan_in
    # the real command takes these arguments (it then stops at the missing table, not at an option)
    r = CliRunner().invoke(app, [*gan[:2], str(tmp_path / "nowhere"), *gan[3:]])
    assert r.exit_code == 2 and "no clips table" in r.output, r.output


def test_dit_stage_passes_grad_accum_and_compile(tmp_path):
    from dataclasses import replace

    from typer.testing import CliRunner

    from spacetime.cli import app
    from spacetime.retrain import train_dit_stage

    plain_in, plain = train_dit_stage(RetrainConfig.tiny(), "ROOT", 2, tmp_path / "dit", "abc", None)
    assert "--grad-accum" not in plain and "--compile" not in plain and "grad_accum" not in plain_in
    cfg = replace(RetrainConfig.tiny(), dit_grad_accum=4, dit_compile=True)
    big_in, big = train_dit_stage(cfg, "ROOT", 2, tmp_path / "dit", "abc", "prev_run")
    assert big[big.index("--grad-accum") + 1] == "4" and "--compile" in big and big[big.index("--init-from") + 1] == "prev_run"
    assert big_in == {**plain_in, "grad_accum": 4}  # compile gives the same results: not in the key
    # the caption encoder's sha picks its rows in a table holding several encoders' embeddings
    pinned_in, pinned = train_dit_stage(RetrainConfig.tiny(), "ROOT", 2, tmp_path / "dit", "abc", None, "te5")
    assert pinned[pinned.index("--text-encoder-sha") + 1] == "te5" and pinned_in == plain_in
    # the real command takes these arguments (it then stops at the missing table, not at an option)
    r = CliRunner().invoke(app, [*big[:2], str(tmp_path / "nowhere"), *big[3:big.index("--init-from")], *big[big.index("--init-from") + 2:]])
    assert r.exit_code == 2 and "no latents table" in r.output, r.output


def test_stage_dir_keeps_an_interrupted_run_of_the_same_inputs_only(tmp_path):
    from spacetime.retrain import stage_dir

    d = stage_dir(tmp_path / "captioner", {"steps": 10})
    (d / "checkpoint").mkdir(parents=True)
    assert (stage_dir(tmp_path / "captioner", {"steps": 10}) / "checkpoint").is_dir()  # same inputs: resume it
    assert not (stage_dir(tmp_path / "captioner", {"steps": 20}) / "checkpoint").exists()  # others: afresh


def test_scale_study_writes_plot_table_and_curves(tmp_path):
    torch.manual_seed(0)
    sizes = (("S1", 32, 1, 2), ("S2", 96, 2, 4))
    curves = scale_study(tmp_path, token_budget=4000, segments=2, sizes=sizes, max_tokens=512, log=lambda s: None)
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    rows = (tmp_path / "scaling.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2
    for name, *_ in sizes:
        pts = curves[name]
        assert [p["flops"] for p in pts] == sorted(p["flops"] for p in pts) and pts[-1]["flops"] > 0
        assert pts[-1]["val_loss"] < pts[0]["val_loss"] * 1.05
    assert curves["S2"][-1]["flops"] > curves["S1"][-1]["flops"]   # same tokens, bigger model, more compute
    # a second study in the same --out starts afresh: not a no-op resume of the first one's checkpoints
    torch.manual_seed(0)
    again = scale_study(tmp_path, token_budget=4000, segments=2, sizes=sizes[:1], max_tokens=512, log=lambda s: None)
    assert [p["tokens"] for p in again["S1"]] == [p["tokens"] for p in curves["S1"]] and again["S1"][0]["tokens"] > 0


@pytest.mark.slow
def test_bigger_models_reach_lower_validation_loss(tmp_path):
    curves = scale_study(tmp_path, token_budget=40000, segments=4, log=lambda s: None)
    losses = final_losses(curves)
    assert losses[2] < losses[0], losses


@pytest.mark.slow
def test_retrain_twice_reuses_everything_and_new_footage_fine_tunes(tmp_path):
    from pipeline.synthetic import generate_footage, write_captions_file

    gt = generate_footage(tmp_path / "raw", seed=0, videos=3)
    caps = write_captions_file(gt, tmp_path / "raw" / "captions.json")
    cfg = RetrainConfig.tiny()
    args = dict(spec_path=None, dataset=str(tmp_path / "ds"), cfg=cfg, captions=str(caps), log=lambda s: None)
    first = retrain(sources=[str(tmp_path / "raw")], run_dir=str(tmp_path / "run1"), **args)
    again = Manifest.load(tmp_path / "run1")
    retrain(sources=[str(tmp_path / "raw")], run_dir=str(tmp_path / "run1"), **args)
    m = json.loads((tmp_path / "run1" / "manifest.json").read_text())["stages"]
    assert {k: v["finished_at"] for k, v in m.items() if k != "_lineage"} == \
        {k: v["finished_at"] for k, v in again.stages.items() if k != "_lineage"}   # nothing recomputed
    # the captioner's inputs change in the same run dir: it trains afresh (not a no-op resume of the old
    # one's checkpoint) and captions on top of the version the old one wrote
    logs = []
    first = retrain(sources=[str(tmp_path / "raw")], run_dir=str(tmp_path / "run1"),
                    **{**args, "cfg": replace(cfg, captioner_steps=cfg.captioner_steps + 20), "log": logs.append})
    assert first["train_captioner"]["key"] != again.stages["train_captioner"]["key"]
    assert not any("resumed" in line for line in logs), logs
    assert first["caption"]["outputs"]["dataset_version"] > again.stages["caption"]["outputs"]["dataset_version"]
    # new footage: a new dataset version and a DiT fine-tuned from the first run, both pinned
    gt2 = generate_footage(tmp_path / "raw2", seed=7, videos=2)
    write_captions_file(gt2, tmp_path / "raw2" / "captions.json")
    second = retrain(sources=[str(tmp_path / "raw"), str(tmp_path / "raw2")], run_dir=str(tmp_path / "run2"),
                     from_checkpoint=first["train"]["outputs"]["checkpoint"], previous_run=str(tmp_path / "run1"),
                     **{**args, "captions": str(tmp_path / "raw2" / "captions.json")})
    lin1, lin2 = first["_lineage"]["outputs"], second["_lineage"]["outputs"]
    assert lin2["dataset_version"] > lin1["dataset_version"]
    assert lin2["from_checkpoint"] == first["train"]["outputs"]["checkpoint"]
    run_json = json.loads((Path(lin2["dit_checkpoint"]) / "run.json").read_text())
    assert run_json["train"]["init_from"] == lin2["from_checkpoint"]
    assert (tmp_path / "run2" / "report.html").is_file()
    # a fine-tune of the fine-tune: run2 kept run1's VAE (no train_vae stage of its own); run3 finds it in
    # run2's lineage, and the manifest's paths are absolute (resumable from any cwd)
    third = retrain(sources=[str(tmp_path / "raw"), str(tmp_path / "raw2")], run_dir=str(tmp_path / "run3"),
                    from_checkpoint=second["train"]["outputs"]["checkpoint"], **args)
    assert "train_vae" not in second and third["_lineage"]["outputs"]["vae"] == lin2["vae"] == lin1["vae"]
    assert Path(lin1["vae"]).is_absolute() and Path(third["train"]["outputs"]["checkpoint"]).is_absolute()
    from spacetime.report import RETRAIN_SECTION_IDS, find_chromium, render_check
    if find_chromium() is not None:  # the retrain report (inline GIFs, lineage, curves) renders
        assert render_check(tmp_path / "run2" / "report.html", RETRAIN_SECTION_IDS)


def test_retrain_cli_checks_its_text_encoder_weights(tmp_path):
    from typer.testing import CliRunner

    from spacetime.cli import app
    r = CliRunner().invoke(app, ["retrain", "--sources", str(tmp_path), "--dataset", str(tmp_path / "ds"),
                                 "--run", str(tmp_path / "run"), "--text-weights", str(tmp_path / "none.bin")])
    assert r.exit_code == 2 and "text encoder weights not found" in r.output, r.output
    assert not (tmp_path / "run").exists()
