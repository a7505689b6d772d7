"""Autoregressive decoding for the captioner: greedy, top-p sampling and beam search, batched,
with the decoder's KV cache (self- and cross-attention) so each step feeds one token.

All three take the conditioning tokens from `VideoCaptioner.encode_video` and a style token
per clip, and return token-id lists without the style token, ending before <eos>.
"""
import torch

from captioner.model import EOS, PAD, SPECIAL_TOKENS

EOS_ID, PAD_ID = SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(PAD)
NEVER = [i for i, t in enumerate(SPECIAL_TOKENS) if t != EOS]  # pad, unk and style tokens


def _next_logits(model, ids, cond, cache):
    """Logits (B, V) for the token after `ids`, with tokens a caption never emits masked out."""
    logits, cache = model.step(ids, cond, cache)
    logits = logits[:, -1].float()
    logits[:, NEVER] = float("-inf")
    return logits, cache


def _check_len(model, max_len: int):
    # past the decoder's learned positions the text position table would be indexed out of range
    if not 1 <= max_len <= model.cfg.max_text_len:
        raise ValueError(f"max_len must be in 1..{model.cfg.max_text_len} (the model's text positions, "
                         f"style token included), got {max_len}")


def _strip(seq) -> list[int]:
    out = []
    for t in seq:
        if t == EOS_ID:
            break
        out.append(int(t))
    return out


@torch.no_grad()
def greedy(model, cond: torch.Tensor, style_ids: torch.Tensor, max_len: int = 40) -> list[list[int]]:
    """cond (B, N, D), style_ids (B,) -> B token lists; argmax at each step."""
    return _sample_loop(model, cond, style_ids, max_len, pick=lambda logits: logits.argmax(-1))


@torch.no_grad()
def top_p(model, cond, style_ids, max_len: int = 40, p: float = 0.9, temperature: float = 1.0,
          seed: int = 0) -> list[list[int]]:
    """Nucleus sampling: draw from the smallest set of tokens whose probability sums to >= p.

    Seeded with its own torch.Generator, so the same seed gives the same captions and the
    global RNG is untouched.
    """
    if not 0 < p <= 1 or temperature <= 0:
        raise ValueError(f"need 0 < p <= 1 and temperature > 0, got p={p}, temperature={temperature}")
    gen = torch.Generator(device=cond.device).manual_seed(seed)

    def pick(logits):
        probs = torch.softmax(logits / temperature, -1)
        sorted_p, order = probs.sort(-1, descending=True)
        # keep a token if the mass before it is < p (so the top token is always kept)
        keep = (sorted_p.cumsum(-1) - sorted_p) < p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
        return order.gather(-1, choice).squeeze(-1)

    return _sample_loop(model, cond, style_ids, max_len, pick)


def _sample_loop(model, cond, style_ids, max_len, pick):
    _check_len(model, max_len)
    B = cond.shape[0]
    ids = style_ids.view(B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=cond.device)
    out, cache = [], None
    for _ in range(max_len - 1):  # the style token is one of the max_len positions
        logits, cache = _next_logits(model, ids, cond, cache)
        nxt = pick(logits).masked_fill(done, EOS_ID)
        out.append(nxt)
        done |= nxt == EOS_ID
        if done.all():
            break
        ids = nxt.view(B, 1)
    seqs = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    return [_strip(s) for s in seqs]


@torch.no_grad()
def beam_search(model, cond, style_ids, max_len: int = 40, num_beams: int = 4,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Keep the num_beams best partial captions per clip by summed log-probability; return the
    best finished one, scored by logp / length**length_penalty (or the best unfinished one, so
    scored, when that beats every finished one or none finished). Deterministic."""
    _check_len(model, max_len)
    B, K = cond.shape[0], num_beams
    cond = cond.repeat_interleave(K, 0)                                  # (B*K, N, D)
    ids = style_ids.repeat_interleave(K).view(B * K, 1)
    scores = torch.full((B, K), float("-inf"), device=cond.device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    done = torch.zeros(B * K, dtype=torch.bool, device=cond.device)
    lengths = torch.zeros(B * K, device=cond.device)
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=cond.device)
    # the best caption that ended so far, per clip: K unfinished beams can outscore an ended one on
    # the summed logp and push it out of the beam, though it wins on the length-normalised score
    best_done = torch.full((B,), float("-inf"), device=cond.device)
    best_seq = [[] for _ in range(B)]
    cache = None
    for _ in range(max_len - 1):
        logits, cache = _next_logits(model, ids, cond, cache)
        logp = torch.log_softmax(logits, -1)                             # (B*K, V)
        # a finished beam may only extend with <eos> at no cost, so it keeps its score
        logp[done] = float("-inf")
        logp[done, EOS_ID] = 0.0
        V = logp.shape[-1]
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        wide, wflat = cand.topk(2 * K, -1)                               # (B, 2K), best first
        # as in HF's beam search, a live beam's <eos> among the best 2K candidates ends a caption,
        # whether or not it makes the top K
        src = wflat // V + torch.arange(B, device=cond.device).view(B, 1) * K
        ended = (wflat % V == EOS_ID) & ~done[src]
        top, arg = (wide / (lengths[src] + 1) ** length_penalty).masked_fill(~ended, float("-inf")).max(-1)
        for b in torch.nonzero(top > best_done).flatten().tolist():
            best_done[b], best_seq[b] = top[b], seqs[src[b, arg[b]]].tolist()
        scores, flat = wide[:, :K].contiguous(), wflat[:, :K].contiguous()  # (B, K)
        beam = (flat // V + torch.arange(B, device=cond.device).view(B, 1) * K).view(-1)
        tok = (flat % V).view(-1)
        seqs = torch.cat([seqs[beam], tok.view(-1, 1)], 1)
        lengths = lengths[beam] + (~done[beam]).float()
        done = done[beam] | (tok == EOS_ID)
        cache.reorder_cache(beam)
        if done.all():
            break
        ids = tok.view(-1, 1)
    normed = scores / lengths.view(B, K).clamp(min=1) ** length_penalty
    top, arg = normed.max(-1)
    best = arg + torch.arange(B, device=cond.device) * K
    return [_strip(best_seq[b] if best_done[b] >= top[b] else s) for b, s in enumerate(seqs[best].tolist())]


def generate(model, cond, style_ids, method: str = "greedy", max_len: int = 40, num_beams: int = 4,
             p: float = 0.9, temperature: float = 1.0, seed: int = 0) -> list[list[int]]:
    """Dispatch to greedy / beam / top_p by name (the name comes from a CLI flag)."""
    if method == "greedy":
        return greedy(model, cond, style_ids, max_len)
    if method == "beam":
        return beam_search(model, cond, style_ids, max_len, num_beams)
    if method == "top_p":
        return top_p(model, cond, style_ids, max_len, p, temperature, seed)
    raise ValueError(f"unknown decoding method {method!r}: greedy, beam or top_p")


@torch.no_grad()
def describe(model, tok, frames, style: str = "short", method: str = "greedy", **kw) -> list[str]:
    """frames (B, T, H, W, 3) uint8 tensor or array -> B caption strings in the given style."""
    from captioner.model import STYLES, decode_caption
    frames = torch.as_tensor(frames, device=next(model.parameters()).device)
    _, cond = model.encode_video(frames)
    style_ids = torch.full((frames.shape[0],), tok.token_to_id(STYLES[style]), device=frames.device)
    kw.setdefault("max_len", model.cfg.max_text_len)
    return [decode_caption(tok, ids) for ids in generate(model, cond, style_ids, method, **kw)]
