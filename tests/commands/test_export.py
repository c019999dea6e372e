"""`.sdm` export: masks and masked weights load back bit-identically, size follows density, and
only plain tensor files are read."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_run import STEP, fake_run
from omegaconf import OmegaConf

from sparse_dm.export import export
from sparse_dm.run.load import module_from_lightning
from sparse_dm.run.sdm import decode_masked, encode_masked, net_from_sdm, read_sdm
from sparse_dm.sparsity.masks import MASK_SUFFIX


class Unpicklable:
    """Any class: loading it would mean running the pickle's code, which weights_only refuses."""


def export_cfg(ckpt_path, out, weights="ema"):
    return OmegaConf.create(
        {"ckpt_path": str(ckpt_path), "run_dir": None, "out": str(out), "weights": weights}
    )


@pytest.mark.parametrize("shape", [(6, 40), (4, 3, 3, 3), (2, 40000)])
def test_encode_decode_is_exact(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    mask = torch.rand(shape, generator=generator) < 0.3
    weight[mask.nonzero()[0].tolist()] = 0.0  # in the mask with value 0: must stay in the mask
    weight = weight * mask
    entry = encode_masked(weight, mask)
    assert entry["col"].dtype == (torch.int16 if shape[1:] != (40000,) else torch.int32)
    decoded, decoded_mask = decode_masked(entry)
    assert torch.equal(decoded_mask, mask)
    assert torch.equal(decoded, weight)  # outside the mask 0 (the masked net may hold -0.0 there)
    assert torch.equal(decoded[mask].view(torch.int32), weight[mask].view(torch.int32))  # bit-identical


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_export_loads_back_bit_identically_without_lightning(tmp_path, weights):
    ckpt = fake_run(tmp_path / "run")
    path = export(export_cfg(ckpt, tmp_path / "model.sdm", weights))
    payload = read_sdm(path)
    assert payload["step"] == STEP and payload["weights"] == weights
    net = net_from_sdm(payload)  # plain nn.Module from the config, no LightningModule involved
    module, _, _ = module_from_lightning(ckpt)
    if weights == "ema":
        with module.ema_weights():
            expected = {k: v.clone() for k, v in module.net.state_dict().items()}
    else:
        expected = module.net.state_dict()
    got = net.state_dict()
    assert got.keys() == expected.keys()
    masks = [k for k in got if k.endswith(MASK_SUFFIX)]
    assert masks
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
        if key + MASK_SUFFIX in got:
            in_mask = got[key + MASK_SUFFIX]
            assert torch.equal(got[key][in_mask].view(torch.int32), value[in_mask].view(torch.int32))
    regrown = expected[masks[0][: -len(MASK_SUFFIX)]][expected[masks[0]]] == 0
    assert regrown.any()  # positions in the mask with value 0 survived as mask positions


def test_exported_file_size_follows_density(tmp_path):
    dense_like = fake_run(tmp_path / "dense", ("model.net.hidden_size=48", "sparsity=0.1"))
    sparse = fake_run(tmp_path / "sparse", ("model.net.hidden_size=48", "sparsity=0.9"))
    sizes = {}
    for name, ckpt in (("dense", dense_like), ("sparse", sparse)):
        sizes[name] = export(export_cfg(ckpt, tmp_path / f"{name}.sdm")).stat().st_size
        module, _, _ = module_from_lightning(ckpt)
        torch.save(
            {k: v for k, v in module.net.state_dict().items() if not k.endswith(MASK_SUFFIX)},
            tmp_path / "d.pt",
        )
        sizes[name + "_dense_file"] = (tmp_path / "d.pt").stat().st_size
    assert sizes["sparse"] < 0.25 * sizes["sparse_dense_file"]
    assert sizes["sparse"] < 0.3 * sizes["dense"]


def test_refuses_files_that_are_not_exports(tmp_path):
    torch.save({"format": "something else"}, tmp_path / "a.sdm")
    with pytest.raises(ValueError, match=r"not a sparse_dm.sdm file"):
        read_sdm(tmp_path / "a.sdm")
    torch.save({"format": "sparse_dm.sdm", "version": 1, "payload": Unpicklable()}, tmp_path / "b.sdm")
    with pytest.raises(ValueError, match=r"refusing to load"):
        read_sdm(tmp_path / "b.sdm")
