"""The conditioner: runs each selected plugin's encoder tau_theta and routes its output by the
injection the plugin *declared* (never by a tensor's number of dimensions).

Routing (DESIGN.md, "Several conditions at once"):
    concat    B x C_i x h x w   stacked along channels       -> the denoiser's extra input channels
    crossattn B x L_i x D_i     concatenated along sequence  -> the cross-attention context
    vector    B x D_i           concatenated                 -> added to the timestep embedding
An encoder that says where its tokens apply (``token_regions``) also returns their region maps
under ``crossattn_regions``; they are concatenated along the sequence like the tokens (ones for
tokens without regions) and bias the cross-attention (``ldmcore.nn.attention``, "Token regions").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

INJECTIONS = ("concat", "crossattn", "vector")
REGIONS = "crossattn_regions"  # where each cross-attention token applies: (B, L, R_h, R_w) in [0, 1]
Conditioning = dict[str, torch.Tensor]  # keys among INJECTIONS (and REGIONS), batch first


class ConditionEncoder(nn.Module):
    """Base class of a plugin's tau_theta.

    Subclasses set ``outputs``: for each injection they feed, the per-sample shape they produce —
    ``{"crossattn": (L, D)}``, ``{"vector": (D,)}`` or ``{"concat": (C,)}`` (a concat output has
    the latent's spatial size) — and implement ``forward(batch) -> {injection: tensor}``.
    The default null condition is zeros; override ``null`` for a learned one.

    ``needs_positions``: True where the condition names places in the image through tokens (boxes,
    "left of ..."): the denoiser is then built with coordinate channels (``UNet.coordinate_frequencies``)
    unless the config sets their number. A spatially aligned (concat) condition does not need them.

    ``token_regions``: (R_h, R_w) where the condition knows where each of its tokens applies (a
    box): ``forward`` and ``null`` then also return ``crossattn_regions`` (B, L, R_h, R_w) in
    [0, 1] over the whole image, 1 where a token applies (a token about the whole image: 1
    everywhere). The default null's regions are ones: no spatial prior.
    """

    outputs: dict[str, tuple[int, ...]] = {}
    needs_positions: bool = False
    token_regions: tuple[int, int] | None = None

    def forward(self, batch: Mapping) -> Conditioning:  # pragma: no cover - abstract
        raise NotImplementedError

    def null(self, batch_size: int, latent_size: tuple[int, int], device: torch.device) -> Conditioning:
        """The condition meaning "absent", used for condition dropout and guidance."""
        out = {}
        for injection, shape in self.outputs.items():
            full = (batch_size, *shape, *latent_size) if injection == "concat" else (batch_size, *shape)
            out[injection] = torch.zeros(full, device=device)
        if self.token_regions is not None:
            out[REGIONS] = torch.ones(batch_size, self.outputs["crossattn"][0], *self.token_regions, device=device)
        return out


class FrozenReference:
    """A module an encoder uses but does not own (e.g. the run's first stage).

    Stored as a plain attribute it is not a submodule, so it stays out of the owner's
    ``parameters()``, ``state_dict()``, optimizer, EMA and checkpoints; ``deepcopy`` of the owner
    (the EMA copy) shares it instead of copying it, so every copy sees weights set later in place.
    ``__call__`` gives the module; use it under ``torch.no_grad()``.
    """

    def __init__(self, module: nn.Module):
        self._module = module

    def __call__(self) -> nn.Module:
        return self._module

    def __deepcopy__(self, memo: dict) -> "FrozenReference":
        return self


def check_outputs(name: str, encoder: ConditionEncoder) -> None:
    if not encoder.outputs:
        raise ValueError(f"condition {name!r}: its encoder declares no outputs (set .outputs, e.g. {{'crossattn': (L, D)}})")
    for injection, shape in encoder.outputs.items():
        if injection not in INJECTIONS:
            raise ValueError(f"condition {name!r} declares the injection {injection!r}; allowed: {', '.join(INJECTIONS)}")
        expected_rank = {"concat": 1, "crossattn": 2, "vector": 1}[injection]
        if len(shape) != expected_rank:
            raise ValueError(f"condition {name!r}: a {injection} output's shape must have {expected_rank} entries, got {shape}")
    if encoder.token_regions is not None and ("crossattn" not in encoder.outputs or len(encoder.token_regions) != 2):
        raise ValueError(f"condition {name!r}: token_regions must be (R_h, R_w) and needs a crossattn output, "
                         f"got {encoder.token_regions} with outputs {sorted(encoder.outputs)}")


class Conditioner(nn.Module):
    """Holds the selected plugins' encoders; applies condition dropout; builds null conditions.

    The derived sizes the denoiser is built from:
        concat_channels  extra input channels of the UNet
        context_dim      cross-attention context width (None: no cross-attention)
        vector_dim       width of the vector added to the timestep embedding (None: none)
        needs_positions  some encoder names positions through tokens (coordinate channels)
    """

    def __init__(self, encoders: Mapping[str, ConditionEncoder], dropout: Mapping[str, float]):
        super().__init__()
        for name, encoder in encoders.items():
            check_outputs(name, encoder)
            if not 0.0 <= dropout[name] <= 1.0:
                raise ValueError(f"condition.{name}.dropout must lie in [0, 1], got {dropout[name]}")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.dropout = dict(dropout)

        self.concat_channels = sum(e.outputs["concat"][0] for e in encoders.values() if "concat" in e.outputs)
        token_dims = {n: e.outputs["crossattn"][1] for n, e in encoders.items() if "crossattn" in e.outputs}
        self.context_dim = max(token_dims.values()) if token_dims else None
        vector_dims = [e.outputs["vector"][0] for e in encoders.values() if "vector" in e.outputs]
        self.vector_dim = sum(vector_dims) if vector_dims else None
        self.needs_positions = any(e.needs_positions for e in encoders.values())
        # Token regions of all plugins share the finest grid any of them declares (None: no regions).
        region_sizes = [e.token_regions for e in encoders.values() if e.token_regions is not None]
        self.region_size = max(region_sizes, key=lambda size: size[0] * size[1]) if region_sizes else None

        # Several token sequences share one context: narrower ones are projected to the widest,
        # and each plugin's tokens get a learned type embedding so attention can tell them apart.
        self.token_projections = nn.ModuleDict(
            {n: nn.Linear(d, self.context_dim) for n, d in token_dims.items() if d != self.context_dim}
        )
        self.token_types = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(self.context_dim)) for n in token_dims} if len(token_dims) > 1 else {}
        )

    @property
    def names(self) -> list[str]:
        return list(self.encoders)

    def forward(
        self,
        batch: Mapping,
        batch_size: int,
        latent_size: tuple[int, int],
        present: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        keep: Mapping[str, torch.Tensor] | None = None,
    ) -> Conditioning:
        """Encode ``batch`` into routed conditioning.

        present: the conditions given (default all); the others take their null condition.
        In training mode each present condition is replaced by its null with its own dropout
        probability, per sample: ``keep`` as drawn by ``draw_keep`` (rows of a larger batch's draw,
        for data-parallel shards and micro-batches), or drawn here from ``generator``.
        """
        present = set(self.names if present is None else present)
        unknown = present - set(self.names)
        if unknown:
            raise KeyError(f"conditions {sorted(unknown)} are not part of this model; it has {self.names}")
        device = next(itertools.chain(self.parameters(), self.buffers()), torch.empty(0)).device  # encoders may hold only buffers
        outputs: dict[str, Conditioning] = {}
        for name, encoder in self.encoders.items():
            null = encoder.null(batch_size, latent_size, device)
            if name not in present:
                outputs[name] = null
                continue
            encoded = encoder(batch)
            p = self.dropout[name]
            if self.training and p > 0:
                if keep is None:
                    keep = self.draw_keep(batch_size, generator)
                kept = keep[name].to(device)  # (B,)
                encoded = {k: torch.where(kept.view(-1, *[1] * (v.dim() - 1)), v, null[k]) for k, v in encoded.items()}
            outputs[name] = encoded
        return self.route(outputs)

    def null(self, batch_size: int, latent_size: tuple[int, int]) -> Conditioning:
        return self.forward({}, batch_size, latent_size, present=())

    def draw_keep(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Condition dropout for ``batch_size`` samples: per condition with a dropout rate, a
        (B,) bool that is True where the condition is kept (drawn on the generator's device)."""
        device = generator.device if generator is not None else None
        return {name: torch.rand(batch_size, generator=generator, device=device) >= p
                for name, p in self.dropout.items() if p > 0}

    def route(self, outputs: Mapping[str, Conditioning]) -> Conditioning:
        concat, tokens, vectors, regions = [], [], [], []
        for name, out in outputs.items():
            if "concat" in out:
                concat.append(out["concat"])
            if "crossattn" in out:
                t = out["crossattn"]
                if name in self.token_projections:
                    t = self.token_projections[name](t)
                if name in self.token_types:
                    t = t + self.token_types[name]
                tokens.append(t)
                if self.region_size is not None:
                    regions.append(self._regions(name, out, t.shape[:2]))
            if "vector" in out:
                vectors.append(out["vector"])
        routed: Conditioning = {}
        if concat:
            routed["concat"] = torch.cat(concat, dim=1)  # (B, sum C_i, h, w)
        if tokens:
            routed["crossattn"] = torch.cat(tokens, dim=1)  # (B, sum L_i, D)
        if regions:
            routed[REGIONS] = torch.cat(regions, dim=1)  # (B, sum L_i, R_h, R_w)
        if vectors:
            routed["vector"] = torch.cat(vectors, dim=1)  # (B, sum D_i)
        return routed

    def _regions(self, name: str, out: Conditioning, batch_length: torch.Size) -> torch.Tensor:
        """One plugin's token regions on the shared grid: its own (resized if coarser), or ones."""
        if self.encoders[name].token_regions is None:
            return out["crossattn"].new_ones(*batch_length, *self.region_size)
        if REGIONS not in out or out[REGIONS].shape[:2] != batch_length or out[REGIONS].dim() != 4:
            got = tuple(out[REGIONS].shape) if REGIONS in out else "none"
            raise ValueError(f"condition {name!r} declares token_regions, so its output needs {REGIONS!r} of shape "
                             f"(B, L, R_h, R_w) with (B, L) = {tuple(batch_length)}; got {got}")
        maps = out[REGIONS]
        if tuple(maps.shape[-2:]) != tuple(self.region_size):
            maps = F.interpolate(maps, size=self.region_size, mode="nearest")
        return maps


def apply_denoiser_net(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
    """Run the UNet on a noisy latent with routed conditioning (concat channels join the input)."""
    cond = cond or {}
    if "concat" in cond:
        z = torch.cat([z, cond["concat"]], dim=1)
    if REGIONS in cond:
        return unet(z, t, context=cond["crossattn"], y=cond.get("vector"), context_regions=cond[REGIONS])
    return unet(z, t, context=cond.get("crossattn"), y=cond.get("vector"))
