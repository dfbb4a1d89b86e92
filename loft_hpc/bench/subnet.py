"""A sub-network's training step against the full network's, on one core, beside their FLOPs:
the measurement ``make bench`` and ``loft-tools groups --speed`` share."""
from __future__ import annotations

import time


def layer_flops(model, x) -> dict[str, int]:
    """Multiply-accumulates of every conv and linear layer (by weight name) in one forward pass
    (eval mode, so BN accepts a batch of one and keeps its statistics)."""
    import torch

    out: dict[str, int] = {}

    def hook(name):
        def fn(m, _inp, y):
            if isinstance(m, torch.nn.Conv2d):
                out[name] = out.get(name, 0) + y.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                out[name] = out.get(name, 0) + y.numel() * m.in_features
        return fn

    hs = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
          if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hs:
            h.remove()
    return out


def flops(model, x) -> int:
    """Multiply-accumulates of the conv and linear layers in one forward pass."""
    return sum(layer_flops(model, x).values())


def _timed_steps(model, opt, x, y, n: int) -> float:
    import torch.nn.functional as F

    t0 = time.perf_counter()
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def compare_steps(full, sub, x, y, reps: int, blocks: int = 3, warmup: int = 2) -> dict:
    """Seconds per SGD step of ``full`` and ``sub`` on batch (x, y) on one thread (alternating
    blocks of ``reps`` steps after ``warmup`` steps, the fastest block of each), and their FLOPs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nets = (full, sub)
        opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in nets]
        for m, o in zip(nets, opts):
            m.train()
            _timed_steps(m, o, x, y, warmup)
        best = [float("inf")] * 2
        for _ in range(blocks):
            for i, (m, o) in enumerate(zip(nets, opts)):
                best[i] = min(best[i], _timed_steps(m, o, x, y, reps))
        f_full, f_sub = flops(full, x[:1]), flops(sub, x[:1])
    finally:
        torch.set_num_threads(threads)
    return {"full_step_ms": 1e3 * best[0], "sub_step_ms": 1e3 * best[1], "speedup": best[0] / best[1],
            "flops_full": f_full, "flops_sub": f_sub, "flops_ratio": f_full / f_sub}
