"""The ChiroDiff denoiser: the paper's exact sizes, packing, time embedding, conditioning."""

from __future__ import annotations

import pytest
import torch
from helpers.tolerance import assert_close_computed, reductions

from sparse_dm.diffusion import masked_mse
from sparse_dm.models.chirodiff import ChiroDiffNet

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    ("hidden", "layers", "total", "weights"),
    [(128, 3, 736_027, 731_288), (96, 3, 416_859, 413_304), (48, 2, 65_019, 63_816)],
)
def test_paper_parameter_counts(hidden: int, layers: int, total: int, weights: int) -> None:
    net = ChiroDiffNet(hidden_size=hidden, num_layers=layers)
    params = dict(net.named_parameters())
    assert sum(p.numel() for p in params.values()) == total
    assert sum(p.numel() for n, p in params.items() if "weight" in n) == weights
    assert net.gru.input_size == 13


def test_time_embedding_is_a_fixed_seeded_buffer() -> None:
    torch.manual_seed(1)
    a = ChiroDiffNet(16, 1)
    torch.manual_seed(2)
    b = ChiroDiffNet(16, 1)
    torch.testing.assert_close(a.time_embed.freqs, b.time_embed.freqs, rtol=0, atol=0)  # one seed: bit-exact
    assert "time_embed.freqs" in a.state_dict()
    assert all("freqs" not in n for n, _ in a.named_parameters())
    emb = a.time_embed(torch.tensor([0, 500, 999]))
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4), rtol=0, atol=0)  # sin 0, cos 0


def padded_batch(lengths: list[int], pad_value: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(lengths), max(lengths) + 3, 3, generator=gen)
    mask = torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    x[~mask] = pad_value
    return x, torch.tensor(lengths), mask


def test_padding_never_changes_real_outputs_or_loss() -> None:
    net = ChiroDiffNet(hidden_size=12, num_layers=2).eval()
    lengths = [7, 3, 10]
    t = torch.tensor([5, 400, 999])
    x_zero, lens, mask = padded_batch(lengths, 0.0)
    x_junk, _, _ = padded_batch(lengths, 1e3)
    out_zero, out_junk = net(x_zero, t, lens), net(x_junk, t, lens)
    # same shapes, same kernels, and packing keeps padding out of every real row's sums: bit-exact
    torch.testing.assert_close(out_zero[mask], out_junk[mask], rtol=0, atol=0)
    for i, n in enumerate(lengths):  # each drawing alone, without any padding: other GEMM shapes
        alone, chain = reductions(net, x_zero[i : i + 1, :n], t[i : i + 1], torch.tensor([n]))
        assert_close_computed(
            out_zero[i, :n], alone[0], reduction_length=chain.length, scale=chain.scale, why="batch vs alone"
        )
    target = torch.randn_like(x_zero)
    target_junk = target.clone()
    target_junk[~mask] = -7.0
    loss = masked_mse(out_zero, target, mask[..., None])
    torch.testing.assert_close(loss, masked_mse(out_junk, target_junk, mask[..., None]), rtol=0, atol=0)


def test_gradients_ignore_padding() -> None:
    net = ChiroDiffNet(hidden_size=8, num_layers=1)
    x, lens, mask = padded_batch([4, 6], 0.0)
    x.requires_grad_(True)
    loss = masked_mse(net(x, torch.tensor([1, 2]), lens), torch.zeros_like(x), mask[..., None])
    loss.backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()


def test_no_lengths_means_full_sequences() -> None:
    net = ChiroDiffNet(hidden_size=8, num_layers=1)
    x = torch.randn(2, 5, 3)
    t = torch.tensor([3, 9])
    expected, chain = reductions(net, x, t, torch.tensor([5, 5]))
    assert_close_computed(  # padded and packed input: two nn.GRU code paths
        net(x, t), expected, reduction_length=chain.length, scale=chain.scale, why="padded vs packed"
    )


def test_class_conditioning() -> None:
    net = ChiroDiffNet(hidden_size=8, num_layers=1, num_classes=7, class_embed_dim=4)
    assert net.gru.input_size == 13 + 4 and net.out.in_features == 8 + 8 + 4
    x, t = torch.randn(2, 5, 3), torch.tensor([3, 3])
    out_a, out_b = net(x, t, cond=torch.tensor([0, 0])), net(x, t, cond=torch.tensor([0, 6]))
    torch.testing.assert_close(out_a[0], out_b[0], rtol=0, atol=0)  # same row, same kernels: bit-exact
    assert not torch.allclose(out_a[1], out_b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        ChiroDiffNet(8, 1)(x, t, cond=torch.tensor([0, 1]))


def test_forward_on_meta_device() -> None:
    with torch.device("meta"):
        net = ChiroDiffNet(96, 3)
        out = net(torch.zeros(1, 10, 3), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 10, 3) and out.is_meta
