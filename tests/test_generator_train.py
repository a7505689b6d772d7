"""Generator training loop: learning on shapes, exact resume, NaN guard, checkpoint integrity, budget."""
import json
from dataclasses import replace
import os

import pytest
import torch
import torch.nn.functional as F

from generator.dit import DiTConfig
from generator.flow import RectifiedFlow
from generator.patches import pack, pack_sequences
from generator.shapes import COLOURS, embed_caption, make_dataset
from generator.train import CheckpointError, TrainConfig, train

TEXT_DIM = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def pixel_latent(video):
    """Stand-in latent for fast tests: (T, 3, 32, 32) video -> (3, 1 + (T-1)/4, 8, 8) by pooling."""
    z = F.avg_pool3d(video.permute(1, 0, 2, 3)[None], (1, 4, 4))[0]
    return z[:, ::4].contiguous()


@pytest.fixture(scope="module")
def pairs():
    """Videos (3 latent frames) and images (1 frame) of moving shapes with their captions."""
    out = []
    for i, (v, cap, _) in enumerate(make_dataset(48, frames=9, size=32, seed=0)):
        z = pixel_latent(v)
        out.append((z[:, :1].contiguous() if i % 4 == 0 else z, embed_caption(cap, TEXT_DIM)))
    return out


def small_cfg(**kw):
    dit = DiTConfig(in_channels=3, hidden_size=64, depth=2, num_heads=2, text_dim=TEXT_DIM)
    base = dict(dit=dit, steps=10, lr=2e-3, warmup_steps=5, max_tokens=256, log_every=0, base_tokens=48, cfg_dropout=0.1)
    return TrainConfig(**{**base, **kw})


def test_flow_learns_shapes_and_uses_the_caption(pairs):
    res = train(small_cfg(steps=120), pairs)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-15:]) / 15 < 0.8 * sum(losses[:15]) / 15, (losses[:15], losses[-15:])
    # task metric: zero-shot colour classification by the flow loss. For held-out videos, the
    # caption naming the right colour should give the lowest loss (chance = 1 / 4).
    model, rf = res.ema, RectifiedFlow(base_tokens=48)
    test = make_dataset(16, frames=9, size=32, seed=99)
    correct = 0
    for v, cap, (colour, shape, direction) in test:
        p = pack([pixel_latent(v)])
        losses = {}
        for c in COLOURS:
            y, ycu = pack_sequences([embed_caption(cap.replace(colour, c), TEXT_DIM)])
            fn = lambda z, t: model(z, t, p.positions, p.cu_seqlens, y, ycu)
            g = torch.Generator().manual_seed(0)  # same noise and t for every candidate caption
            with torch.no_grad():
                losses[c] = sum(rf.loss(fn, p.tokens, p.cu_seqlens, generator=g).item() for _ in range(8))
        correct += min(losses, key=losses.get) == colour
    assert correct / len(test) > 0.5, correct


def test_exact_resume_matches_uninterrupted(pairs, tmp_path):
    full = train(small_cfg(steps=8, ckpt_dir=str(tmp_path / "a")), pairs)
    part = str(tmp_path / "b")
    first = train(small_cfg(steps=3, ckpt_dir=part), pairs)
    rest = train(small_cfg(steps=8, ckpt_dir=part), pairs)  # resumes at step 3
    assert rest.history[0]["step"] == 4
    curve = [h["loss"] for h in first.history + rest.history]
    assert curve == [h["loss"] for h in full.history]  # bitwise on CPU
    for a, b in zip(full.ema.parameters(), rest.ema.parameters()):
        assert torch.equal(a, b)
    # settings that would change the data order, packing or the model are refused, named
    with pytest.raises(ValueError, match=r"seed: 0 -> 7; max_tokens: .* -> 100"):
        train(small_cfg(steps=10, ckpt_dir=part, seed=7, max_tokens=100), pairs)
    with pytest.raises(ValueError, match="dit: "):
        train(small_cfg(steps=10, ckpt_dir=part, dit=replace(small_cfg().dit, abs_pos=False)), pairs)


def test_history_survives_a_kill_and_resumes_exactly(pairs, tmp_path):
    """history.jsonl is written with each checkpoint: a run killed after its step-4 checkpoint keeps
    steps 1-4 (the CLI wrote the file only at the end, so they were lost), and its resume records
    5-8 once, the uninterrupted run's curve."""
    full = train(small_cfg(steps=8, ckpt_dir=str(tmp_path / "a")), pairs)
    killed = str(tmp_path / "b")

    def kill(rec):
        if rec["step"] == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(steps=8, ckpt_dir=killed, ckpt_every=4, log_every=1), pairs, report=kill)
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "history.jsonl"))]
    assert [h["step"] for h in read(killed)] == [1, 2, 3, 4]
    train(small_cfg(steps=8, ckpt_dir=killed), pairs)
    assert read(killed) == read(str(tmp_path / "a")) == full.history


def test_compiled_blocks_train_like_eager_without_recompiling_per_batch(pairs):
    # --compile: the same losses to float rounding, over batches whose sample count, lengths and
    # per-token times (the task mix's clean frames) change every step, and a bounded set of graphs
    from torch._dynamo.utils import counters

    from generator.conditioning import TASK_MIX

    kw = dict(steps=6, cond_ratios=TASK_MIX)
    eager = train(small_cfg(**kw), pairs)
    counters.clear()
    compiled = train(small_cfg(compile=True, **kw), pairs)
    assert len({h["tokens"] for h in compiled.history}) > 1  # the batches did change shape
    assert 0 < counters["stats"]["unique_graphs"] <= 12, dict(counters["stats"])
    torch.testing.assert_close([h["loss"] for h in compiled.history], [h["loss"] for h in eager.history],
                               rtol=1e-4, atol=1e-5)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()  # checkpoints unchanged


def test_grad_accum_steps_on_the_mean_gradient_of_its_batches(pairs, monkeypatch):
    # grad_accum 2: the gradient an optimizer step sees is the mean of its two batches' gradients,
    # each batch drawn with the noise, times, CFG drops and clean frames it would have had alone
    from generator.conditioning import TASK_MIX, sample_clean_tokens
    from generator.dit import DiT
    from generator.train import PackedBatches

    seen, clip = [], torch.nn.utils.clip_grad_norm_

    def spy(params, c):  # the gradients as the optimizer step is about to clip them
        params = list(params)
        seen.append([p.grad.clone() for p in params])
        return clip(params, c)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = small_cfg(steps=1, grad_accum=2, max_tokens=64, cond_ratios=TASK_MIX)
    res = train(cfg, pairs)
    assert res.step == 1 and len(seen) == 1
    torch.manual_seed(cfg.seed)
    model = DiT(cfg.dit)
    batches = PackedBatches(pairs, cfg.dit.patch, cfg.max_tokens, cfg.seed)
    gen, flow = torch.Generator().manual_seed(cfg.seed * 1000), RectifiedFlow(cfg.base_tokens)
    for _ in range(2):
        b = next(batches)
        p, text, text_cu = b["packed"], b["text"], b["text_cu"]
        drop = torch.rand(len(p.grids), generator=gen) < cfg.cfg_dropout
        clean = sample_clean_tokens(p, cfg.cond_ratios, gen)
        loss = flow.loss(lambda z, t: model(z, t, p.positions, p.cu_seqlens, text, text_cu, drop), p.tokens,
                         p.cu_seqlens, generator=gen, clean=clean)
        (loss / 2).backward()
    for got, p in zip(seen[0], model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    assert res.history[0]["tokens"] == sum(batches.tokens[i] for i in batches._order[: batches.pos])


def test_more_ranks_than_samples_is_an_error_not_a_hang(pairs):
    from generator.train import PackedBatches
    with pytest.raises(ValueError, match=r"2 sample\(s\) for 3 rank"):
        PackedBatches(pairs[:2], (1, 2, 2), 256, rank=2, world_size=3)
    with pytest.raises(ValueError, match=r"0 sample\(s\) for 1 rank"):
        PackedBatches([], (1, 2, 2), 256)


def test_grad_accum_learns_resumes_exactly_and_skips_a_nan_batch(pairs, tmp_path):
    full = train(small_cfg(steps=6, grad_accum=2, ckpt_dir=str(tmp_path / "a")), pairs)
    part = str(tmp_path / "b")
    first = train(small_cfg(steps=3, grad_accum=2, ckpt_dir=part), pairs)
    rest = train(small_cfg(steps=6, grad_accum=2, ckpt_dir=part), pairs)
    assert [h["loss"] for h in first.history + rest.history] == [h["loss"] for h in full.history]
    bad = [(z.clone(), t) for z, t in pairs[:12]]
    bad[0][0][0, 0, 0, 0] = float("nan")  # one sample per batch: the first step's first batch
    res = train(small_cfg(steps=3, max_tokens=64, grad_accum=2), bad)
    assert res.skipped == 1 and len(res.history) == 2
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    learn = train(small_cfg(steps=60, grad_accum=2, max_tokens=128), pairs)
    losses = [h["loss"] for h in learn.history]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), (losses[:10], losses[-10:])


def test_nan_batch_is_skipped_and_counted(pairs):
    bad = [(z.clone(), t) for z, t in pairs[:12]]
    bad[0][0][0, 0, 0, 0] = float("nan")
    res = train(small_cfg(steps=6, max_tokens=64), bad)  # one sample per batch; epoch of 12
    assert res.skipped == 1 and res.step == 6 and len(res.history) == 5
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_tampered_and_truncated_checkpoints_are_refused(pairs, tmp_path):
    d = str(tmp_path / "ck")
    train(small_cfg(steps=2, ckpt_dir=d), pairs)
    latest = json.load(open(os.path.join(d, "latest.json")))
    path = os.path.join(d, latest["file"])
    blob = bytearray(open(path, "rb").read())
    blob[-10] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        train(small_cfg(steps=4, ckpt_dir=d), pairs)
    open(path, "wb").write(bytes(blob[: len(blob) // 2]))
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        train(small_cfg(steps=4, ckpt_dir=d), pairs)


def test_mismatched_checkpoint_names_keys(pairs, tmp_path):
    d = str(tmp_path / "ck")
    train(small_cfg(steps=1, ckpt_dir=d), pairs)
    deeper = small_cfg(steps=2, ckpt_dir=d)
    deeper.dit.depth = 3
    with pytest.raises(ValueError, match="missing keys \\['blocks.2"):
        train(deeper, pairs)


def test_flops_budget_stops_the_run(pairs):
    res = train(small_cfg(steps=1000, max_flops=1.0), pairs)
    assert res.stop_reason == "max_flops" and res.step == 1
    res = train(small_cfg(steps=1000, max_seconds=0.0), pairs)
    assert res.stop_reason == "max_seconds" and res.step == 0


def _nan_at(pairs, i):
    """The first 12 pairs with sample i's latent holding a NaN (its batch's step is skipped)."""
    bad = [(z.clone(), t) for z, t in pairs[:12]]
    bad[i][0][0, 0, 0, 0] = float("nan")
    return bad


def test_resume_right_after_a_skipped_step_is_exact_and_its_checkpoint_is_written(pairs, tmp_path):
    """A step skipped for a NaN went `continue` past the checkpoint: with ckpt_every landing on it
    no checkpoint was written (a kill one step later lost every step since the previous one, and a
    run whose every-k-th step was skipped never checkpointed). A run that ends on the skipped step
    and is resumed, and one killed after it, both repeat the uninterrupted run (curve, EMA, skips,
    history.jsonl)."""
    from generator.train import checkpoint_meta
    bad = _nan_at(pairs, 5)  # max_tokens 64: step 2's batch is sample 5 alone
    cfg = lambda steps, d, **kw: small_cfg(steps=steps, max_tokens=64, ckpt_dir=str(tmp_path / d), **kw)
    read = lambda d: [json.loads(line) for line in open(tmp_path / d / "history.jsonl")]
    full = train(cfg(6, "a"), bad)
    assert full.skipped == 1 and [h["step"] for h in full.history] == [1, 3, 4, 5, 6]
    first = train(cfg(2, "b"), bad)  # ends on the skipped step
    assert first.skipped == 1 and checkpoint_meta(str(tmp_path / "b"))["step"] == 2
    rest = train(cfg(6, "b"), bad)
    assert [h["loss"] for h in first.history + rest.history] == [h["loss"] for h in full.history]
    assert rest.skipped == 1 and read("b") == read("a") == full.history
    for a, b in zip(full.ema.parameters(), rest.ema.parameters()):
        assert torch.equal(a, b)

    def kill(rec):
        if rec["step"] == 3:  # before step 3's checkpoint
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(cfg(6, "c", ckpt_every=2, log_every=1), bad, report=kill)
    meta = checkpoint_meta(str(tmp_path / "c"))
    assert meta["step"] == 2 and meta["skipped"] == 1
    again = train(cfg(6, "c", ckpt_every=2), bad)
    assert again.skipped == 1 and read("c") == read("a")


def _opt_state(opt):
    """An optimizer's per-parameter state, copied: {"<index>.<name>": tensor}."""
    return {f"{i}.{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def test_a_skipped_step_changes_no_weights_ema_or_optimizer_state(pairs, tmp_path):
    """The NaN/inf guard: the skipped step 2's checkpoint holds step 1's model, EMA and AdamW state
    (moments and Adam's own step count) bit for bit; the skip is counted in the result and in the
    next history record; the step counter, hence the LR schedule, counts it (TrainConfig.steps: skipped
    ones included). A finite loss with a non-finite gradient is skipped the same way."""
    from generator.train import guarded_update, lr_at, read_checkpoint_file
    bad = _nan_at(pairs, 5)
    cfg = lambda steps, d: small_cfg(steps=steps, max_tokens=64, ckpt_dir=str(tmp_path / d))
    one, two = train(cfg(1, "one"), bad), train(cfg(2, "two"), bad)
    assert (one.skipped, two.skipped, two.step, len(two.history)) == (0, 1, 2, 1)
    (t1, _), (t2, _) = read_checkpoint_file(str(tmp_path / "one")), read_checkpoint_file(str(tmp_path / "two"))
    state = [k for k in t1 if not k.startswith("rng.")]
    assert any(k.startswith("optim.") for k in state) and state == [k for k in t2 if not k.startswith("rng.")]
    for k in state:
        assert torch.equal(t1[k], t2[k]), k
    three = train(cfg(3, "three"), bad)
    assert three.history[-1]["skipped"] == 1 and three.history[-1]["lr"] == lr_at(cfg(3, "x"), 2)
    # finite loss, non-finite gradient (d sqrt(x)/dx at 0)
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    guarded_update(lin(torch.ones(2, 4)).pow(2).mean(), opt, lin.parameters(), 1.0, 1, "t", 1)
    before = ([p.clone() for p in lin.parameters()], _opt_state(opt))
    loss = torch.sqrt(lin.weight.sum() * 0).sum()
    assert torch.isfinite(loss)
    assert guarded_update(loss, opt, lin.parameters(), 1.0, 1, "t", 2) is None
    assert all(torch.equal(a, b) for a, b in zip(before[0], lin.parameters()))
    assert all(p.grad is None for p in lin.parameters())
    after = _opt_state(opt)
    assert before[1].keys() == after.keys() and all(torch.equal(before[1][k], after[k]) for k in after)


def test_budget_stop_then_resume_with_a_larger_budget_is_exact(pairs, tmp_path):
    """--budget-flops stops at step 2; resumed with a larger (total) budget it goes on to step 4,
    then without one to the end: losses, FLOPs (restored, not counted again) and history.jsonl are
    the uninterrupted run's."""
    full = train(small_cfg(steps=6, ckpt_dir=str(tmp_path / "a")), pairs)
    d = str(tmp_path / "b")
    first = train(small_cfg(steps=6, ckpt_dir=d, max_flops=full.history[1]["flops"]), pairs)
    assert (first.stop_reason, first.step) == ("max_flops", 2)
    mid = train(small_cfg(steps=6, ckpt_dir=d, max_flops=full.history[3]["flops"]), pairs)
    assert (mid.stop_reason, mid.step) == ("max_flops", 4)
    last = train(small_cfg(steps=6, ckpt_dir=d), pairs)
    assert (last.stop_reason, last.step) == ("steps", 6)
    assert first.history + mid.history + last.history == full.history  # loss, lr, grad norm, flops
    assert last.flops == full.flops
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "history.jsonl"))]
    assert read(d) == read(str(tmp_path / "a")) == full.history


def test_flops_count_the_forward_matmuls_of_the_image_tokens_three_times(pairs):
    """FLOPs for the budget and MFU: a training step adds 3x (forward + backward) the forward's matmul
    FLOPs on image tokens: the linears FlopCounterMode measures, plus self- and cross-attention counted
    by hand (4 D L_i L'_i each). Cross-attention was counted with the batch's mean text length for
    every token: with long samples holding short captions (or CFG-dropped ones, 1 null token) and
    short ones long captions, the count was off; it is now each sample's tokens x its text length."""
    from torch.utils.flop_counter import FlopCounterMode

    from generator.dit import DiT
    from generator.train import PackedBatches
    mixed = [(z, y[: 1 + i % 5]) for i, (z, y) in enumerate(pairs)]  # text 1..5 tokens, samples 16 or 48
    for dropout in (0.0, 1.0):
        cfg = small_cfg(steps=1, cfg_dropout=dropout)
        torch.manual_seed(0)
        model = DiT(cfg.dit)
        b = next(PackedBatches(mixed, cfg.dit.patch, cfg.max_tokens, cfg.seed))
        p, text, text_cu = b["packed"], b["text"], b["text_cu"]
        drop = torch.full((len(p.grids),), dropout > 0)
        with FlopCounterMode(display=False, depth=None) as fc:
            model(p.tokens, torch.rand(len(p.grids)), p.positions, p.cu_seqlens, text, text_cu, drop)
        counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
        image_linears = ["x_embedder", "final_layer.linear"] + [
            f"blocks.{i}.{m}" for i in range(cfg.dit.depth) for m in ("attn.qkv", "attn.proj", "cross_attn.q",
                                                                       "cross_attn.proj", "mlp")]
        linear = sum(counts[f"DiT.{m}"] for m in image_linears)
        L = p.seqlens.double()
        text_lens = torch.ones_like(L) if dropout else (text_cu[1:] - text_cu[:-1]).double()
        assert len(set(text_lens.tolist())) > 1 or dropout
        attn = cfg.dit.depth * 4 * cfg.dit.hidden_size * float((L * L).sum() + (L * text_lens).sum())
        res = train(cfg, mixed)
        assert res.history[0]["tokens"] == p.tokens.shape[0]
        assert res.history[0]["flops"] == pytest.approx(3 * (linear + attn), rel=1e-9), dropout


def test_packed_batches_see_every_sample_once_per_epoch_on_disjoint_ranks(pairs):
    """Over an epoch each rank's batches hold each of its samples once, within max_tokens; the ranks'
    samples are disjoint and cover the data; a restored data position gives the same next batches;
    a sample over max_tokens is refused, with its token count."""
    from generator.train import PackedBatches
    for world in (1, 2, 3):
        seen = []
        for r in range(world):
            b = PackedBatches(pairs, (1, 2, 2), 100, seed=3, rank=r, world_size=world)
            mine = []
            while b.pos < len(b._order):
                chosen = b._take()
                assert sum(b.tokens[i] for i in chosen) <= 100
                mine += chosen
            assert b.epoch == 0 and len(mine) == len(set(mine))
            seen += mine
        assert sorted(seen) == list(range(len(pairs))), world
    a = PackedBatches(pairs, (1, 2, 2), 100, seed=3, rank=1, world_size=2)
    for _ in range(30):  # into the second epoch
        next(a)
    b = PackedBatches(pairs, (1, 2, 2), 100, seed=3, rank=1, world_size=2)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        x, y = next(a), next(b)
        assert torch.equal(x["packed"].tokens, y["packed"].tokens) and torch.equal(x["text"], y["text"])
    with pytest.raises(ValueError, match="48 tokens > max_tokens 47"):
        PackedBatches(pairs, (1, 2, 2), 47)


def test_history_has_each_step_once_after_a_kill_between_its_records_and_checkpoint(pairs, tmp_path, monkeypatch):
    """history.jsonl gets steps 1-4 just before the step-4 checkpoint; a kill in between (and a torn
    last line) leaves records past the step-2 checkpoint: the resume drops them and records them
    again, once, as the uninterrupted run did."""
    import generator.train as gt
    full = train(small_cfg(steps=6, ckpt_dir=str(tmp_path / "a")), pairs)
    d = str(tmp_path / "b")
    save = gt.save_checkpoint

    def dies_at_4(*args, **kw):
        if args[6] == 4:
            raise KeyboardInterrupt
        return save(*args, **kw)
    monkeypatch.setattr(gt, "save_checkpoint", dies_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(steps=6, ckpt_dir=d, ckpt_every=2), pairs)
    monkeypatch.setattr(gt, "save_checkpoint", save)
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "history.jsonl"))]
    assert [h["step"] for h in read(d)] == [1, 2, 3, 4]
    with open(os.path.join(d, "history.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')
    train(small_cfg(steps=6, ckpt_dir=d, ckpt_every=2), pairs)
    assert read(d) == read(str(tmp_path / "a")) == full.history


@pytest.mark.slow
def test_ray_train_wrapper_runs_the_same_loop(pairs, tmp_path):
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from generator.train import train_loop_per_worker
    from dataclasses import asdict
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = asdict(small_cfg(steps=4, log_every=1, ckpt_dir=str(tmp_path / "ray_ck")))
        trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"train": cfg, "data": pairs},
                               scaling_config=ScalingConfig(num_workers=2),
                               run_config=RunConfig(storage_path=str(tmp_path / "ray")))
        assert trainer.fit().error is None
        assert json.load(open(tmp_path / "ray_ck" / "latest.json"))["step"] == 4
    finally:
        ray.shutdown()


def test_lr_schedules():
    from generator.train import lr_at
    const = TrainConfig(lr=1e-3, warmup_steps=10, steps=100)
    cos = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(const, 0) == lr_at(cos, 0) == 1e-4 and lr_at(const, 9) == 1e-3
    assert lr_at(const, 99) == 1e-3
    lrs = [lr_at(cos, s) for s in range(10, 100)]
    assert lrs[0] == 1e-3 and all(a >= b for a, b in zip(lrs, lrs[1:])) and abs(lr_at(cos, 100) - 1e-4) < 1e-12
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(TrainConfig(lr_schedule="linear"), 0)


def _on_gloo(rank, world, init_file, out_file, work):
    """One CPU rank of a two-rank test: join the gloo group, run work() -> dict, write it as JSON."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = work()
        with open(out_file, "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _ranks_worker(rank, world, init_file, pairs, out_dir):
    """One rank: for DDP and FSDP, an uninterrupted run, then a run killed half-way and resumed."""
    import torch.distributed as dist

    def work():
        out = {}
        for strategy in ("ddp", "fsdp"):
            ck = lambda name: os.path.join(out_dir, f"{strategy}_{name}")
            cfg = lambda steps, d: small_cfg(steps=steps, strategy=strategy, ckpt_dir=ck(d), ckpt_every=2)
            full = train(cfg(6, "full"), pairs, rank, world)
            first = train(cfg(3, "cut"), pairs, rank, world)
            rest = train(cfg(6, "cut"), pairs, rank, world)
            out[strategy] = {"full": [h["loss"] for h in full.history],
                             "resumed": [h["loss"] for h in first.history + rest.history],
                             "grad": [h["grad_norm"] for h in full.history]}
        # a FLOPs budget: each rank counts its own batches' FLOPs and would cross it at its own step;
        # the stop is agreed, so both ranks stop at the same step (alone, one would hang the other)
        flops = [None, None]  # each rank's FLOPs after 2 steps; the budget lies between them
        dist.all_gather_object(flops, full.history[1]["flops"])
        budget = train(small_cfg(steps=6, max_flops=sum(flops) / 2), pairs, rank, world)
        out["budget"] = {"step": budget.step, "stop": budget.stop_reason, "flops": flops}
        return out
    _on_gloo(rank, world, init_file, os.path.join(out_dir, f"rank{rank}.json"), work)


def test_fsdp_equals_ddp_and_both_resume_exactly_over_two_ranks(pairs, tmp_path, run_ranks):
    """Two CPU ranks over gloo. FSDP (sharded model, EMA, optimizer) takes the same steps as DDP; a
    run killed and resumed from its gathered checkpoint repeats the uninterrupted losses on every
    rank (each rank's RNG and data position are saved); the checkpoint loads into one process."""
    run_ranks(_ranks_worker, (2, str(tmp_path / "pg"), pairs, str(tmp_path)), 2, 300)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in ranks:
        for strategy in ("ddp", "fsdp"):
            assert len(r[strategy]["full"]) == 6
            assert r[strategy]["resumed"] == pytest.approx(r[strategy]["full"], rel=1e-6, abs=1e-7), strategy
        # FSDP's reduce-scatter sums in another order than DDP's all-reduce: equal up to rounding
        assert r["fsdp"]["full"] == pytest.approx(r["ddp"]["full"], rel=1e-4)
        assert r["fsdp"]["grad"] == pytest.approx(r["ddp"]["grad"], rel=1e-4)
    assert ranks[0]["ddp"]["full"] != ranks[1]["ddp"]["full"]  # the ranks did read different data
    budget = [r["budget"] for r in ranks]
    assert budget[0]["flops"][0] != budget[0]["flops"][1]  # the ranks' FLOPs differ: each would stop elsewhere
    assert budget[0]["step"] == budget[1]["step"] == 2
    assert {b["stop"] for b in budget} <= {"max_flops", "budget (another rank)"} and "max_flops" in {b["stop"] for b in budget}
    # the sharded run's checkpoint is a plain full one: a single process resumes it (with a warning)
    res = train(small_cfg(steps=8, ckpt_dir=str(tmp_path / "fsdp_full")), pairs)
    assert res.step == 8 and len(res.history) == 2


def _compiled_ranks_worker(rank, world, init_file, pairs, out_dir):
    _on_gloo(rank, world, init_file, os.path.join(out_dir, f"compiled{rank}.json"), lambda: {
        f"{s}_{c}": [h["loss"] for h in train(small_cfg(steps=4, strategy=s, compile=c), pairs, rank, world).history]
        for s in ("ddp", "fsdp") for c in (False, True)})


@pytest.mark.slow
def test_compiled_blocks_under_ddp_and_fsdp_over_two_ranks(pairs, tmp_path, run_ranks):
    """train --compile --workers 2: compile_blocks inside DDP's and FSDP2's wrappers (FSDP's hooks
    stay outside the graphs) takes the eager run's steps, to float rounding."""
    run_ranks(_compiled_ranks_worker, (2, str(tmp_path / "pg"), pairs, str(tmp_path)), 2, 600)
    for r in range(2):
        out = json.load(open(tmp_path / f"compiled{r}.json"))
        for s in ("ddp", "fsdp"):
            assert len(out[f"{s}_True"]) == 4
            assert out[f"{s}_True"] == pytest.approx(out[f"{s}_False"], rel=1e-4, abs=1e-6), s


def _accum_ranks_worker(rank, world, init_file, pairs, out_dir):
    def run(s):
        res = train(small_cfg(steps=4, strategy=s, grad_accum=2, max_tokens=128), pairs, rank, world)
        return {"loss": [h["loss"] for h in res.history], "grad": [h["grad_norm"] for h in res.history]}
    _on_gloo(rank, world, init_file, os.path.join(out_dir, f"accum{rank}.json"), lambda: {s: run(s) for s in ("ddp", "fsdp")})


@pytest.mark.slow
def test_grad_accum_under_ddp_and_fsdp_over_two_ranks(pairs, tmp_path, run_ranks):
    """train --grad-accum 2 --workers 2: the held-back syncs (DDP no_sync, FSDP
    set_requires_gradient_sync) still give one global gradient per step: DDP and FSDP agree."""
    run_ranks(_accum_ranks_worker, (2, str(tmp_path / "pg"), pairs, str(tmp_path)), 2, 300)
    ranks = [json.load(open(tmp_path / f"accum{r}.json")) for r in range(2)]
    for r in ranks:
        assert len(r["ddp"]["loss"]) == 4
        assert r["fsdp"]["loss"] == pytest.approx(r["ddp"]["loss"], rel=1e-4)
        assert r["fsdp"]["grad"] == pytest.approx(r["ddp"]["grad"], rel=1e-4)
    assert ranks[0]["ddp"]["grad"] == pytest.approx(ranks[1]["ddp"]["grad"], rel=1e-6)  # one global norm
    assert ranks[0]["ddp"]["loss"] != ranks[1]["ddp"]["loss"]  # each rank read its own batches


def _flops_ranks_worker(rank, world, init_file, pairs, out_dir):
    """One rank: an uninterrupted 4-step run and one cut at step 2 and resumed; each rank's FLOPs."""
    def work():
        ck = lambda name: os.path.join(out_dir, name)
        full = train(small_cfg(steps=4, ckpt_dir=ck("full")), pairs, rank, world)
        first = train(small_cfg(steps=2, ckpt_dir=ck("cut")), pairs, rank, world)
        rest = train(small_cfg(steps=4, ckpt_dir=ck("cut")), pairs, rank, world)
        return {"full": [full.flops, [h["flops"] for h in full.history]],
                "resumed": [rest.flops, [h["flops"] for h in first.history + rest.history]]}
    _on_gloo(rank, world, init_file, os.path.join(out_dir, f"flops{rank}.json"), work)


def test_each_rank_resumes_its_own_flops(pairs, tmp_path, run_ranks):
    """Each rank counts its own batches' FLOPs (the budget stops when any rank is over), but the
    checkpoint held rank 0's count alone and every rank resumed from it: rank 1's count after a resume
    was rank 0's past plus its own, so a resumed two-rank run's budget stop was not the uninterrupted
    one's. The checkpoint now holds every rank's count and each rank resumes its own."""
    run_ranks(_flops_ranks_worker, (2, str(tmp_path / "pg"), pairs, str(tmp_path)), 2, 300)
    ranks = [json.load(open(tmp_path / f"flops{r}.json")) for r in range(2)]
    assert ranks[0]["full"][0] != ranks[1]["full"][0]  # the ranks' batches differ
    for r in ranks:
        assert r["resumed"] == r["full"]
