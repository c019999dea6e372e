"""The VQ-regularised first stage of Latent Diffusion (taming/CompVis ``VQModel`` layout).

Parameter names match CompVis checkpoints (``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``,
``quant_conv.*``, ``post_quant_conv.*``), so a released ``vq-f4`` ``model.ckpt`` -- or the
``first_stage_model.*`` part of a full LDM checkpoint -- loads with strict key checking. The first
stage is frozen and never sparsified: latents are ``quant_conv(encoder(x))`` (before quantisation),
and decoding quantises to the nearest code first, as LDM does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from sparse_dm.files.checkpoint import read_checkpoint

GROUPS = 32  # GroupNorm groups of the reference autoencoder
NORM_EPS = 1e-6  # GroupNorm eps of the reference autoencoder
LDM_PREFIX = "first_stage_model."  # where a full LDM checkpoint keeps its first stage
IGNORED_PREFIXES = ("loss.",)  # discriminator / perceptual-loss weights saved with the autoencoder


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice with a 1x1 ``nin_shortcut`` when the width changes (no time input)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1x1 ``q``, ``k``, ``v`` convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric pad (right/bottom) then stride-2 3x3 conv, as in the reference."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image -> z (``z_channels``), downsampling by 2 at every level but the last."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        in_channels: int,
        z_channels: int,
        resolution: int,
        attn_resolutions: Sequence[int],
        dropout: float,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = _mid(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z -> image; ``up[i]`` holds level i (stored in level order, run from the deepest)."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        out_ch: int,
        z_channels: int,
        resolution: int,
        attn_resolutions: Sequence[int],
        dropout: float,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        stages: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (``quantize.embedding``), straight-through gradient."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: Tensor) -> Tensor:
        """Index of the nearest code for every spatial position of z ([B, C, H, W] -> [B, H, W])."""
        flat = rearrange(z, "b c h w -> (b h w) c")
        dist = torch.cdist(flat, self.embedding.weight.to(flat.dtype))
        return rearrange(dist.argmin(dim=1), "(b h w) -> b h w", b=z.shape[0], h=z.shape[2])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return (straight-through quantised z, codebook + commitment terms before weighting)."""
        zq = rearrange(self.embedding(self.codes(z)), "b h w c -> b c h w")
        codebook = nn.functional.mse_loss(zq, z.detach())
        commit = nn.functional.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), torch.stack([codebook, commit])


class VQModel(nn.Module):
    """VQ autoencoder: ``encode`` gives pre-quantisation latents, ``decode`` quantises then decodes."""

    def __init__(
        self,
        embed_dim: int,
        n_embed: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = 3,
        out_ch: int = 3,
        resolution: int = 256,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
    ):
        super().__init__()
        shape = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            resolution=resolution,
            attn_resolutions=attn_resolutions,
            dropout=dropout,
        )
        self.encoder = Encoder(in_channels=in_channels, **shape)
        self.decoder = Decoder(out_ch=out_ch, **shape)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.embed_dim = embed_dim

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> latents (LDM's scale factor 1.0, no quantisation)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images: quantise to the nearest code, then decode."""
        zq, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction and the VQ loss terms (used only when training a first stage ourselves)."""
        zq, vq_terms = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(zq)), vq_terms

    def freeze(self) -> VQModel:
        """Eval mode, no gradients: the first stage is fixed while the diffusion model trains."""
        self.eval()
        self.requires_grad_(False)
        return self


CONVERSION_HINT = (
    "In an environment you trust (with the libraries that wrote the file installed), extract the weights "
    "once with: python -c \"import torch; torch.save(torch.load('model.ckpt', map_location='cpu', "
    "weights_only=False)['state_dict'], 'first_stage_state_dict.pt')\" and point "
    "model.first_stage.ckpt_path to that file."
)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """The raw state_dict of a Lightning ``.ckpt`` (``{"state_dict": ...}``) or of a bare state_dict,
    read with sparse_dm.files.read_checkpoint (never unpickles code)."""
    obj = read_checkpoint(path, hint=CONVERSION_HINT)
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict of tensors (top-level type {type(obj).__name__})")
    return dict(state)


def state_hash(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes, bytes): identifies a first stage by content,
    so a different file at the same path is never mistaken for the one a run or a cache was made with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def first_stage_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Select the autoencoder's keys: strip ``first_stage_model.`` if present, drop ``loss.*``."""
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}


def state_mismatch(expected: dict[str, Tensor], state: dict[str, Tensor], shown: int = 5) -> str:
    """Missing, unexpected and wrongly shaped keys of `state` against `expected` (first `shown` of
    each), or "" when they match: a short message instead of PyTorch's full shape dump."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    return "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
        if keys
    )


def load_first_stage(model: VQModel, path: str | Path) -> VQModel:
    """Load CompVis-layout weights into ``model`` with strict key and shape checks, then freeze it."""
    state = first_stage_state(load_state_dict_file(path))
    details = state_mismatch(model.state_dict(), state, shown=20)
    if details:
        raise ValueError(f"{path} does not match the configured first stage: {details}")
    model.load_state_dict(state, strict=True)
    return model.freeze()
