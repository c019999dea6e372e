"""The ChiroDiff denoiser: a bidirectional GRU over noisy stroke deltas that predicts eps.

Per step it reads 13 numbers: 5 features of the noisy sequence (x, y, dx, dy, pen; positions are
the cumsum of the noisy deltas) and an 8-dim random-Fourier embedding of the timestep, repeated
along the sequence. GRU -> Linear(2H -> H) -> Linear(H + pe_dim -> 3), no activation in between
(that wiring gives the paper's 736,027 / 416,859 / 65,019 parameters). Sequences are packed, so
padding is never seen by the recurrence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparse_dm.sketch.representation import DATA_CHANNELS, FEATURE_CHANNELS, deltas_to_features


class FourierTimeEmbedding(nn.Module):
    """Fixed random Fourier features of t / T: [sin(2 pi s W t/T), cos(2 pi s W t/T)].

    W ~ N(0, 1) is a buffer (not trained, saved in checkpoints), drawn from its own seed so the
    embedding does not depend on the global RNG state at construction time.
    """

    def __init__(self, dim: int, num_timesteps: int, freq_scale: float, seed: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, 1, generator=gen))
        self.num_timesteps = num_timesteps
        self.freq_scale = freq_scale

    def forward(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, dim)."""
        phase = 2 * math.pi * self.freq_scale * (t.to(self.freqs.dtype)[:, None] / self.num_timesteps)
        angles = phase @ self.freqs.T
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ChiroDiffNet(nn.Module):
    """eps(x_t, t) for (B, L, 3) noisy deltas; optional class conditioning.

    With `num_classes > 0` a learned class embedding (size `class_embed_dim`) is concatenated to
    the time embedding everywhere the time embedding goes (GRU input and output projection).
    """

    def __init__(
        self,
        hidden_size: int = 96,
        num_layers: int = 3,
        time_embed_dim: int = 8,
        time_freq_scale: float = 4.0,
        time_embed_seed: int = 0,
        num_timesteps: int = 1000,
        num_classes: int = 0,
        class_embed_dim: int = 0,
    ) -> None:
        super().__init__()
        if (num_classes > 0) != (class_embed_dim > 0):
            raise ValueError("num_classes and class_embed_dim must both be set for conditioning")
        self.time_embed = FourierTimeEmbedding(
            time_embed_dim, num_timesteps, time_freq_scale, time_embed_seed
        )
        self.class_embed = nn.Embedding(num_classes, class_embed_dim) if num_classes > 0 else None
        cond_dim = time_embed_dim + class_embed_dim
        self.gru = nn.GRU(
            FEATURE_CHANNELS + cond_dim, hidden_size, num_layers, batch_first=True, bidirectional=True
        )
        self.proj = nn.Linear(2 * hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size + cond_dim, DATA_CHANNELS)

    def _conditioning(self, t: Tensor, cond: Tensor | None) -> Tensor:
        emb = self.time_embed(t)
        if self.class_embed is None:
            if cond is not None:
                raise ValueError("this ChiroDiffNet is unconditional but got class labels")
            return emb
        if cond is None:
            raise ValueError("this ChiroDiffNet is class-conditional: pass cond (class labels)")
        return torch.cat([emb, self.class_embed(cond)], dim=-1)

    def forward(
        self, x_t: Tensor, t: Tensor, lengths: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """x_t (B, L, 3), t (B,), lengths (B,) (None = all sequences fill L), cond (B,) -> eps (B, L, 3).

        Outputs at padded positions are meaningless and must be masked by the caller.
        """
        _, max_len, _ = x_t.shape
        c = self._conditioning(t, cond)[:, None, :].expand(-1, max_len, -1)
        inputs = torch.cat([deltas_to_features(x_t), c], dim=-1)
        if lengths is None:
            hidden, _ = self.gru(inputs)
        else:
            packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
            hidden, _ = self.gru(packed)
            hidden, _ = pad_packed_sequence(hidden, batch_first=True, total_length=max_len)
        return self.out(torch.cat([self.proj(hidden), c], dim=-1))
