"""A small fully convolutional network that marks white-cell centres on a smear (a centre heat map).

The image is shown at one physical scale (``rbc_px`` pixels per red-cell diameter, see
:mod:`leukodetect.runtime.scale`), so one set of weights serves every magnification. The output is
one channel at 1/4 of the input's resolution: the logit of "a white cell's centre is here", trained
with Gaussian targets and the penalty-reduced focal loss of CenterNet (Zhou et al., 2019). Its field
of view is about 127 input pixels, eight red-cell diameters at the default scale: enough to see a
whole white cell and its surroundings. About 0.2 million parameters, so it trains from scratch on a
CPU and runs on a 2592x1944 photograph (resampled to about 480x360) in tens of milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Output stride: one heat-map cell per STRIDE x STRIDE input pixels.
STRIDE = 4


def _conv(cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels, dilation=dilation),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class CentreNet(nn.Module):
    """Heat-map network: RGB (N, 3, H, W) in, centre logits (N, 1, ceil(H/4), ceil(W/4)) out."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.stem = _conv(3, width // 2, stride=2)
        self.down4 = nn.Sequential(_conv(width // 2, width, stride=2), _Residual(width))
        self.down8 = nn.Sequential(_conv(width, 2 * width, stride=2), _Residual(2 * width), _Residual(2 * width, dilation=2))
        self.fuse = _conv(3 * width, width)
        self.head = nn.Conv2d(width, 1, 1)
        nn.init.constant_(self.head.bias, -2.19)  # a prior of 0.1 on every cell, as in CenterNet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s4 = self.down4(self.stem(x))
        s8 = self.down8(s4)
        up = F.interpolate(s8, size=s4.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([s4, up], dim=1)))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *, alpha: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, averaged over the centres (target == 1) in the batch.

    ``weight`` (the target's shape, optional) scales each heat-map cell's term: 0 leaves a cell out of the
    loss (a white cell nobody annotated, which is neither a centre nor background).
    """
    prob = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -torch.log(prob) * (1 - prob) ** alpha * pos
    neg_loss = -torch.log(1 - prob) * prob ** alpha * (1 - target) ** beta * (1 - pos)
    if weight is not None:
        pos_loss, neg_loss = pos_loss * weight, neg_loss * weight
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)
