"""Rectified flow (after minRF): objective and samplers, model-agnostic.

z_t = (1 - t) x + t noise, t in [0, 1] (t = 0 data, t = 1 noise); the model predicts the velocity
v = noise - x and is trained with MSE. t is drawn logit-normal, then shifted towards noise for
samples with more tokens (SD3): t' = s t / (1 + (s - 1) t), s = sqrt(tokens / base_tokens) —
bigger samples keep more signal at a given t, so they need more noise to be equally hard.

Everything works on packed tokens x (N, D) with cu_seqlens (B + 1,). The model is any callable
model(z (N, D), t) -> v (N, D), where t is (B,) per sample or (N,) per token (per token when some
tokens are held clean, e.g. conditioning frames at t = 0).
"""

import torch


def shift_t(t, s):
    """Resolution shift of times t (any shape) by factor s (broadcastable)."""
    return s * t / (1 + (s - 1) * t)


def _sample_index(cu_seqlens):
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lens), device=cu_seqlens.device), lens), lens


class RectifiedFlow:
    def __init__(self, base_tokens: int = 256, logit_mean: float = 0.0, logit_std: float = 1.0,
                 resolution_shift: bool = True):
        self.base_tokens, self.logit_mean, self.logit_std = base_tokens, logit_mean, logit_std
        self.resolution_shift = resolution_shift

    def shift(self, tokens):
        """Per-sample shift factor s for samples of `tokens` tokens ((B,) tensor)."""
        if not self.resolution_shift:
            return torch.ones_like(tokens, dtype=torch.float32)
        return torch.sqrt(tokens.float() / self.base_tokens)

    def sample_t(self, tokens, generator=None):
        """Training times (B,) for samples of `tokens` tokens each: logit-normal, then shifted."""
        u = torch.randn(tokens.shape, generator=generator, device=tokens.device)
        t = torch.sigmoid(self.logit_mean + self.logit_std * u)
        return shift_t(t, self.shift(tokens))

    def loss(self, model, x, cu_seqlens, generator=None, clean=None):
        """Mean MSE between predicted and true velocity over the noised tokens.

        x: (N, D) clean packed tokens; clean: optional (N,) bool of tokens held at t = 0 (given as
        conditioning, excluded from the loss). Noise and t come from `generator` (exact resume)."""
        index, lens = _sample_index(cu_seqlens)
        t = self.sample_t(lens, generator).to(x.dtype)  # (B,)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t_tok = t[index]  # (N,)
        if clean is not None:
            t_tok = torch.where(clean, torch.zeros_like(t_tok), t_tok)
        z = (1 - t_tok)[:, None] * x + t_tok[:, None] * noise
        v = model(z, t if clean is None else t_tok)
        err = (v.float() - (noise - x).float()).pow(2).mean(-1)  # (N,)
        if clean is not None:
            return err[~clean].mean()
        return err.mean()

    def timesteps(self, steps: int, cu_seqlens):
        """(B, steps + 1) per-sample time grids from 1 to 0, each with its resolution shift."""
        _, lens = _sample_index(cu_seqlens)
        u = torch.linspace(1, 0, steps + 1, device=cu_seqlens.device)
        return shift_t(u[None], self.shift(lens)[:, None])

    @torch.no_grad()
    def sample(self, model, noise, cu_seqlens, steps: int = 50, method: str = "euler", cfg_scale: float = 1.0,
               uncond=None, clean=None, x_clean=None):
        """Integrate from noise (t = 1) to data (t = 0).

        model / uncond: callables (z, t) -> v, conditional and unconditional; with cfg_scale != 1
        the velocity is uncond + cfg_scale * (cond - uncond). method: 'euler' or 'heun' (2nd order,
        2 evaluations per step but the last). clean / x_clean: (N,) bool and (N, D) tokens held
        fixed at t = 0 throughout (image or frame conditioning). Returns x (N, D)."""
        if method not in ("euler", "heun"):
            raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
        index, _ = _sample_index(cu_seqlens)
        grid = self.timesteps(steps, cu_seqlens).to(noise.dtype)  # (B, steps+1)

        def velocity(z, t):  # t (B,)
            if clean is not None:
                z = torch.where(clean[:, None], x_clean, z)
                t = torch.where(clean, torch.zeros_like(t[index]), t[index])
            v = model(z, t)
            if uncond is not None and cfg_scale != 1.0:
                vu = uncond(z, t)
                v = vu + cfg_scale * (v - vu)
            return v

        z = noise
        for i in range(steps):
            t_cur, t_next = grid[:, i], grid[:, i + 1]
            dt = (t_next - t_cur)[index][:, None]  # (N, 1), negative
            d = velocity(z, t_cur)
            z_euler = z + dt * d
            if method == "heun" and i < steps - 1:
                z = z + dt * (d + velocity(z_euler, t_next)) / 2
            else:
                z = z_euler
        if clean is not None:
            z = torch.where(clean[:, None], x_clean, z)
        return z
