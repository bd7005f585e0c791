"""The ``palette`` condition: the set of colours present in an image, as a vector condition.

No data source yields a palette: the plugin derives it from the objects' class labels
(``box_labels``), whose class names read "<colour> <thing>" ("red circle" in the shapes world).
A user gives a palette as a list of colour names; it arrives as the batch key ``palette``, which
the plugin reads in preference to the labels.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ldmcore.conditioning import ConditionEncoder
from ldmcore.hookspecs import hookimpl

NAME = "palette"
KEY = "palette"  # a user's palette: B x K multi-hot over the data's K colours
SOURCE_KEY = "box_labels"  # what the data source yields: each sample's object class labels


def colour_table(data) -> tuple[tuple[str, ...], torch.Tensor]:
    """The data's colour names (first-seen order) and the colour index of each class label."""
    if not data.class_names:
        raise ValueError(f"the palette condition needs class names of the form '<colour> <thing>'; "
                         f"the data source {data.name} has none")
    of_class = [name.split()[0] for name in data.class_names]
    colours = tuple(dict.fromkeys(of_class))
    return colours, torch.tensor([colours.index(c) for c in of_class])


def palette_of(batch: Mapping, colour_of: torch.Tensor, num_colours: int) -> torch.Tensor:
    """The batch's palettes, B x K float multi-hot (1 = the colour is present): the user's
    ``palette`` where the batch has one, else derived from the objects' labels."""
    if KEY in batch:
        return torch.stack([torch.as_tensor(p, dtype=torch.float32) for p in batch[KEY]])  # (B, K)
    palettes = torch.zeros(len(batch[SOURCE_KEY]), num_colours)  # (B, K)
    for palette, labels in zip(palettes, batch[SOURCE_KEY]):
        palette[colour_of[torch.as_tensor(labels, dtype=torch.long).cpu()]] = 1.0
    return palettes


class PaletteEncoder(ConditionEncoder):
    """tau_theta: palette (B x K) -> vector (B x D). The first linear layer sums one learned
    embedding per colour present, so the encoding is a function of the set, not of an order.
    The null condition ("no palette given") is a learned vector of its own."""

    def __init__(self, colour_of: torch.Tensor, num_colours: int, embed_dim: int):
        super().__init__()
        self.colour_of, self.num_colours = colour_of, num_colours
        self.mlp = nn.Sequential(nn.Linear(num_colours, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.null_vector = nn.Parameter(0.02 * torch.randn(embed_dim))
        self.outputs = {"vector": (embed_dim,)}

    def forward(self, batch: Mapping) -> dict[str, torch.Tensor]:
        palettes = palette_of(batch, self.colour_of, self.num_colours).to(self.null_vector.device)
        return {"vector": self.mlp(palettes)}  # (B, D)

    def null(self, batch_size, latent_size, device):
        return {"vector": self.null_vector.expand(batch_size, -1)}  # (B, D)


@hookimpl
def ldmcore_condition_name():
    return NAME


@hookimpl
def ldmcore_config_dir():
    return str(Path(__file__).parent / "conf")


@hookimpl
def ldmcore_batch_keys():
    return [SOURCE_KEY]


@hookimpl
def ldmcore_build_encoder(options, data):
    colours, colour_of = colour_table(data)
    return PaletteEncoder(colour_of, len(colours), int(options.embed_dim))


@hookimpl
def ldmcore_parse_value(value, data):
    """``["red", "blue"]`` -> ``{"palette": tensor([1, 0, 1, 0, 0, 0])}``."""
    colours, _ = colour_table(data)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'a palette is a list of colour names, e.g. ["red", "blue"]; got {value!r}')
    unknown = sorted(set(value) - set(colours))
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown}; known colours: {', '.join(colours)}")
    palette = torch.zeros(len(colours))
    palette[[colours.index(v) for v in value]] = 1.0
    return {KEY: palette}


@hookimpl
def ldmcore_format_value(batch, index, data):
    colours, colour_of = colour_table(data)
    palette = palette_of(batch, colour_of, len(colours))[index]
    return [colour for colour, present in zip(colours, palette.tolist()) if present]


@hookimpl
def ldmcore_grid_conditions(rows, columns, data):
    """One palette per row: each colour alone, then pairs of colours, ``rows`` rows at most."""
    colours, _ = colour_table(data)
    palettes = [p for size in (1, 2) for p in itertools.combinations(range(len(colours)), size)][:rows]
    batch = torch.zeros(len(palettes) * columns, len(colours))  # (rows * columns, K), row-major
    for row, palette in enumerate(palettes):
        batch[row * columns:(row + 1) * columns, list(palette)] = 1.0
    return {KEY: batch}, [" + ".join(colours[i] for i in palette) for palette in palettes]


@hookimpl
def ldmcore_score(images, batch, data):
    """Faithfulness read back by the data's exact reader: ``palette_accuracy``, the share of images
    whose colours are exactly the palette, and ``palette_iou``, the mean Jaccard index of the two
    colour sets. Every component the reader gives a colour counts, whatever its shape."""
    if data.reader is None:
        return {}
    colours, colour_of = colour_table(data)
    wanted = palette_of(batch, colour_of, len(colours)).bool()  # (B, K)
    found = torch.zeros_like(wanted)
    for row, objects in zip(found, data.reader.read_batch(images)):
        for obj in objects:
            if obj.color in colours:
                row[colours.index(obj.color)] = True
    union = (wanted | found).sum(1)
    iou = torch.where(union > 0, (wanted & found).sum(1) / union.clamp(min=1), 1.0)  # two empty sets agree
    return {"palette_accuracy": (wanted == found).all(1).float().mean().item(), "palette_iou": iou.mean().item()}
