"""Estimated GPU memory of one training step, from shapes only (the model on the meta device).

persistent state: the net's parameters, their gradients, AdamW's two moments (+ step counters), the EMA
copy, the boolean masks, and frozen weights that live on the device (the LDM first stage).
activations: every tensor autograd saves for backward during a forward + MSE loss at the configured
batch size, measured with ``torch.autograd.graph.saved_tensors_hooks`` on the meta device (views are
counted once, by their base tensor; parameters are not counted again). Not included: the CUDA context,
allocator fragmentation, cuDNN workspaces and the transient EMA swap copy made for validation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from sparse_dm.planning.disk import optimizer_state_bytes, tensor_bytes
from sparse_dm.sparsity.masks import MASK_SUFFIX


def saved_activation_bytes(net: nn.Module, inputs: tuple) -> int:
    """Bytes autograd keeps for backward in one forward of ``net(*inputs)`` plus an MSE loss."""
    params = {id(p) for p in net.parameters()}
    bases: dict[int, Tensor] = {}

    def pack(t: Tensor) -> Tensor:
        base = t if t._base is None else t._base
        if id(t) not in params and id(base) not in params:
            bases[id(base)] = base
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(*inputs)
        (out - torch.zeros_like(out)).pow(2).mean()
    return tensor_bytes(bases.values())


def _frozen_device_weights(module: nn.Module, net: nn.Module) -> Iterable[Tensor]:
    trained = {id(p) for p in net.parameters()}
    return (p for p in module.parameters() if id(p) not in trained)


def training_memory(module: nn.Module, batch_size: int, mask_bytes: int = 0) -> dict[str, int]:
    """Byte estimate per component and in total; ``mask_bytes`` for masks not attached yet (meta build)."""
    net = module.net
    trainable = [p for p in net.parameters() if p.requires_grad]
    parts = {
        "params": tensor_bytes(net.parameters()),
        "grads": tensor_bytes(trainable),
        "optimizer": optimizer_state_bytes(net.parameters()),
        "ema": tensor_bytes(module.ema.buffers()),
        "masks": mask_bytes + tensor_bytes(b for n, b in net.named_buffers() if n.endswith(MASK_SUFFIX)),
        "frozen": tensor_bytes(_frozen_device_weights(module, net)),
        "activations": saved_activation_bytes(net, module.example_net_inputs(batch_size)),
    }
    return {**parts, "total": sum(parts.values())}
