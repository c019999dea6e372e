"""The VQ first stage: CompVis key layout, checkpoint loading round trips, freezing, quantised decode."""

import argparse

import pytest
import torch

from sparse_dm.models.vq_autoencoder import VQModel, load_first_stage

SMALL = dict(embed_dim=3, n_embed=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=3, resolution=16)


def small_vq(seed: int) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(**SMALL)


def test_paper_config_size_and_compvis_keys():
    with torch.device("meta"):
        vq = VQModel(embed_dim=3, n_embed=8192, ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3)
    assert sum(p.numel() for p in vq.parameters()) == 55_322_782
    keys = set(vq.state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.norm_out.weight",
        "decoder.up.2.block.2.conv2.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.mid.block_2.norm2.bias",
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ):
        assert key in keys, key
    assert vq.state_dict()["quantize.embedding.weight"].shape == (8192, 3)
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert "encoder.down.2.downsample.conv.weight" not in keys


@pytest.mark.parametrize("layout", ["lightning", "full_ldm", "bare"])
def test_checkpoint_round_trip(tmp_path, layout):
    src = small_vq(0).eval()
    state = src.state_dict()
    extra = {"loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}  # saved by CompVis, ignored here
    if layout == "lightning":
        blob = {"state_dict": {**state, **extra}, "epoch": 3, "global_step": 1000}
    elif layout == "full_ldm":
        blob = {
            "state_dict": {
                **{f"first_stage_model.{k}": v for k, v in state.items()},
                "model.diffusion_model.out.2.weight": torch.randn(3, 224, 3, 3),
                "betas": torch.rand(1000),
            }
        }
    else:
        blob = state
    path = tmp_path / "model.ckpt"
    torch.save(blob, path)
    dst = load_first_stage(small_vq(1), path)
    assert not dst.training and not any(p.requires_grad for p in dst.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(dst.encode(x), src.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(dst.decode(src.encode(x)), src.decode(src.encode(x)), rtol=0, atol=0)


def test_strict_keys_error_lists_missing_and_unexpected(tmp_path):
    state = small_vq(0).state_dict()
    state.pop("quant_conv.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    pattern = r"missing \(1\): quant_conv\.weight[\s\S]*unexpected \(1\): encoder\.extra"
    with pytest.raises(ValueError, match=pattern):
        load_first_stage(small_vq(1), tmp_path / "bad.ckpt")


def test_shape_mismatch_and_missing_file(tmp_path):
    torch.save(VQModel(**{**SMALL, "n_embed": 32}).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"shape mismatch.*quantize\.embedding\.weight"):
        load_first_stage(small_vq(1), tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_first_stage(small_vq(1), tmp_path / "nope.ckpt")


def test_refuses_unsafe_pickles(tmp_path):
    blob = {"state_dict": small_vq(0).state_dict(), "hparams": argparse.Namespace(a=1)}
    torch.save(blob, tmp_path / "u.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        load_first_stage(small_vq(1), tmp_path / "u.ckpt")


def test_decode_quantises_to_nearest_code():
    vq = small_vq(0).freeze()
    z = torch.randn(1, 3, 8, 8)
    codes = vq.quantize.codes(z)
    snapped = vq.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
    dists = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), vq.quantize.embedding.weight)
    assert torch.equal(codes.flatten(), dists.argmin(1))
    with torch.no_grad():
        torch.testing.assert_close(vq.decode(z), vq.decode(snapped))
        assert vq.decode(z).shape == (1, 3, 16, 16)


def test_self_trained_first_stage_exports_a_loadable_checkpoint(tmp_path):
    from sparse_dm.lightning.autoencoder_module import AutoencoderModule

    module = AutoencoderModule(vq=SMALL, optimizer=dict(lr=1e-3, betas=[0.5, 0.9]), commitment_weight=0.25)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    parts = module.losses(x)
    parts["loss"].backward()
    assert module.vq.encoder.conv_in.weight.grad is not None
    assert module.vq.quantize.embedding.weight.grad is not None
    path = module.export_first_stage(tmp_path / "first_stage.pt")
    loaded = load_first_stage(small_vq(1), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), module.vq.encode(x))
