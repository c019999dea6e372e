"""The Latent Diffusion denoiser: an "openaimodel"-style UNet (Dhariwal & Nichol; Rombach et al.).

Module names follow the CompVis layout (``time_embed``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``; ResBlock ``in_layers``/``emb_layers``/``out_layers``/``skip_connection``;
attention ``norm``/``qkv``/``proj_out``), so that parameter names, counts and FLOPs match the paper's
274.1M model. Every conv and linear weight here is what the sparsity engine prunes; biases and
GroupNorms stay dense. All ops are shape-only friendly, so the model builds and runs on ``meta``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from sparse_dm.models.vq_autoencoder import state_mismatch

GROUPS = 32  # GroupNorm(32) everywhere, as in the reference architecture
MAX_PERIOD = 10_000  # sinusoidal embedding period, as in the reference architecture


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of (integer) timesteps, ``[cos | sin]`` halves like the reference."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts as the identity (reference init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A block whose forward also takes the time(+class) embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepSequential(nn.Sequential):
    """Sequential that passes the embedding only to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, add projected embedding, GroupNorm-SiLU-dropout-conv(zero), skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + rearrange(self.emb_layers(emb).to(h.dtype), "b c -> b c 1 1")
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Spatial self-attention with 1x1 Conv1d qkv/proj_out (the reference's "legacy" head order)."""

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, _, hgt, wid = x.shape
        flat = rearrange(x, "b c h w -> b c (h w)")
        qkv = self.qkv(self.norm(flat))
        # legacy order: channels grouped per head as [q | k | v]
        q, k, v = rearrange(qkv, "b (heads three d) n -> three (b heads) n d", heads=self.num_heads, three=3)
        h = nn.functional.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "(b heads) n d -> b (heads d) n", b=b)
        out = flat + self.proj_out(h)
        return rearrange(out, "b c (h w) -> b c h w", h=hgt, w=wid)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (conv_resample) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv (conv_resample)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class UNetModel(nn.Module):
    """The LDM UNet. ``attention_resolutions`` are downsample factors (1 = input resolution).

    Class-conditional when ``num_classes`` is set: a learned embedding of ``num_classes + 1`` rows
    is added to the time embedding; the extra last row is the "null" label used for classifier-free
    guidance (``null_label``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_head_channels: int,
        dropout: float = 0.0,
        conv_resample: bool = True,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        emb_dim = 4 * model_channels
        attn_at = set(attention_resolutions)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + 1, emb_dim)

        def res_stage(ch_in: int, ch_out: int, ds: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(ch_in, emb_dim, ch_out, dropout)]
            if ds in attn_at:
                layers.append(AttentionBlock(ch_out, num_head_channels))
            return layers

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(TimestepSequential(*res_stage(ch, mult * model_channels, ds)))
                ch = mult * model_channels
                skip_chans.append(ch)
            if level != self.num_levels - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch, conv_resample)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            ResBlock(ch, emb_dim, ch, dropout),
            AttentionBlock(ch, num_head_channels),
            ResBlock(ch, emb_dim, ch, dropout),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = res_stage(ch + skip_chans.pop(), mult * model_channels, ds)
                ch = mult * model_channels
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(GROUPS, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    @property
    def null_label(self) -> int:
        """Index of the unconditional ("dropped") label in ``label_emb``."""
        if self.num_classes is None:
            raise AttributeError("unconditional UNet has no null label")
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict noise for ``x`` at integer timesteps ``t`` ([B]); ``y`` = class labels ([B]) or None."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("class-conditional UNet needs labels y (use null_label for unconditional)")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("unconditional UNet got class labels")
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


COMPVIS_UNET_PREFIX = "model.diffusion_model."  # where a full CompVis LDM checkpoint keeps its UNet
CLASS_EMBEDDER_PREFIX = "cond_stage_model."  # CompVis cin models: the ClassEmbedder
CROSS_ATTENTION_MARKERS = ("transformer_blocks.", ".attn2.", ".proj_in.")  # SpatialTransformer keys


def compvis_unet_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The UNet part of a full CompVis LDM state_dict (or a bare UNet state_dict), refusing the
    class-conditional "cin" models, whose conditioning this UNet does not implement.

    CompVis's ImageNet cin models condition through a ``ClassEmbedder`` (``cond_stage_model.*``) and
    cross-attention (``SpatialTransformer``: ``transformer_blocks``, ``attn2``, ``proj_in``); our
    class-conditional preset follows the UNet's own ``label_emb`` route with a null row for
    classifier-free guidance (see conf/experiment/ldm_imagenet_cond.yaml).
    """
    cin_keys = sorted(
        k
        for k in state
        if k.startswith(CLASS_EMBEDDER_PREFIX) or any(marker in k for marker in CROSS_ATTENTION_MARKERS)
    )
    if cin_keys:
        raise ValueError(
            "this is a CompVis class-conditional (cin) LDM: it conditions through a ClassEmbedder and "
            f"cross-attention ({len(cin_keys)} keys such as {', '.join(cin_keys[:3])}), which sparse_dm's "
            "UNet does not implement. sparse_dm's class-conditional preset adds a label_emb of "
            "num_classes + 1 rows (the last one the null class for classifier-free guidance) to the time "
            "embedding instead; train it from scratch (experiment=ldm_imagenet_cond), or load an "
            "unconditional CompVis UNet."
        )
    prefix = COMPVIS_UNET_PREFIX
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_compvis_unet(net: UNetModel, state: Mapping[str, Tensor]) -> UNetModel:
    """Load CompVis-layout UNet weights strictly, with a summary of what does not match (not a shape dump)."""
    unet_state = compvis_unet_state(state)
    expected = net.state_dict()
    emb = unet_state.get("label_emb.weight")
    if emb is not None and net.num_classes is not None and emb.shape[0] == net.num_classes:
        raise ValueError(
            f"label_emb.weight has {emb.shape[0]} rows = num_classes: a CompVis label_emb without the null "
            f"class; sparse_dm's conditional UNet has num_classes + 1 = {net.num_classes + 1} rows (the last "
            "is the classifier-free-guidance null class), so these weights cannot be used as they are"
        )
    details = state_mismatch(expected, unet_state)
    if details:
        raise ValueError(f"the state_dict does not match the configured UNet (model.net): {details}")
    net.load_state_dict(unet_state, strict=True)
    return net
