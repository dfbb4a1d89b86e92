"""SGD construction and momentum kept by tensor name (so it can travel with filters)."""
from __future__ import annotations

import torch
from torch import nn


def make_sgd(model: nn.Module, *, lr: float, momentum: float, weight_decay: float, nesterov: bool = False):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


def get_momentum(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    """Momentum buffers by parameter name (zeros where SGD has not made one yet)."""
    out = {}
    for n, p in model.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        out[n] = buf.detach().clone() if buf is not None else torch.zeros_like(p)
    return out


def set_momentum(model: nn.Module, opt, momentum: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in momentum:
            opt.state[p]["momentum_buffer"] = momentum[n].detach().clone().to(p.device)
