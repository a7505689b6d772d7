"""Diffusion Transformer over packed spacetime patches (after DiT models.py, with text cross-attention).

Read top to bottom: packed attention, 3D RoPE, timestep embedder, text embedder (with the learned
null embedding for classifier-free guidance), the adaLN-Zero block, the final layer, the model, and
the size presets.

Every sample of a batch lives in ONE packed token matrix (N, D) with cu_seqlens; linear layers run
on the whole matrix and only attention looks at sample boundaries. Attention never builds a dense
N x N mask (that computes all N^2 pairs): on CUDA it uses torch.nn.attention.varlen when present,
else flex_attention with a document mask, else a per-sample SDPA loop; on CPU the loop (flex has no
CPU backward). The choice is logged once.

Timesteps may be per sample (B,) or per token (N,), so conditioning frames can sit at t = 0.
Only torch + einops + safetensors at import.
"""
import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from generator.vae import load_state_strict, load_with_config, save_with_config

log = logging.getLogger(__name__)

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch
    varlen_attn = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None


#################################################################################
#                           Attention over packed sequences                     #
#################################################################################

_logged = set()


def choose_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """'varlen' | 'flex' | 'loop'. auto: varlen on CUDA in fp16/bf16, else flex on CUDA, else loop.
    Measured on an H100 in bf16 (12 samples, 25k tokens, fwd + bwd, time / varlen): flex 1.20, a padded
    batch with a key mask 5.74, the per-sample loop 9.39."""
    if requested == "auto":
        if device.type == "cuda" and varlen_attn is not None and dtype in (torch.float16, torch.bfloat16):
            requested = "varlen"
        elif device.type == "cuda" and flex_attention is not None:
            requested = "flex"
        else:
            requested = "loop"
    if requested not in _logged:
        _logged.add(requested)
        log.info("DiT attention backend: %s (device %s, dtype %s)", requested, device.type, dtype)
    return requested


class Seqs:
    """Sample boundaries of a packed query sequence and its key sequence (same for self-attention)."""

    def __init__(self, cu_q, cu_k, backend: str):
        self.cu_q, self.cu_k, self.backend = cu_q, cu_k, backend
        self.bounds_q, self.bounds_k = cu_q.tolist(), cu_k.tolist()
        lens_q = [b - a for a, b in zip(self.bounds_q[:-1], self.bounds_q[1:])]
        lens_k = [b - a for a, b in zip(self.bounds_k[:-1], self.bounds_k[1:])]
        self.max_q, self.max_k = max(lens_q), max(lens_k)
        self.block_mask = None
        if backend == "flex":
            n = torch.arange(len(lens_q), device=cu_q.device)
            doc_q = torch.repeat_interleave(n, torch.tensor(lens_q, device=cu_q.device))
            doc_k = torch.repeat_interleave(n, torch.tensor(lens_k, device=cu_q.device))
            self.block_mask = create_block_mask(lambda b, h, qi, ki: doc_q[qi] == doc_k[ki], None, None,
                                                self.bounds_q[-1], self.bounds_k[-1], device=cu_q.device)


_flex_compiled = None


def _compiled_flex():
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=True)
    return _flex_compiled


@torch.compiler.disable  # compile_blocks: the graph breaks here (Seqs holds host-side bounds)
def packed_attention(q, k, v, seqs: Seqs):
    """q (Nq, H, Dh), k/v (Nk, H, Dh); sample i attends only within its own slices -> (Nq, H, Dh)."""
    q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast the QK norms may hand back fp32
    if seqs.backend == "varlen":
        return varlen_attn(q, k, v, seqs.cu_q, seqs.cu_k, seqs.max_q, seqs.max_k)
    if seqs.backend == "flex":
        # eager flex materialises the full score matrix; compiled, it is a fused kernel (CUDA)
        flex = _compiled_flex() if q.is_cuda else flex_attention
        out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             block_mask=seqs.block_mask)
        return out[0].transpose(0, 1)
    outs = []
    for (a, b), (c, d) in zip(zip(seqs.bounds_q[:-1], seqs.bounds_q[1:]), zip(seqs.bounds_k[:-1], seqs.bounds_k[1:])):
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1))
        outs.append(o.transpose(0, 1))  # (L_i, H, Dh)
    return torch.cat(outs)


#################################################################################
#                                     3D RoPE                                   #
#################################################################################

def rope_axes(head_dim: int):
    """Split the head dim across (t, h, w): h and w get equal even shares, t the (even) rest."""
    d_hw = (head_dim // 3) // 2 * 2
    return (head_dim - 2 * d_hw, d_hw, d_hw)


def rope_3d(positions, head_dim: int, theta: float = 10000.0):
    """positions (N, 3) (t, h, w) -> (cos, sin), each (N, 1, head_dim/2)."""
    angles = []
    for axis, d in enumerate(rope_axes(head_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d)
        angles.append(positions[:, axis, None].float() * freqs)  # (N, d/2)
    ang = torch.cat(angles, -1)[:, None]  # (N, 1, Dh/2)
    return ang.cos(), ang.sin()


def sincos_3d(positions, dim: int):
    """positions (N, 3) (t, h, w) -> (N, dim) fixed sin-cos embedding, the dims split as in rope_axes
    (DiT's get_2d_sincos_pos_embed, over three axes and computed for any packed positions)."""
    parts = []
    for axis, d in enumerate(rope_axes(dim)):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, device=positions.device, dtype=torch.float32) / max(d // 2, 1))
        ang = positions[:, axis, None].float() * omega  # (N, d/2)
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, -1)


def apply_rope(x, rope):  # x (N, H, Dh)
    cos, sin = rope
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


#################################################################################
#               Embedding Layers for Timesteps and Text                         #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds flow times t in [0, 1] (scaled to [0, 1000]) into vectors."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * 1000 * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], -1)

    def forward(self, t):  # (M,) -> (M, D)
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class TextEmbedder(nn.Module):
    """Projects precomputed text token embeddings (L, D_text) to the model width. Samples whose text
    is dropped (classifier-free guidance) get a learned null embedding (one token) instead."""

    def __init__(self, text_dim, hidden_size):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden_size, hidden_size))
        self.null = nn.Parameter(torch.randn(1, text_dim) * 0.02)

    def forward(self, text, text_cu, drop=None):
        """text (L_total, D_text) packed with text_cu (B+1,); drop (B,) bool or None.
        Returns (tokens (L', D), cu (B+1,), pooled (B, D))."""
        if drop is not None and bool(drop.any()):
            b = text_cu.tolist()
            seqs = [self.null.to(text.dtype) if d else text[lo:hi] for d, lo, hi in zip(drop.tolist(), b[:-1], b[1:])]
            lens = torch.tensor([0] + [len(s) for s in seqs], device=text.device)
            text, text_cu = torch.cat(seqs), torch.cumsum(lens, 0).to(torch.int32)
        elif self.training:
            # keep `null` in the graph with a zero contribution: DDP requires every parameter to get a grad
            text = text + 0 * self.null.sum()
        h = self.proj(text)  # (L', D)
        lens = (text_cu[1:] - text_cu[:-1]).long()
        idx = torch.repeat_interleave(torch.arange(len(lens), device=h.device), lens)
        pooled = torch.zeros(len(lens), h.shape[1], device=h.device, dtype=h.dtype).index_add_(0, idx, h)
        return h, text_cu, pooled / lens[:, None].to(h.dtype)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention on packed tokens, QK-RMSNorm for stability; self or cross."""

    def __init__(self, dim, heads, cross=False):
        super().__init__()
        self.heads, self.head_dim, self.cross = heads, dim // heads, cross
        if cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6), nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, seqs: Seqs, rope=None, context=None):
        N, H, Dh = x.shape[0], self.heads, self.head_dim
        if self.cross:
            q = self.q(x).view(N, H, Dh)
            k, v = self.kv(context).view(-1, 2, H, Dh).unbind(1)
        else:
            q, k, v = self.qkv(x).view(N, 3, H, Dh).unbind(1)  # each (N, H, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.proj(packed_attention(q, k, v, seqs).reshape(N, H * Dh))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention + (unmodulated) text cross-attention + adaLN-Zero MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = Attention(hidden_size, num_heads, cross=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, c_index, rope, self_seqs, text, cross_seqs):
        # c (M, D) holds one condition row per sample (or per token); c_index (N,) picks each token's row
        mod = self.adaLN_modulation(c)[c_index]  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, -1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), self_seqs, rope=rope)
        x = x + self.cross_attn(self.norm_cross(x), cross_seqs, context=text)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, c_index):
        shift, scale = self.adaLN_modulation(c)[c_index].chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class DiTConfig:
    in_channels: int = 4          # latent channels
    patch: tuple = (1, 2, 2)      # (p_t, p_h, p_w) in latent units
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 512           # width of the precomputed text token embeddings
    rope_theta: float = 10000.0
    # Fixed sin-cos embedding of each token's absolute (t, h, w) added to its input (DiT's 2D one,
    # in 3D). RoPE alone is relative: attention is then translation-equivariant and a token cannot
    # tell the left edge from the middle, yet "moving right" starts on the left. No parameters.
    abs_pos: bool = True
    # Also add the mean text embedding to the timestep condition (adaLN). Off: text enters by
    # cross-attention only (PixArt-alpha's choice), so an unseen combination of words is never a
    # modulation vector the blocks have not seen. Measured on generator_learns (held-out colour x
    # direction pairs): 81% with it off vs 62% on.
    pooled_text: bool = False
    attention: str = "auto"       # auto | loop | flex | varlen
    grad_checkpointing: bool = False

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch[0] * self.patch[1] * self.patch[2]


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.patch_dim, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = TextEmbedder(cfg.text_dim, D)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_dim)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: modulation and output layers start at zero, so each block starts as the identity
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def forward(self, x, t, positions, cu_seqlens, text, text_cu, drop_text=None):
        """
        x: (N, patch_dim) packed noisy latent tokens; cu_seqlens (B+1,) int32 sample boundaries
        t: flow time in [0, 1], (B,) per sample or (N,) per token
        positions: (N, 3) (t, h, w) patch-grid positions for RoPE
        text: (L_total, text_dim) packed text token embeddings with text_cu (B+1,)
        drop_text: (B,) bool, samples whose text is replaced by the null embedding (CFG)
        returns: (N, patch_dim) predicted velocity
        """
        B, N = len(cu_seqlens) - 1, x.shape[0]
        sample_index = torch.repeat_interleave(torch.arange(B, device=x.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        h = self.x_embedder(x)  # (N, D)
        if self.cfg.abs_pos:
            h = h + sincos_3d(positions, h.shape[1]).to(h.dtype)
        y, y_cu, pooled = self.y_embedder(text, text_cu, drop_text)  # (L', D), (B+1,), (B, D)
        if not self.cfg.pooled_text:
            pooled = torch.zeros_like(pooled)
        if t.shape[0] == B and B != N:  # per-sample timesteps: one condition row per sample
            c, c_index = self.t_embedder(t) + pooled, sample_index  # (B, D)
        else:  # per-token timesteps: one condition row per distinct (sample, t) pair, not per token,
            # so the blocks' adaLN linears (12 D^2 FLOPs a row) run on ~2B rows when frames are held clean
            pairs, c_index = torch.unique(torch.stack([sample_index.double(), t.double()]), dim=1, return_inverse=True)
            c = self.t_embedder(pairs[1].to(t.dtype)) + pooled[pairs[0].long()]  # (K, D)
        backend = choose_backend(x.device, h.dtype if not torch.is_autocast_enabled(x.device.type)
                                 else torch.get_autocast_dtype(x.device.type), self.cfg.attention)
        self_seqs = Seqs(cu_seqlens, cu_seqlens, backend)
        cross_seqs = Seqs(cu_seqlens, y_cu, backend)
        rope = rope_3d(positions, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, c_index, rope, self_seqs, y, cross_seqs, use_reentrant=False)
            else:
                h = block(h, c, c_index, rope, self_seqs, y, cross_seqs)
        return self.final_layer(h, c, c_index)  # (N, patch_dim)

    def flops_per_token(self, seqlens=None, text_len: int = 0) -> float:
        """Forward matmul FLOPs per image token (2 per multiply-add); attention uses the mean of L_i^2/L."""
        D, d = self.cfg.hidden_size, self.cfg.depth
        mlp = int(D * self.cfg.mlp_ratio)
        per_block = 2 * (3 * D * D + D * D + D * D + D * D + 2 * D * mlp)  # qkv, proj, cross q, cross proj, mlp
        attn = 0.0
        if seqlens is not None:
            s = torch.as_tensor(seqlens, dtype=torch.float64)
            attn = float(2 * 2 * D * (s * s).sum() / s.sum())  # QK^T and AV
        return d * (per_block + attn + 2 * 2 * D * text_len) + 2 * 2 * D * self.cfg.patch_dim  # + embed, final


def compile_blocks(model: DiT) -> DiT:
    """torch.compile each block in place (state-dict keys unchanged), with dynamic shapes since the
    packed token count changes every batch. The graph breaks at packed_attention (its bounds live on
    the host), so what compiles is everything around it: adaLN gather and modulation, the norms, QK
    RMSNorm + RoPE, GELU and the gated residuals, fused with each other instead of one memory pass
    each. The blocks share one code object, so they share their graphs: compile time does not grow
    with depth. The final layer compiles too: its eager adaLN gather's backward (an index_put over
    every token) alone was 2% of an H100 step. The first steps pay for the compile."""
    for block in model.blocks:
        block.compile(dynamic=True)
    model.final_layer.compile(dynamic=True)
    return model


def save_dit(model: DiT, path: str):
    save_with_config(model, path)


def load_dit(path: str, cfg: DiTConfig | None = None, device="cpu") -> DiT:
    """Build a DiT from the config stored in `path` (or `cfg`) and load its weights strictly."""
    return load_with_config(path, DiT, cfg or (lambda d: DiTConfig(**{**d, "patch": tuple(d["patch"])})),
                            device, "DiT")


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

def DiT_XL(**kw): return DiT(replace(DiTConfig(hidden_size=1152, depth=28, num_heads=16), **kw))
def DiT_L(**kw): return DiT(replace(DiTConfig(hidden_size=1024, depth=24, num_heads=16), **kw))
def DiT_B(**kw): return DiT(replace(DiTConfig(hidden_size=768, depth=12, num_heads=12), **kw))
def DiT_S(**kw): return DiT(replace(DiTConfig(hidden_size=384, depth=12, num_heads=6), **kw))
def DiT_XS(**kw): return DiT(replace(DiTConfig(hidden_size=192, depth=6, num_heads=3), **kw))   # shapes demo
def DiT_T(**kw): return DiT(replace(DiTConfig(hidden_size=64, depth=2, num_heads=2), **kw))     # unit tests


DiT_models = {"DiT-XL": DiT_XL, "DiT-L": DiT_L, "DiT-B": DiT_B, "DiT-S": DiT_S, "DiT-XS": DiT_XS, "DiT-T": DiT_T}
