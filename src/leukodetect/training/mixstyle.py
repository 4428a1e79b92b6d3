"""MixStyle while training: the per-image channel statistics of early feature maps mixed between images.

Zhou, Yang, Qiao and Xiang, "Domain Generalization with MixStyle", ICLR 2021. A feature map's mean and
standard deviation per channel carry much of an image's "style" (stain, illumination, camera), its normalised
map the content. With probability ``p`` per batch and per stage, each image's statistics are replaced by a
mix, ``lambda`` of its own and ``1 - lambda`` of another image's in the batch (``lambda ~ Beta(alpha, alpha)``,
the partner a random permutation). With laboratory-balanced batches the partner is mostly a cell of another
laboratory, so the network trains on cells in stains between the laboratories it has.

It is attached as forward hooks on the network's stages and acts only in training mode: it has no
parameters, the saved weights and the network that ``predict`` builds are the usual ones, and the
checkpoint's config records ``train.mixstyle``. The random draws come from a NumPy generator seeded by
(seed, epoch) (:meth:`MixStyle.set_epoch`), so a resumed run continues as the uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from leukodetect.errors import LeukoError

#: Beta parameter of the mixing weight (the paper's choice).
ALPHA = 0.1
EPS = 1e-6


class MixStyle:
    """Forward hooks on ``model``'s ``stages`` (its registry entry's ``style_stages``) that mix instance statistics
    in training mode."""

    def __init__(self, model: nn.Module, p: float, stages: tuple[str, ...], *, alpha: float = ALPHA) -> None:
        if not 0 < p <= 1:
            raise LeukoError(f"--mixstyle takes a probability in (0, 1], got {p}.")
        children = dict(model.named_children())
        missing = [name for name in stages if name not in children]
        if not stages or missing:
            raise LeukoError(f"--mixstyle cannot mix this network's stages ({', '.join(missing) or 'none named'} not found): "
                             "use --arch resnet50, resnet101 or resnet152, or leave --mixstyle out.")
        self.p, self.alpha = p, alpha
        self.rng = np.random.default_rng(0)
        self.handles = [children[name].register_forward_hook(self._hook) for name in stages]

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Seed this epoch's draws from (seed, epoch)."""
        self.rng = np.random.default_rng([seed, epoch, 0x5E1F])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or output.shape[0] < 2 or self.rng.random() >= self.p:
            return None
        n = output.shape[0]
        lam = torch.from_numpy(self.rng.beta(self.alpha, self.alpha, size=(n, 1, 1, 1))).to(output.device, torch.float32)
        perm = torch.from_numpy(self.rng.permutation(n)).to(output.device)
        return mix_statistics(output, lam, perm)


def mix_statistics(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image's channel mean and std replaced by ``lam`` of its own and ``1 - lam`` of
    image ``perm[i]``'s; the statistics are not differentiated through (as in the paper)."""
    xf = x.float()
    mu = xf.mean(dim=(2, 3), keepdim=True).detach()
    sig = (xf.var(dim=(2, 3), keepdim=True) + EPS).sqrt().detach()
    normed = (xf - mu) / sig
    mixed_mu = lam * mu + (1 - lam) * mu[perm]
    mixed_sig = lam * sig + (1 - lam) * sig[perm]
    return (normed * mixed_sig + mixed_mu).to(x.dtype)
