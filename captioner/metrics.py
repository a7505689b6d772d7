"""Caption metrics: BLEU-4, CIDEr, ROUGE-L, CLIPScore and an attribute check.

BLEU/CIDEr/ROUGE-L are pycocoevalcap's scorers fed text we tokenize ourselves (lower-cased,
words and punctuation split, punctuation dropped), because its PTBTokenizer, METEOR and SPICE
need Java. CLIPScore (Hessel et al. 2021) is 100 * 2.5 * max(cos(image, text), 0) with an
open_clip model, the video side being the mean of its frames' image embeddings. The attribute
check asks whether the words that matter (subject, colour, camera motion) are there and right.
"""
import json
import re
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge


def tokenize(text: str) -> str:
    """Lower-case, keep word tokens only, single-space joined (what the coco scorers expect)."""
    return " ".join(re.findall(r"\w+", (text or "").lower()))


def caption_scores(refs: dict, hyps: dict) -> dict:
    """refs {id: [reference captions]}, hyps {id: caption} -> {"BLEU-4", "CIDEr", "ROUGE-L"}.

    Only ids present in both are scored. CIDEr's IDF comes from the references themselves, so
    compare CIDEr only across systems scored on the same reference set.
    """
    ids = sorted(set(refs) & set(hyps), key=str)
    if not ids:
        raise ValueError("no captions to score: refs and hyps share no ids")
    gts = {i: [tokenize(r) for r in refs[i]] for i in ids}
    res = {i: [tokenize(hyps[i]) or "<empty>"] for i in ids}  # the scorers reject empty strings
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(cider), "ROUGE-L": float(rouge)}


def _mentions(text: str, synonyms: dict) -> dict:
    """{attribute: canonical values named in `text`} by longest match first: a phrase inside a
    longer matched phrase does not count, so the "orange" of the subject "an astronaut in an
    orange flight suit" is not read as a colour claim."""
    found = []  # (length, start, end, attribute, canonical value)
    for a, groups in synonyms.items():
        for group in groups:
            for word in group:
                phrase = tokenize(word)
                for m in re.finditer(r"\b" + re.escape(phrase) + r"\b", text) if phrase else ():
                    found.append((m.end() - m.start(), m.start(), m.end(), a, group[0]))
    taken, named = [], {a: set() for a in synonyms}
    for n, start, end, a, value in sorted(found, key=lambda f: (-f[0], f[1])):
        if all(end <= s or start >= e for s, e in taken):
            taken.append((start, end))
            named[a].add(value)
    return named


def attribute_accuracy(hyps: list[str], truths: list[dict], vocab: dict | None = None) -> dict:
    """Per attribute, the fraction of captions that name the true value and no rival value.

    truths[i] = {"colour": "red", "subject": "square", "camera": "pans left", ...} for hyps[i]
    (an attribute whose true value is None is skipped for that caption). A true value may be a
    tuple, most prominent first ({"colour": ("gray", "white")}): the caption must name the first
    and may name the others, but nothing outside the tuple (a minor colour left out is fine, a
    colour that is not there is wrong).
    vocab {attribute: [all values]} lists the rivals; by default the distinct true values seen.
    Values may be phrases; a value may also be a list of synonyms, the first being canonical
    (["grey", "gray"]). Phrases are matched longest first across all attributes (_mentions).
    Returns {attribute: accuracy, ..., "all": fraction of captions right on every attribute}.
    """
    if len(hyps) != len(truths):
        raise ValueError(f"{len(hyps)} captions but {len(truths)} ground truths")
    attrs = sorted({a for t in truths for a, v in t.items() if v is not None})
    vocab = dict(vocab or {})
    for a in attrs:
        vocab.setdefault(a, sorted({v for t in truths if t.get(a) is not None for v in _values(t[a])}))
    synonyms = {a: [v if isinstance(v, list) else [v] for v in vals] for a, vals in vocab.items()}
    right = {a: [] for a in attrs}
    all_right = []
    for hyp, truth in zip(hyps, truths):
        named = _mentions(tokenize(hyp), synonyms)
        ok_all = True
        for a in attrs:
            if truth.get(a) is None:
                continue
            true = [next((g[0] for g in synonyms[a] if v in g), v) for v in _values(truth[a])]
            ok = true[0] in named[a] and named[a] <= set(true)
            right[a].append(ok)
            ok_all &= ok
        all_right.append(ok_all)
    out = {a: float(np.mean(v)) if v else float("nan") for a, v in right.items()}
    out["all"] = float(np.mean(all_right)) if all_right else float("nan")
    return out


def _values(true) -> tuple:
    return tuple(true) if isinstance(true, (tuple, set, frozenset)) else (true,)


def load_clip(model_name: str = "ViT-B-32", pretrained: str | None = None):
    """An open_clip (model, preprocess, tokenizer). `pretrained` is a LOCAL weights path; None
    builds random weights from the config (only useful to test the plumbing)."""
    import open_clip
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"open_clip weights not found: {pretrained}")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def clip_score(videos: list[np.ndarray], captions: list[str], clip) -> float:
    """Mean CLIPScore of captions[i] for videos[i] ((T, H, W, 3) uint8 frames); clip from load_clip."""
    from PIL import Image
    model, preprocess, tokenizer = clip
    scores = []
    for frames, caption in zip(videos, captions):
        images = torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(f))) for f in frames])
        img = model.encode_image(images).float()
        img = torch.nn.functional.normalize(img, dim=-1).mean(0)
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([caption])).float(), dim=-1)[0]
        scores.append(100 * 2.5 * max(float(img @ txt), 0.0))
    return float(np.mean(scores))


def evaluate(hyps: dict, refs: dict, truths: dict | None = None, vocab: dict | None = None,
             videos: dict | None = None, clip=None, out_json=None, name: str = "captioner",
             info: dict | None = None) -> dict:
    """Score one system. hyps {id: caption}; refs {id: [refs]}; truths {id: attribute dict};
    videos {id: frames} + clip (load_clip) for CLIPScore; info: fields recorded beside the scores
    (what was scored). Prints a table, writes JSON if asked."""
    result = {"system": name, "n": len(set(refs) & set(hyps)), **(info or {}), **caption_scores(refs, hyps)}
    if truths:
        ids = [i for i in hyps if i in truths]
        acc = attribute_accuracy([hyps[i] for i in ids], [truths[i] for i in ids], vocab)
        result.update({f"attr_{k}": v for k, v in acc.items()})
    if videos is not None and clip is not None:
        ids = [i for i in hyps if i in videos]
        result["CLIPScore"] = clip_score([videos[i] for i in ids], [hyps[i] for i in ids], clip)
    print(format_table([result]))
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def format_table(results: list[dict]) -> str:
    """Rows = systems, columns = metrics (floats to 3 decimals)."""
    cols = list(dict.fromkeys(k for r in results for k in r))
    cells = [[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
