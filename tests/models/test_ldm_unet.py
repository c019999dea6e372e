"""The LDM UNet: the paper preset's exact size and FLOPs (on meta, no allocation), and behaviour."""


import pytest
import torch
from helpers.tiny_unet import tiny_unet
from helpers.tolerance import assert_close_computed, reductions
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from sparse_dm import CONFIG_DIR
from sparse_dm.models.ldm_unet import UNetModel, load_compvis_unet

CONF = CONFIG_DIR


def paper_unet() -> UNetModel:
    net_cfg = OmegaConf.load(CONF / "model" / "ldm_unet.yaml").net
    with torch.device("meta"):
        return instantiate(net_cfg)


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the zero init so outputs depend on the inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def test_paper_preset_parameter_count_on_meta():
    net = paper_unet()
    assert all(p.is_meta for p in net.parameters())
    weights = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]
    norms = sum(p.numel() for m in net.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters())
    total = sum(p.numel() for p in net.parameters())
    assert total == 274_056_163
    assert sum(p.numel() for p in weights) == 273_872_704
    assert len(weights) == 123
    assert norms == 86_464
    assert total - norms - sum(p.numel() for p in weights) == 96_995


def test_paper_preset_meta_forward_flops():
    """2 FLOPs per MAC over conv/linear weights at 3x64x64 reproduces the paper's 1.92036e11."""
    net = paper_unet()
    flops = []

    def count(module, _inputs, out):
        is_conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        macs_per_output = module.weight[0].numel() if is_conv else module.in_features
        flops.append(2 * macs_per_output * out.numel())

    for m in net.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            m.register_forward_hook(count)
    out = net(torch.zeros(1, 3, 64, 64, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    assert out.shape == (1, 3, 64, 64) and out.is_meta
    assert sum(flops) == pytest.approx(1.92036e11, rel=1e-5)


def test_zero_initialised_output_layers():
    net = tiny_unet()
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([3, 500]))
    assert out.shape == (2, 3, 16, 16)
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(net.out[-1].weight) == 0
    for m in net.modules():
        if hasattr(m, "proj_out"):
            assert torch.count_nonzero(m.proj_out.weight) == 0


def test_time_and_class_change_the_output():
    net = randomise(tiny_unet(num_classes=5))
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 10])
    base = net(x, t, torch.tensor([0, 0]))
    assert not torch.allclose(base, net(x, t + 100, torch.tensor([0, 0])))
    assert not torch.allclose(base, net(x, t, torch.tensor([1, 1])))
    assert net.label_emb.num_embeddings == 6 and net.null_label == 5
    with pytest.raises(ValueError, match="needs labels"):
        net(x, t)


def test_unconditional_rejects_labels_and_batch_independence():
    net = randomise(tiny_unet())
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, torch.zeros(3, dtype=torch.long))
    # batch 3 vs 1: other GEMM/conv blockings. In float64 the worst case over this ~2e4-term chain
    # (n u ~ 2e-12) is tight; in float32 (n u ~ 1e-3) it would let a batch mix-up pass
    net, x = net.double(), x.double()
    full = net(x, t)
    alone, chain = reductions(net, x[1:2], t[1:2])
    assert_close_computed(
        full[1:2], alone, reduction_length=chain.length, scale=chain.scale, why="batch vs alone"
    )


def test_compvis_unet_state_loads_and_cin_models_are_refused_clearly():
    src, dst = tiny_unet(), tiny_unet()
    full = {f"model.diffusion_model.{k}": v for k, v in src.state_dict().items()}
    full["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    load_compvis_unet(dst, full)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value)
    cin = {**full, "cond_stage_model.embedding.weight": torch.zeros(1001, 512)}
    cross_attention = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    cin[cross_attention] = torch.zeros(32, 512)
    with pytest.raises(ValueError, match=r"class-conditional \(cin\)[\s\S]*num_classes \+ 1"):
        load_compvis_unet(tiny_unet(num_classes=1000), cin)
    conditional = tiny_unet(num_classes=10)
    no_null_row = {**conditional.state_dict(), "label_emb.weight": torch.zeros(10, 128)}
    with pytest.raises(ValueError, match="null class"):
        load_compvis_unet(conditional, no_null_row)
    with pytest.raises(ValueError, match=r"model\.net.*missing \(1\): out\.2\.bias"):
        load_compvis_unet(tiny_unet(), {k: v for k, v in src.state_dict().items() if k != "out.2.bias"})
