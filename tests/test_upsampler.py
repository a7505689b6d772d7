"""The prompt upsampler: a tiny T5 trained on templated (short -> dense) pairs, the LLM backend
on a tiny GPT-2 dir saved locally, the no-backend fallback and prompt validation."""
import itertools
import warnings

import pyarrow as pa
import pytest
import torch
from deltalake import write_deltalake
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from captioner.metrics import attribute_accuracy, caption_scores
from captioner.model import EOS, SPECIAL_TOKENS, build_tokenizer
from captioner.upsample import (LLMUpsampler, T5Upsampler, UpsamplerConfig, caption_pairs, few_shot_examples,
                                load_upsampler, train_upsampler, upsample)

COLOURS = ["red", "green", "blue", "yellow", "white", "orange"]
SHAPES = {"square": "grey", "circle": "black", "triangle": "sandy"}  # shape -> the background it sits on
DIRECTIONS = ["left", "right"]


def pair(colour, shape, direction):
    other = "right" if direction == "left" else "left"
    return (f"a {colour} {shape} moving {direction}",
            f"a small {colour} {shape} glides from the {other} edge to the {direction} edge over a "
            f"{SHAPES[shape]} background. the camera is static and the light is soft.")


ALL = [pair(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS)]
HELD_OUT = ALL[1::6]  # every combination of colour x shape appears in train except these six


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    train = [p for p in ALL if p not in HELD_OUT]
    cfg = UpsamplerConfig(d_model=64, d_ff=128, num_layers=2, num_heads=4, max_len=40, steps=150,
                          batch_size=16, lr=3e-3, warmup_steps=10, seed=0)
    return train_upsampler(train, tmp_path_factory.mktemp("t5"), cfg, log=lambda *_: None)


def test_trained_t5_beats_the_raw_prompt_on_held_out_pairs(t5_dir):
    up = load_upsampler(t5_dir)
    assert isinstance(up, T5Upsampler)
    outs = {i: upsample(short, up, seed=0) for i, (short, _) in enumerate(HELD_OUT)}
    refs = {i: [dense] for i, (_, dense) in enumerate(HELD_OUT)}
    ours = caption_scores(refs, outs)["BLEU-4"]
    raw = caption_scores(refs, {i: short for i, (short, _) in enumerate(HELD_OUT)})["BLEU-4"]
    assert ours > raw + 0.3, (ours, raw, outs)
    # the user's colour survives upsampling
    truths = [{"colour": s.split()[1]} for s, _ in HELD_OUT]
    assert attribute_accuracy(list(outs.values()), truths, {"colour": COLOURS})["colour"] >= 0.5, outs
    assert upsample(HELD_OUT[0][0], up, seed=0) == outs[0]  # deterministic


def test_no_backend_returns_prompt_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="upsampler"):
        assert upsample("  a red ball  ") == "a red ball"
    with pytest.warns(UserWarning, match="not found"):
        assert load_upsampler(tmp_path / "missing") is None


def test_bad_prompts_raise():
    for bad in ["", "   ", None, "x" * 5000]:
        with pytest.raises(ValueError):
            upsample(bad)


def test_an_upsampler_that_returns_nothing_keeps_the_prompt(tmp_path):
    """A T5 upsampler that knows none of the prompt's words can answer <eos> at once: the empty string
    was then sampled (the words encoder failed on it with a traceback) and recorded as the upsampled
    prompt. The prompt is kept, with a warning."""
    cfg = UpsamplerConfig(d_model=16, d_ff=32, num_layers=1, num_heads=2, max_len=16, steps=2, batch_size=4)
    t5 = T5Upsampler(train_upsampler(ALL[:4], tmp_path / "t5", cfg, log=lambda *_: None))
    eos = SPECIAL_TOKENS.index(EOS)  # as such a T5 does: <eos> first
    t5.model.generation_config.suppress_tokens = [i for i in range(t5.model.config.vocab_size) if i != eos]
    assert t5("a red car") == ""
    with pytest.warns(UserWarning, match="returned nothing"):
        assert upsample("  a red car ", t5) == "a red car"


def test_llm_backend_on_a_local_dir_with_dataset_examples(tmp_path):
    # a dataset table with captions, for the few-shot examples
    rows = [{"clip_id": str(i), "status": "kept", "caption_short": s, "caption_dense": d,
             "caption_teacher_short": None, "caption_teacher_dense": None} for i, (s, d) in enumerate(ALL[:6])]
    rows.append({"clip_id": "x", "status": "filtered", "caption_short": "never", "caption_dense": "shown",
                 "caption_teacher_short": None, "caption_teacher_dense": None})
    write_deltalake(str(tmp_path / "ds" / "clips"), pa.Table.from_pylist(rows), mode="overwrite")
    assert len(caption_pairs(tmp_path / "ds")) == 6
    examples = few_shot_examples(tmp_path / "ds", k=2, seed=1)
    assert examples == few_shot_examples(tmp_path / "ds", k=2, seed=1) and len(examples) == 2
    # a tiny causal LM saved as a local model dir (what a real instruction-tuned LLM dir looks like)
    wl = build_tokenizer([t for p in ALL for t in p] + ["system user assistant you are part of a team"])
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=1, n_head=2,
                                    eos_token_id=2, pad_token_id=0, bos_token_id=2))
    lm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    up = load_upsampler(tmp_path / "llm", examples)
    assert isinstance(up, LLMUpsampler)
    msgs = up.messages("a red cube")
    assert msgs[0]["role"] == "system" and msgs[1]["content"] == examples[0][0] and msgs[-1]["content"] == "a red cube"
    up.max_new_tokens = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = up("a red cube", seed=3), up("a red cube", seed=3)
    assert a == b and isinstance(a, str) and a


def test_upsampler_dir_appears_whole_and_replaces_only_an_upsampler(tmp_path, monkeypatch):
    import captioner.upsample as up
    cfg = UpsamplerConfig(d_model=16, d_ff=32, num_layers=1, num_heads=2, max_len=16, steps=2, batch_size=4)
    out = tmp_path / "up"
    train_upsampler(ALL[:4], out, cfg, log=lambda *_: None)
    first = (out / "model.safetensors").read_bytes()

    def killed(tok, path):  # a run killed after the weights were written, before the rest
        raise KeyboardInterrupt

    monkeypatch.setattr(up.Tokenizer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train_upsampler(ALL[4:8], out, cfg, log=lambda *_: None)
    assert (out / "model.safetensors").read_bytes() == first and isinstance(load_upsampler(out), T5Upsampler)
    monkeypatch.undo()
    train_upsampler(ALL[4:8], out, cfg, log=lambda *_: None)  # a finished one replaces it
    assert (out / "model.safetensors").read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["up"]
    # a dir holding anything else is never replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a trained upsampler"):
        train_upsampler(ALL[:4], tmp_path / "other", cfg, log=lambda *_: None)


def test_a_dir_that_is_no_upsampler_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from spacetime.cli import app
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a trained T5 upsampler"):
        load_upsampler(tmp_path / "empty")
    # what an interrupted training of older code left: the T5's config and weights only
    cfg = UpsamplerConfig(d_model=16, d_ff=32, num_layers=1, num_heads=2)
    from captioner.upsample import _t5
    _t5(cfg, 10).save_pretrained(tmp_path / "partial")
    with pytest.raises(ValueError, match="unfinished T5 upsampler"):
        load_upsampler(tmp_path / "partial")
    r = CliRunner().invoke(app, ["upsample", "a red cube", "--upsampler", str(tmp_path / "partial")])
    assert r.exit_code == 2 and "unfinished" in r.output and "Traceback" not in r.output, r.output


def test_upsample_cli_refuses_an_upsampler_or_dataset_it_cannot_use(tmp_path):
    """`spacetime upsample --upsampler <missing dir>` printed the prompt unchanged with exit 0 (a typo
    looked like an upsampler that changed nothing); --dataset without --upsampler was ignored.
    `spacetime sample` refuses both; without --upsampler the prompt comes back with one warning."""
    from typer.testing import CliRunner

    from spacetime.cli import app
    for args, said in [(["--upsampler", str(tmp_path / "missing")], "not found"),
                       (["--dataset", str(tmp_path)], "give --upsampler too")]:
        r = CliRunner().invoke(app, ["upsample", "a red cube", *args])
        assert r.exit_code == 2 and said in r.output and r.exception.__class__ is SystemExit, (args, r.output)
    r = CliRunner().invoke(app, ["upsample", "a red cube"])
    assert r.exit_code == 0 and r.output.count("warning") == 1 and "None" not in r.output, r.output
    assert r.stdout.strip().endswith("a red cube")


def test_llm_pad_token_id_zero_is_used_as_pad():
    class Enc(dict):
        def to(self, device):
            return self

    class Tok:
        pad_token_id, eos_token_id, chat_template = 0, 2, None

        def __call__(self, text, return_tensors, **kw):
            return Enc(input_ids=torch.tensor([[5, 6]]))

        def decode(self, ids, skip_special_tokens):
            return "a dense caption"

    class Model:
        def generate(self, **kw):
            self.pad = kw["pad_token_id"]
            return torch.tensor([[5, 6, 7]])

    llm = LLMUpsampler.__new__(LLMUpsampler)  # no weights needed to see which pad id reaches generate()
    llm.tok, llm.model, llm.device, llm.examples, llm.max_new_tokens, llm.sample = Tok(), Model(), "cpu", [], 4, False
    assert llm("a red cube") == "a dense caption" and llm.model.pad == 0


def test_blank_captions_never_make_the_upsampler_answer_nothing(tmp_path):
    """Whitespace-only captions were training pairs (' ' is truthy): the T5 learned to answer nothing
    and upsample() returned '' for the prompt, silently. They count as missing now, and an empty
    answer keeps the user's prompt, as the LLM backend's does."""
    rows = [{"clip_id": str(i), "status": "kept", "caption_short": s, "caption_dense": "  " if i % 2 else d,
             "caption_teacher_short": None, "caption_teacher_dense": "\n" if i % 4 == 1 else None}
            for i, (s, d) in enumerate(ALL[:8])]
    write_deltalake(str(tmp_path / "ds" / "clips"), pa.Table.from_pylist(rows), mode="overwrite")
    assert caption_pairs(tmp_path / "ds") == sorted(ALL[:8:2])
    cfg = UpsamplerConfig(d_model=32, d_ff=64, num_layers=1, num_heads=2, max_len=40, steps=30, batch_size=8,
                          lr=3e-3, warmup_steps=5, seed=0)
    blank = train_upsampler([(s, " ") for s, _ in ALL[:8]], tmp_path / "t5", cfg, log=lambda *_: None)
    assert upsample("  a red square moving left ", load_upsampler(blank)) == "a red square moving left"


def test_llm_reply_lead_ins_labels_quotes_and_reasoning_are_not_the_caption():
    """The caption was the reply's first paragraph as it came: "Here is the caption:" (what small chat
    models write first, despite the system prompt) became the upsampled prompt, and a reasoning
    model's <think> block, a "Caption:" label or enclosing quotes went into it."""
    class Tok:
        pad_token_id, eos_token_id, chat_template = 0, 2, None

        def __call__(self, text, return_tensors, **kw):
            return type("Enc", (dict,), {"to": lambda self, device: self})(input_ids=torch.tensor([[5]]))

        def decode(self, ids, skip_special_tokens):
            return self.reply

    class Model:
        def generate(self, **kw):
            return torch.tensor([[5, 6]])

    llm = LLMUpsampler.__new__(LLMUpsampler)
    llm.tok, llm.model, llm.device, llm.examples, llm.max_new_tokens, llm.sample = Tok(), Model(), "cpu", [], 4, False
    dense = "A red cube spins slowly on a white table. The camera is static."
    for reply in [f"Here is the rewritten caption:\n\n\"{dense}\"\n\nLet me know if you want changes.",
                  f"<think>\nThe user wants a cube.\n\nAdd a table.\n</think>\n\n{dense}",
                  f"Caption: {dense}", f"**Dense caption:** “{dense}”", f"  {dense}\n\nNote: 80 words."]:
        llm.tok.reply = reply
        assert llm("a red cube") == dense, reply
    llm.tok.reply = "\n\n"
    assert llm("a red cube") == "a red cube"


def test_a_chat_templated_prompt_starts_with_one_bos():
    """apply_chat_template writes the BOS into its text; tokenizing that text added the tokenizer's
    own BOS again, so a chat LLM read every conversation as <bos><bos>..., out of its training."""
    from tokenizers.processors import TemplateProcessing
    wl = build_tokenizer(["a red cube you are part of a team"] + [t for p in ALL[:2] for t in p])
    wl.add_special_tokens(["<bos>"])
    bos = wl.token_to_id("<bos>")
    wl.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<bos>", pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"

    class Model:
        def generate(self, input_ids, **kw):
            self.ids = input_ids[0].tolist()
            return torch.cat([input_ids, torch.tensor([[2]])], 1)

    llm = LLMUpsampler.__new__(LLMUpsampler)
    llm.tok, llm.model, llm.device, llm.examples, llm.max_new_tokens, llm.sample = tok, Model(), "cpu", [], 4, False
    llm("a red cube")
    assert llm.model.ids[0] == bos and llm.model.ids.count(bos) == 1, tok.convert_ids_to_tokens(llm.model.ids)
