"""Prompt upsampling: turn a user's short prompt into a dense caption like those the generator
was trained on (the DALL-E 3 / Sora recipe), with one of two local backends:

  LLMUpsampler  a local instruction-tuned causal LM dir (transformers, local_files_only=True),
                prompted with a system prompt and few-shot (short -> dense) pairs from the dataset.
  T5Upsampler   a small T5 built from a config and trained here on the table's
                (caption_short -> caption_dense) pairs (`train_upsampler`), word-level tokenizer.

`upsample(prompt, upsampler)` validates the prompt and, with no backend, returns it unchanged
with a warning. Both backends are deterministic for a given seed.
"""
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from captioner.data import read_clips
from captioner.model import EOS, PAD, SPECIAL_TOKENS, build_tokenizer, decode_caption

MAX_PROMPT_CHARS = 1000

SYSTEM_PROMPT = (
    "You are part of a team that makes videos with a text-to-video model. The model was trained on "
    "long, literal, detailed captions, so short prompts produce poor videos. Rewrite the user's prompt "
    "as one such caption: keep every detail the user gave, never contradict it, and add concrete "
    "visual detail: the subject and its appearance, colours, the setting and background, lighting, "
    "how things move, and what the camera does. Describe only what is visible, in plain present tense, "
    "in one paragraph of at most 80 words. Reply with the caption only.")


def check_prompt(prompt: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The stripped prompt, or ValueError if it is empty or longer than max_chars characters."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt is empty: describe the video you want")
    if len(prompt) > max_chars:
        raise ValueError(f"prompt is {len(prompt)} characters, over the {max_chars}-character limit")
    return prompt.strip()


def upsample(prompt: str, upsampler=None, seed: int = 0) -> str:
    """Upsampled prompt; with upsampler None, or a backend that returns nothing, the (validated) prompt
    itself, and a warning."""
    prompt = check_prompt(prompt)
    if upsampler is None:
        warnings.warn("no prompt upsampler available: using the prompt as written", stacklevel=2)
        return prompt
    text = upsampler(prompt, seed=seed).strip()
    if not text:  # a T5 that knows none of the words can answer <eos> at once: an empty prompt was sampled
        warnings.warn(f"the prompt upsampler returned nothing for {prompt!r}: using the prompt as written",
                      stacklevel=2)
        return prompt
    return text


def caption_pairs(dataset_root, version: int | None = None) -> list[tuple[str, str]]:
    """(short, dense) caption pairs of kept clips: ours where present, else the teacher's."""
    table, _ = read_clips(dataset_root, version)
    table = table.filter(pc.equal(table["status"], "kept"))
    pairs = []
    for r in table.select(["caption_short", "caption_dense", "caption_teacher_short",
                           "caption_teacher_dense"]).to_pylist():
        # a blank caption (whitespace only) counts as none: trained on, it teaches the T5 to answer nothing
        short = (r["caption_short"] or "").strip() or (r["caption_teacher_short"] or "").strip()
        dense = (r["caption_dense"] or "").strip() or (r["caption_teacher_dense"] or "").strip()
        if short and dense:
            pairs.append((short, dense))
    return sorted(set(pairs))


def few_shot_examples(dataset_root, k: int = 3, seed: int = 0, version: int | None = None):
    """k (short, dense) pairs drawn with a seeded RNG from the dataset, for the LLM prompt."""
    pairs = caption_pairs(dataset_root, version)
    return random.Random(seed).sample(pairs, min(k, len(pairs)))


class LLMUpsampler:
    """A local instruction-tuned LLM dir (config + weights + tokenizer) as the upsampler."""

    def __init__(self, model_dir, examples=(), max_new_tokens: int = 160, sample: bool = False, device=None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(self.device).eval()
        self.examples, self.max_new_tokens, self.sample = list(examples), max_new_tokens, sample

    def messages(self, prompt: str) -> list[dict]:
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
        for short, dense in self.examples:
            msgs += [{"role": "user", "content": short}, {"role": "assistant", "content": dense}]
        return msgs + [{"role": "user", "content": prompt}]

    def __call__(self, prompt: str, seed: int = 0) -> str:
        msgs = self.messages(check_prompt(prompt))
        templated = bool(getattr(self.tok, "chat_template", None))
        if templated:
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # a base model: the same conversation as plain text
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs) + "\n\nAssistant:"
        # a chat template writes the BOS itself: tokenizing its text with special tokens gave two
        enc = self.tok(text, return_tensors="pt", add_special_tokens=not templated).to(self.device)
        torch.manual_seed(seed)  # sampling (if enabled) is then reproducible
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=self.sample,
                                      top_p=0.9 if self.sample else None,
                                      pad_token_id=self.tok.eos_token_id if self.tok.pad_token_id is None
                                      else self.tok.pad_token_id)  # id 0 is a valid pad
        reply = self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return caption_of_reply(reply) or prompt


def caption_of_reply(reply: str) -> str:
    """The caption in an LLM's reply: its first paragraph, past a reasoning block ("<think>...</think>")
    and a lead-in paragraph ("Here is the caption:"), without a "Caption:" label or enclosing quotes.
    Small models add these despite the system prompt, and the lead-in became the prompt."""
    reply = re.sub(r"(?s)^.*</think>", "", reply)
    paragraphs = [t.strip() for t in reply.split("\n\n") if t.strip()]
    while len(paragraphs) > 1 and paragraphs[0].endswith(":"):
        paragraphs.pop(0)
    text = re.sub(r"(?i)^(?:\*\*)?(?:[a-z]+ )?(?:caption|prompt)(?:\*\*)?:(?:\*\*)?\s*", "",
                  paragraphs[0] if paragraphs else "")
    return (text[1:-1] if len(text) > 1 and text[0] + text[-1] in ('""', "''", "“”") else text).strip()


# ---------------------------------------------------------------- the trained T5 backend

@dataclass
class UpsamplerConfig:
    d_model: int = 256
    d_ff: int = 512
    num_layers: int = 3
    num_heads: int = 4
    max_len: int = 96        # tokens per side
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    seed: int = 0


def _t5(cfg: UpsamplerConfig, vocab_size: int) -> T5ForConditionalGeneration:
    pad, eos = SPECIAL_TOKENS.index(PAD), SPECIAL_TOKENS.index(EOS)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.num_heads, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, dropout_rate=0.0, pad_token_id=pad,
        eos_token_id=eos, decoder_start_token_id=pad, tie_word_embeddings=True))


def _encode(tok: Tokenizer, texts, max_len: int) -> torch.Tensor:
    eos = SPECIAL_TOKENS.index(EOS)
    rows = [tok.encode(t).ids[: max_len - 1] + [eos] for t in texts]
    out = torch.full((len(rows), max(map(len, rows))), SPECIAL_TOKENS.index(PAD), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def train_upsampler(pairs, out_dir, cfg: UpsamplerConfig | None = None, log=print) -> Path:
    """Train a T5 on (short, dense) pairs (a list, or a dataset root to read them from);
    write config.json + model.safetensors + tokenizer.json + upsampler.json to out_dir.

    out_dir appears whole or not at all: it is written as a sibling `<out_dir>.tmp` and renamed into
    place, replacing an earlier upsampler there (never a dir holding anything else)."""
    cfg = cfg or UpsamplerConfig()
    out = Path(out_dir)
    if out.exists() and not (out / "upsampler.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a trained upsampler: pick another output dir")
    if not isinstance(pairs, list):
        pairs = caption_pairs(pairs)
    if not pairs:
        raise ValueError("no (short, dense) caption pairs to train the upsampler on")
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer([t for p in pairs for t in p])
    model = _t5(cfg, tok.get_vocab_size()).train()
    src, tgt = _encode(tok, [p[0] for p in pairs], cfg.max_len), _encode(tok, [p[1] for p in pairs], cfg.max_len)
    pad = SPECIAL_TOKENS.index(PAD)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        idx = torch.randint(len(pairs), (cfg.batch_size,), generator=gen)
        x, y = src[idx], tgt[idx]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        logits = model(input_ids=x, attention_mask=x != pad, labels=y.masked_fill(y == pad, -100)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.masked_fill(y == pad, -100).flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log(f"upsampler: step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "upsampler.json").write_text(json.dumps({"backend": "t5", **asdict(cfg), "pairs": len(pairs)}))
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


class T5Upsampler:
    """The trained T5 (train_upsampler's out_dir). Beam search: deterministic, seed unused."""

    def __init__(self, ckpt_dir, num_beams: int = 3):
        d = Path(ckpt_dir)
        self.cfg = UpsamplerConfig(**{k: v for k, v in json.loads((d / "upsampler.json").read_text()).items()
                                      if k in UpsamplerConfig.__dataclass_fields__})
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.model = T5ForConditionalGeneration.from_pretrained(d, local_files_only=True).eval()
        self.num_beams = num_beams

    def __call__(self, prompt: str, seed: int = 0) -> str:
        x = _encode(self.tok, [check_prompt(prompt)], self.cfg.max_len)
        with torch.no_grad():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), num_beams=self.num_beams,
                                      do_sample=False, max_new_tokens=self.cfg.max_len)
        return decode_caption(self.tok, out[0, 1:].tolist())  # drop the decoder start token (upsample() keeps
        # the prompt, with a warning, when this is empty)


def load_upsampler(path, examples=()):
    """A T5Upsampler (dir with upsampler.json), an LLMUpsampler (any other model dir), or None
    (with a warning) when path is None or missing. ValueError for a dir that is neither."""
    if path is None or not Path(path).is_dir():
        warnings.warn(f"prompt upsampler not found at {path}: prompts are used as written", stacklevel=2)
        return None
    d = Path(path)
    if (d / "upsampler.json").is_file():
        return T5Upsampler(d)
    try:
        model_type = json.loads((d / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise ValueError(f"{d} is not a prompt upsampler: neither a trained T5 upsampler (upsampler.json) "
                         "nor a local LLM dir (config.json)") from None
    if model_type == "t5":  # what an upsampler training that did not finish (older code) left behind
        raise ValueError(f"{d} holds an unfinished T5 upsampler (no upsampler.json): run train-upsampler again")
    try:
        return LLMUpsampler(d, examples)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {d} as a local LLM upsampler: {e}") from e
