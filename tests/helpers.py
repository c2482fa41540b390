"""Small helpers shared by several test modules."""

import torch


def randomize(module, std=0.1, seed=0):
    """Fresh random weights; on READ's side networks this moves W_o off its zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
