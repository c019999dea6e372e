"""The VQ first stage: CompVis key layout, checkpoint loading round trips, freezing, quantised decode."""

import argparse
import functools
import os
import pickle
import sys
import types

import pytest
import torch
from helpers.tolerance import assert_close_computed, reductions
from omegaconf import OmegaConf

from sparse_dm.models.vq_autoencoder import VQModel, load_first_stage, state_hash

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


def _pickled_like_lightning_1x(tmp_path, extra):
    """A CompVis-style PL 1.x checkpoint: the callback *class* as a dict key, a callback object, an
    omegaconf config and an argparse namespace, pickled while a stand-in ``pytorch_lightning`` module
    exists (as on the machine that wrote it) and loaded after it is gone (as on ours)."""
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    fake = {name: types.ModuleType(name) for name in names}
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    fake[names[-1]].ModelCheckpoint = model_checkpoint
    callback = model_checkpoint()
    callback.dirpath, callback.best_model_score = "/logs/checkpoints", torch.tensor(0.1)
    state = small_vq(0).state_dict()
    blob = {
        "state_dict": state,
        "callbacks": {model_checkpoint: {"best_model_path": "/logs/last.ckpt"}},
        "callback_object": callback,
        "hyper_parameters": OmegaConf.create({"embed_dim": 3, "ddconfig": {"ch_mult": [1, 2]}}),
        "hparams": argparse.Namespace(lr=4.5e-6),
        **extra,
    }
    sys.modules.update(fake)
    try:
        torch.save(blob, tmp_path / "model.ckpt")
    finally:
        for name in names:
            del sys.modules[name]
    return tmp_path / "model.ckpt", state


def test_official_lightning_checkpoint_loads_through_the_safe_path(tmp_path):
    path, state = _pickled_like_lightning_1x(tmp_path, {})
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses it ...
        torch.load(path, weights_only=True)
    loaded = load_first_stage(small_vq(1), path)  # ... our allowlist loads it, tensors only
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key])


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_payload_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path, _ = _pickled_like_lightning_1x(tmp_path, {"payload": Payload(marker)})
    with pytest.raises(
        ValueError, match=r"refusing to load[\s\S]*system[\s\S]*weights_only=False\)\['state_dict'\]"
    ):
        load_first_stage(small_vq(1), path)
    assert not marker.exists()


def test_state_hash_follows_content_not_path(tmp_path):
    a, b = small_vq(0), small_vq(0)
    assert state_hash(a) == state_hash(b)
    with torch.no_grad():
        b.quant_conv.bias[0] += 1e-6
    assert state_hash(a) != state_hash(b)


def test_decode_quantises_to_nearest_code():
    vq = small_vq(0).freeze()
    z = torch.randn(1, 3, 8, 8)
    codes = vq.quantize.codes(z)
    snapped = vq.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
    dists = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), vq.quantize.embedding.weight)
    assert torch.equal(codes.flatten(), dists.argmin(1))
    with torch.no_grad():
        # z + (zq - z) rounds twice on its way to zq: two more roundings on the decoder's first terms.
        # In float64, where the worst case over the decoder's ~1.3e4-term chain is tight (float32's
        # n u ~ 8e-4 would let an unquantised decode pass)
        vq, z, snapped = vq.double(), z.double(), snapped.double()
        expected, chain = reductions(vq, snapped, call=vq.decode)
        assert_close_computed(
            vq.decode(z), expected, reduction_length=chain.length + 2, scale=chain.scale, why="z + (zq - z)"
        )
        assert vq.decode(z).shape == (1, 3, 16, 16)


def test_self_trained_first_stage_exports_a_loadable_checkpoint(tmp_path):
    from sparse_dm.training.modules.autoencoder import AutoencoderModule

    module = AutoencoderModule(
        vq=SMALL,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9)),
        commitment_weight=0.25,
    )
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    parts = module.losses(x)
    parts["loss"].backward()
    assert module.vq.encoder.conv_in.weight.grad is not None
    assert module.vq.quantize.embedding.weight.grad is not None
    path = module.export_first_stage(tmp_path / "first_stage.pt")
    loaded = load_first_stage(small_vq(1), path)
    with torch.no_grad():
        # the same weights through the same kernels: bit-exact
        torch.testing.assert_close(loaded.encode(x), module.vq.encode(x), rtol=0, atol=0)
