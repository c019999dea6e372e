"""The `.safetensors` export: bit-exact round trip, size at S = 0.9, a model card, and the docs' loader
running with torch + safetensors alone."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.run_config import compose_config
from helpers.tiny_run import STEP, fake_run
from omegaconf import OmegaConf
from safetensors.torch import save_file

from sparse_dm.export import export
from sparse_dm.files.safetensors_file import read_safetensors, write_safetensors
from sparse_dm.run.build import build_run
from sparse_dm.run.load import load_module, module_from_lightning
from sparse_dm.run.model_card import MARKER, CardExists
from sparse_dm.run.sdm import export_payload, net_from_sdm

DOCS = Path(__file__).resolve().parents[2] / "docs" / "exported_files.md"


def export_cfg(ckpt_path, out=None, weights="ema"):
    return OmegaConf.create({"ckpt_path": str(ckpt_path), "run_dir": None, "out": out, "weights": weights})


def ema_state(module) -> dict[str, torch.Tensor]:
    with module.ema_weights():
        return {k: v.clone() for k, v in module.net.state_dict().items()}


def assert_same_tree(got, expected, path=""):
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        assert torch.equal(got.view(torch.uint8) if got.dtype.is_floating_point else got,
                           expected.view(torch.uint8) if expected.dtype.is_floating_point else expected), path
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key in expected:
            assert_same_tree(got[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_tree(a, b, f"{path}/{i}")
    else:
        assert got == expected, path


def test_default_export_is_safetensors_with_a_card_and_loads_back_bit_identically(tmp_path):
    ckpt = fake_run(tmp_path / "run")
    path = export(export_cfg(ckpt))
    assert path == tmp_path / "run" / "export" / "model.safetensors"
    module, model_cfg, _ = module_from_lightning(ckpt)
    assert_same_tree(read_safetensors(path), export_payload(module, model_cfg, "ema", STEP))
    loaded, step = load_module(path)
    assert step == STEP
    expected, got = ema_state(module), loaded.net.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():  # bitwise, -0.0 and in-mask zeros included
        assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)) if value.is_floating_point() \
            else torch.equal(got[key], value), key
    card = (path.parent / "README.md").read_text()
    assert card.startswith(MARKER) and "CC BY-SA 3.0" in card and "| gru.weight_ih_l0 |" in card
    assert "rigl" in card and "S = 0.9" in card


def test_a_foreign_readme_is_never_overwritten(tmp_path):
    ckpt = fake_run(tmp_path / "run")
    theirs = tmp_path / "out" / "README.md"
    theirs.parent.mkdir()
    theirs.write_text("my notes")
    with pytest.raises(CardExists, match=r"README\.md was not written by sparse_dm\.export"):
        export(export_cfg(ckpt, out=str(tmp_path / "out" / "m.safetensors")))
    assert theirs.read_text() == "my notes" and not (tmp_path / "out" / "m.safetensors").exists()


def test_other_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match=r"is not a sparse_dm\.safetensors file"):
        read_safetensors(plain)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read"):
        read_safetensors(tmp_path / "broken.safetensors")
    ckpt = fake_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"out='.*model.pt' must end in one of"):
        export(export_cfg(ckpt, out=str(tmp_path / "model.pt")))


def test_file_is_at_most_a_fifth_of_the_dense_state_dict_at_s_0_9(tmp_path):
    """The default ChiroDiff (3 x 96 bi-GRU) at S = 0.9: float32 values + int16 columns + row pointers."""
    cfg = compose_config(tmp_path, ["method=rigl", "sparsity=0.9"])
    module, _, _ = build_run(cfg)
    payload = export_payload(module, OmegaConf.to_container(cfg.model, resolve=True), "raw", 0)
    path = write_safetensors(payload, tmp_path / "model.safetensors")
    dense = {k: v for k, v in module.net.state_dict().items() if not k.endswith("_mask")}
    buffer = io.BytesIO()
    torch.save(dense, buffer)
    assert path.stat().st_size <= 0.2 * buffer.getbuffer().nbytes


BLOCK_SPARSE_DM = """
import sys
sys.modules["sparse_dm"] = None  # the loader must not need sparse_dm
{code}
state, config = load_sparse_dm(sys.argv[1])
import torch
torch.save({{"state": state, "config": config}}, sys.argv[2])
"""


def test_the_docs_loader_needs_only_torch_and_safetensors(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 22  # the docs promise a short loader
    ckpt = fake_run(tmp_path / "run")
    path = export(export_cfg(ckpt, weights="raw"))
    script = tmp_path / "loader.py"
    script.write_text(BLOCK_SPARSE_DM.format(code=code))
    out = tmp_path / "loaded.pt"
    done = subprocess.run([sys.executable, str(script), str(path), str(out)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = torch.load(out, weights_only=True)
    module, model_cfg, _ = module_from_lightning(ckpt)
    expected = {k: v for k, v in module.net.state_dict().items() if not k.endswith("_band_masks")}
    assert loaded["config"] == model_cfg
    assert loaded["state"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded["state"][key], value), key
    assert torch.equal(net_from_sdm(read_safetensors(path)).state_dict()["gru.weight_ih_l0"],
                       expected["gru.weight_ih_l0"])  # fmt: skip
