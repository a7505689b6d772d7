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


class _StopAtTrain(Exception):
    pass


def _stub_retrain_stages(monkeypatch, ran):
    """retrain's stages up to the DiT as stubs that record what ran: curate writes a one-row clips
    table, the captioner / VAE / latents write placeholder outputs, the DiT stage stops the run."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    import captioner.caption
    import captioner.train
    import generator.precompute
    import pipeline.graph
    import spacetime.retrain as rt
    from pipeline.schema import CLIPS_SCHEMA

    def curate(sources, root, spec, **kw):
        ran.append(("curate", root))
        if not DeltaTable.is_deltatable(f"{root}/clips"):
            row = {"clip_id": "c0", "status": "kept", "source_uri": root}
            write_deltalake(f"{root}/clips", pa.Table.from_pylist([row], schema=CLIPS_SCHEMA))
        return pipeline.graph.CurateResult(None, {}, 0, 0, 0)

    def train_captioner(root, version, out, cfg, log=print):
        ran.append(("train_captioner", root))
        (Path(out) / "checkpoint").mkdir(parents=True, exist_ok=True)
        (Path(out) / "checkpoint" / "model.safetensors").write_text(root)
        return Path(out) / "checkpoint"

    def spacetime_cmd(args, log_file, log):
        root = args[args.index("--dataset") + 1]
        ran.append((args[0], root))
        if args[0] == "train-vae":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "vae.safetensors").write_text(root)
            (out / "vae.json").write_text('{"sha256": "v"}')
        elif args[0] == "precompute":
            write_deltalake(f"{root}/latents", pa.table({"clip_id": ["c0"]}), mode="append")
        else:
            raise _StopAtTrain

    monkeypatch.setattr(pipeline.graph, "curate", curate)
    monkeypatch.setattr(captioner.train, "train_captioner", train_captioner)
    monkeypatch.setattr(captioner.caption, "caption_dataset", lambda root, ckpt, version, log: {"version": None})
    monkeypatch.setattr(rt, "spacetime_cmd", spacetime_cmd)
    monkeypatch.setattr(generator.precompute, "TextEncoder", lambda *a: type("T", (), {"sha": "t"}))


def test_retrain_never_reuses_another_datasets_stages(tmp_path, monkeypatch):
    """One run dir, two dataset roots whose tables are at the same version numbers: the second gets
    its own captioner, VAE and latents (version numbers restart in every table), and a latents table
    deleted since its stage ran is precomputed again."""
    import shutil

    ran = []
    _stub_retrain_stages(monkeypatch, ran)
    (tmp_path / "raw").mkdir()

    def run(root):
        del ran[:]
        with pytest.raises(_StopAtTrain):
            retrain(None, [str(tmp_path / "raw")], str(root), str(tmp_path / "run"), cfg=RetrainConfig.tiny(),
                    log=lambda s: None)
        return [name for name, _ in ran]

    stages = ["curate", "train_captioner", "train-vae", "precompute", "train"]
    assert run(tmp_path / "a") == stages
    assert run(tmp_path / "a") == ["train"]                   # the same inputs: all reused
    assert run(tmp_path / "b") == stages                     # another dataset: nothing of a's reused
    assert all(root == str(tmp_path / "b") for _, root in ran)
    shutil.rmtree(tmp_path / "b" / "latents")
    assert run(tmp_path / "b") == ["precompute", "train"]


def _stub_training(monkeypatch, tmp_path, calls, kill):
    """_stub_retrain_stages, the VAE and DiT stages finishing too (sample stops the run): each records
    (command, --resume passed, a checkpoint there, --ckpt-every passed) in `calls`, writes its first
    checkpoint and, when named in `kill`, is killed there once. Returns run(cfg, stop): the calls of one
    retrain that ends by raising `stop`."""
    import spacetime.retrain as rt

    _stub_retrain_stages(monkeypatch, [])
    stub = rt.spacetime_cmd

    def cmd(args, log_file, log):
        if args[0] == "sample":
            raise _StopAtTrain
        if args[0] not in ("train-vae", "train"):
            return stub(args, log_file, log)
        ckpt = Path(args[args.index("--out") + 1]) / ("ckpt" if args[0] == "train-vae" else "")
        calls.append((args[0], "--resume" in args, (ckpt / "latest.json").is_file(), "--ckpt-every" in args))
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "latest.json").write_text(" ".join(args))
        if args[0] in kill:  # killed after its first checkpoint
            kill.remove(args[0])
            raise RuntimeError("killed")
        if args[0] == "train-vae":
            stub(args, log_file, log)
            return (ckpt.parent / "vae.safetensors").write_text(" ".join(args))  # other settings, other weights
        (ckpt / "history.jsonl").write_text('{"step": 1, "loss": 1.0}\n')

    monkeypatch.setattr(rt, "spacetime_cmd", cmd)
    (tmp_path / "raw").mkdir()

    def run(cfg, stop=_StopAtTrain):
        del calls[:]
        with pytest.raises(stop):
            retrain(None, [str(tmp_path / "raw")], str(tmp_path / "ds"), str(tmp_path / "run"), cfg=cfg, log=lambda s: None)
        return calls[:]
    return run


def test_retrain_resumes_an_interrupted_vae_or_dit_stage_of_the_same_inputs_only(tmp_path, monkeypatch):
    """A VAE or DiT stage killed after a checkpoint resumes it on the rerun (`--resume`, its dir kept);
    a rerun with other inputs starts that stage afresh in an emptied dir."""
    calls, kill = [], {"train-vae", "train"}
    run = _stub_training(monkeypatch, tmp_path, calls, kill)
    cfg = RetrainConfig.tiny()
    assert run(cfg, RuntimeError) == [("train-vae", False, False, True)]                           # killed
    assert run(cfg, RuntimeError) == [("train-vae", True, True, True), ("train", False, False, True)]  # resumed
    assert run(cfg) == [("train", True, True, True)]
    # other inputs: the VAE and so the DiT train afresh, the old checkpoints gone first
    assert run(replace(cfg, vae_steps=cfg.vae_steps + 1)) == [("train-vae", False, False, True),
                                                              ("train", False, False, True)]
    kill.add("train")
    assert run(replace(cfg, vae_steps=cfg.vae_steps + 1, dit_steps=7), RuntimeError) == [("train", False, False, True)]
    assert run(replace(cfg, vae_steps=cfg.vae_steps + 1, dit_steps=8)) == [("train", False, False, True)]


def test_a_finished_stage_whose_dir_another_run_took_is_not_reused(tmp_path, monkeypatch):
    """Run A finishes; run B, with other captioner or DiT settings, takes the stage's dir and is killed
    after a checkpoint. Rerunning A must train that stage again: the manifest still names A's finished
    stage, but the dir holds B's half-trained state (it was reused as A's)."""
    import captioner.train

    calls, kill = [], set()
    run = _stub_training(monkeypatch, tmp_path, calls, kill)
    cfg = RetrainConfig.tiny()
    assert [c[0] for c in run(cfg)] == ["train-vae", "train"]
    assert run(cfg) == []                                                   # all reused
    kill.add("train")
    assert run(replace(cfg, dit_steps=7), RuntimeError) == [("train", False, False, True)]
    assert run(cfg) == [("train", False, False, True)]                      # afresh, not B's checkpoint
    stub, trained = captioner.train.train_captioner, []

    def killed_captioner(root, version, out, cap_cfg, log=print):
        trained.append(cap_cfg.steps)
        stub(root, version, out, cap_cfg, log)
        if cap_cfg.steps != cfg.captioner_steps:
            raise RuntimeError("killed")  # after its first checkpoint
        return Path(out) / "checkpoint"

    monkeypatch.setattr(captioner.train, "train_captioner", killed_captioner)
    run(replace(cfg, captioner_steps=7), RuntimeError)
    run(cfg)
    assert trained == [7, cfg.captioner_steps]


def test_fine_tuning_from_the_runs_own_dit_is_refused_before_it_is_emptied(tmp_path, monkeypatch):
    """`retrain --from-checkpoint runs/retrain/dit` with the default --run runs/retrain: the DiT stage
    emptied runs/retrain/dit, the checkpoint it was to fine-tune, and then failed on the missing one."""
    calls = []
    run = _stub_training(monkeypatch, tmp_path, calls, set())
    run(RetrainConfig.tiny())
    dit = tmp_path / "run" / "dit"
    with pytest.raises(ValueError, match="this run's own DiT dir"):
        retrain(None, [str(tmp_path / "raw")], str(tmp_path / "ds"), str(tmp_path / "run"), from_checkpoint=str(dit),
                cfg=RetrainConfig.tiny(), log=lambda s: None)
    assert (dit / "latest.json").is_file() and (dit / "history.jsonl").is_file()


def test_dit_stage_arguments_resume_a_killed_train_for_real(tmp_path):
    """The `spacetime train` retrain builds, stopped at step 2 (as a kill after that checkpoint
    leaves it), continues at step 3 on the rerun with resume_flag; without it the command refuses."""
    import pyarrow as pa
    from deltalake import write_deltalake
    from typer.testing import CliRunner

    from generator.precompute import LATENTS_SCHEMA, tensor_to_bytes
    from spacetime.cli import app
    from spacetime.retrain import resume_flag, train_dit_stage

    rows = [{"clip_id": f"c{i}", "bucket": {"frames": 2, "height": 8, "width": 8}, "vae_sha": "v", "text_encoder_sha": "t",
             "clips_version": 0, "latent": tensor_to_bytes(torch.randn(4, 2, 8, 8), "latent"),
             "text_embedding": tensor_to_bytes(torch.randn(3, 8), "text")} for i in range(4)]
    write_deltalake(str(tmp_path / "ds" / "latents"), pa.Table.from_pylist(rows, schema=LATENTS_SCHEMA))
    out = tmp_path / "dit"
    _, args = train_dit_stage(replace(RetrainConfig.tiny(), dit_steps=4), str(tmp_path / "ds"), 0, out, "v", None, "t")
    r = CliRunner().invoke(app, [*args, "--steps", "2"])  # the last --steps wins: the killed run's checkpoint
    assert r.exit_code == 0 and resume_flag(out) == ["--resume"], (r.output, r.exception)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "pass --resume" in r.output, r.output
    r = CliRunner().invoke(app, args + resume_flag(out))
    assert r.exit_code == 0, (r.output, r.exception)
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]


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


def test_retrain_cli_checks_its_input_files_before_any_stage(tmp_path):
    from typer.testing import CliRunner

    from spacetime.cli import app
    (tmp_path / "cap_run" / "checkpoint").mkdir(parents=True)  # a train-captioner --out, not its checkpoint
    base = ["retrain", "--sources", str(tmp_path), "--dataset", str(tmp_path / "ds"), "--run", str(tmp_path / "run")]
    for extra, said in [(["--captions", str(tmp_path / "no_captions.json")], "captions file not found"),
                        (["--captioner", str(tmp_path / "cap_run")], "not a captioner checkpoint"),
                        (["--from-checkpoint", str(tmp_path / "no_dit")], "not a DiT run dir"),
                        (["--vae", str(tmp_path / "no_vae.safetensors")], "VAE not found"),
                        (["--vae", str(tmp_path / "cap_run")], f"VAE not found: {tmp_path / 'cap_run' / 'vae.safetensors'}")]:
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 2 and said in r.output, (extra, r.output, r.exception)
    assert not (tmp_path / "run").exists() and not (tmp_path / "ds").exists()


def test_retrain_and_scale_study_refuse_an_out_that_is_a_file(tmp_path):
    """--run / --out / --dataset naming a file ended in a FileExistsError traceback (retrain: after
    nothing, scale-study: before training)."""
    from typer.testing import CliRunner

    from spacetime.cli import app
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for args in (["retrain", "--sources", str(tmp_path), "--dataset", str(tmp_path / "ds"), "--run", str(f)],
                 ["retrain", "--sources", str(tmp_path), "--dataset", str(f), "--run", str(tmp_path / "run")],
                 ["scale-study", "--out", str(f)]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "is not a directory" in r.output and r.exception.__class__ is SystemExit, \
            (args, r.output)
    assert f.read_text() == "mine" and not (tmp_path / "run").exists() and not (tmp_path / "ds").exists()


def test_scale_study_cli_on_a_dataset_without_latents_is_an_error_line(tmp_path):
    from typer.testing import CliRunner

    from spacetime.cli import app
    r = CliRunner().invoke(app, ["scale-study", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "ss")])
    assert r.exit_code == 2 and "no latents table" in r.output, (r.output, r.exception)


def test_scale_study_cli_takes_a_dataset_of_latents_over_512_tokens(tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake
    from typer.testing import CliRunner

    from generator.precompute import LATENTS_SCHEMA, tensor_to_bytes
    from spacetime.cli import app
    # 8 latents of 2 x 32 x 48 -> 768 tokens with (1, 2, 2) patches: more than the default 512
    rows = [{"clip_id": f"c{i}", "bucket": {"frames": 2, "height": 32, "width": 48}, "vae_sha": "v", "text_encoder_sha": "t",
             "latent": tensor_to_bytes(torch.randn(4, 2, 32, 48), "latent"),
             "text_embedding": tensor_to_bytes(torch.randn(3, 8), "text")} for i in range(8)]
    write_deltalake(str(tmp_path / "ds" / "latents"), pa.Table.from_pylist(rows, schema=LATENTS_SCHEMA))
    args = ["scale-study", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "ss"), "--segments", "2",
            "--token-budget", "2048"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "tokens > max_tokens 512" in r.output, (r.output, r.exception)
    r = CliRunner().invoke(app, [*args, "--max-tokens", "1024"])
    assert r.exit_code == 0 and (tmp_path / "ss" / "scaling.csv").is_file(), (r.output, r.exception)


def test_sample_stage_names_the_files_sample_wrote(tmp_path, monkeypatch):
    """With a temporal patch of 2, `sample --frames 1` writes prompt_<i>.mp4 (two latent frames): the
    stage named prompt_<i>.png, never written, and evaluation failed on it. It names what exists."""
    import spacetime.report
    import spacetime.retrain as rt
    from generator.sample import write_video

    calls = []
    run = _stub_training(monkeypatch, tmp_path, calls, set())
    stub = rt.spacetime_cmd

    def cmd(args, log_file, log):
        if args[0] != "sample":
            return stub(args, log_file, log)
        out = Path(args[args.index("--out-dir") + 1])
        for i, _ in enumerate(Path(args[args.index("--prompts") + 1]).read_text().splitlines()):
            write_video(torch.zeros(3, 5, 16, 16), out / f"prompt_{i}.mp4")  # the p_t = 2 grid's 5 frames

    monkeypatch.setattr(rt, "spacetime_cmd", cmd)
    monkeypatch.setattr(spacetime.report, "write_retrain_report", lambda *a, **k: tmp_path / "report.html")
    cfg = replace(RetrainConfig.tiny(), sample_frames=1)
    retrain(None, [str(tmp_path / "raw")], str(tmp_path / "ds"), str(tmp_path / "run"), cfg=cfg, log=lambda s: None)
    stages = Manifest.load(tmp_path / "run").stages
    assert [Path(p).name for p in stages["sample"]["outputs"]["samples"]] == [
        f"prompt_{i}.mp4" for i in range(len(cfg.prompts))]
    assert all(s["frames"] == 5 for s in stages["evaluate"]["outputs"]["samples"])


def test_curate_that_adds_nothing_keeps_the_curated_version(tmp_path, monkeypatch):
    """A rerun whose sources were touched (`make demo` regenerates its footage) curates again and adds
    nothing. The stage recorded the table's latest version, its own caption commit, so the captioner
    was trained again on the same clips; it now keeps the version it curated before."""
    import os

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    import captioner.caption
    ran = []
    _stub_retrain_stages(monkeypatch, ran)

    def caption_dataset(root, ckpt, version, log):  # a caption commit on top, as the real one makes
        write_deltalake(f"{root}/clips", DeltaTable(f"{root}/clips").to_pyarrow_table(), mode="overwrite")
        return {"version": DeltaTable(f"{root}/clips").version()}

    monkeypatch.setattr(captioner.caption, "caption_dataset", caption_dataset)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"x")

    def run():
        del ran[:]
        with pytest.raises(_StopAtTrain):
            retrain(None, [str(tmp_path / "raw")], str(tmp_path / "ds"), str(tmp_path / "run"),
                    cfg=RetrainConfig.tiny(), log=lambda s: None)
        return [name for name, _ in ran]

    assert run() == ["curate", "train_captioner", "train-vae", "precompute", "train"]
    st = os.stat(tmp_path / "raw" / "a.mp4")
    os.utime(tmp_path / "raw" / "a.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: curate runs
    assert run() == ["curate", "train"]
    assert Manifest.load(tmp_path / "run").stages["curate"]["outputs"]["dataset_version"] == 0


def test_validation_loss_runs_in_bounded_chunks(tmp_path):
    """The scale study's validation ran every held-out pair in one forward: with --dataset that is an
    eighth of the latents table, and memory grew with it. It runs packed chunks of bounded tokens; with
    one chunk it is the loss it was."""
    from generator.dit import DiT, DiTConfig
    from generator.flow import RectifiedFlow
    from generator.patches import pack, pack_sequences
    from spacetime.scale_study import shapes_pairs, validation_loss

    torch.manual_seed(0)
    pairs = shapes_pairs(12, 0)
    model = DiT(DiTConfig(in_channels=3, hidden_size=32, depth=1, num_heads=2, text_dim=32)).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    # the one-forward loss it replaced, with the same fixed noise
    packed, (text, text_cu) = pack([z for z, _ in pairs], model.cfg.patch), pack_sequences([t for _, t in pairs])
    gen, flow = torch.Generator().manual_seed(1234), RectifiedFlow(48)
    with torch.no_grad():
        old = sum(flow.loss(lambda z, t: model(z, t, packed.positions, packed.cu_seqlens, text, text_cu),
                            packed.tokens, packed.cu_seqlens, generator=gen).item() for _ in range(2)) / 2
    seen.clear()
    assert abs(validation_loss(model, pairs, 48, repeats=2) - old) < 1e-6 and seen == [packed.tokens.shape[0]] * 2
    seen.clear()
    chunked = validation_loss(model, pairs, 48, repeats=2, chunk_tokens=64)
    assert max(seen) <= 64 and len(seen) > 2 and abs(chunked - old) < 0.5 * old
