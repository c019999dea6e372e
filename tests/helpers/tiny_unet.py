"""A small LDM UNet for fast tests (same architecture as the paper preset, tiny widths)."""

from sparse_dm.models.ldm_unet import UNetModel

TINY_UNET = dict(
    in_channels=3,
    out_channels=3,
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[2],
    num_head_channels=16,
)


def tiny_unet(**overrides) -> UNetModel:
    return UNetModel(**{**TINY_UNET, **overrides})
