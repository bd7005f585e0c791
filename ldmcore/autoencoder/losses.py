"""First-stage losses: an edge-weighted pixel reconstruction loss, a PatchGAN discriminator with
hinge losses, and the adaptive weight that balances the adversarial term (Esser et al. 2021).

The edge weighting is what kept small triangles' apexes crisp in the calibration runs
(shared CALIBRATION.md: per-pixel weight 1 + 4·edge map of the target on L1 + L2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.blocks import normalization


@torch.no_grad()
def edge_weight_map(x: torch.Tensor, strength: float = 4.0) -> torch.Tensor:
    """Per-pixel weight 1 + strength·edges(x), (B, 1, H, W), for a target image x (B, C, H, W).

    edges is the gradient magnitude from finite differences, normalized to a maximum of 1 per
    image (a flat image gets weight 1 everywhere). Each pixel takes the larger of the differences
    to its two neighbours along each axis, so both sides of an edge and one-pixel-wide tips count.
    """
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()  # (B, C, H, W-1): between columns j and j+1
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()  # (B, C, H-1, W)
    gx = torch.maximum(F.pad(dx, (0, 1)), F.pad(dx, (1, 0)))  # (B, C, H, W): right or left neighbour
    gy = torch.maximum(F.pad(dy, (0, 0, 0, 1)), F.pad(dy, (0, 0, 1, 0)))
    magnitude = (gx.pow(2) + gy.pow(2)).sum(dim=1, keepdim=True).sqrt()  # (B, 1, H, W)
    edges = magnitude / magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    return 1.0 + strength * edges


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, edge_strength: float = 4.0) -> torch.Tensor:
    """Scalar mean over all pixels and channels of weight·(|x − recon| + (x − recon)²),
    with weight = edge_weight_map(x, edge_strength) computed from the target only."""
    weight = edge_weight_map(x, edge_strength)  # (B, 1, H, W), broadcast over channels
    diff = recon - x
    return (weight * (diff.abs() + diff.pow(2))).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, pix2pix ``NLayerDiscriminator``): n_layers
    stride-2 4×4 convs with LeakyReLU(0.2), one stride-1 conv, then a 1-channel conv, so each
    output logit judges one overlapping patch. Returns logits (B, 1, h, w).

    norm: "batch" (the reference), "group" or "none", after every conv but the first and last.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")

        def normed(ch_in: int, ch_out: int, stride: int) -> list[nn.Module]:
            # A conv followed by a norm needs no bias of its own.
            conv = nn.Conv2d(ch_in, ch_out, 4, stride, 1, bias=norm == "none")
            if norm == "batch":
                layer = nn.BatchNorm2d(ch_out)
            elif norm == "group":
                layer = normalization(ch_out)
            else:
                layer = nn.Identity()
            return [conv, layer, nn.LeakyReLU(0.2)]

        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for n in range(1, n_layers):
            out = base_channels * min(2**n, 8)
            layers += normed(ch, out, stride=2)
            ch = out
        out = base_channels * min(2**n_layers, 8)
        layers += normed(ch, out, stride=1)
        layers.append(nn.Conv2d(out, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    # pix2pix init: conv ~ N(0, 0.02), norm scale ~ N(1, 0.02), norm shift 0.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ½·(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (decoder's) adversarial loss −E[D(x̂)]."""
    return -logits_fake.mean()


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, max_weight] and detached, with L the
    decoder's last layer (Esser et al. 2021, "Taming Transformers", Eq. 7). Both losses must
    still have their graphs; they are kept (retain_graph) for the caller's backward."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
