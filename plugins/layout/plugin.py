"""The ``layout`` condition plugin: labelled boxes, encoded by tau_theta into cross-attention tokens.

As the paper's layout-to-image model (Rombach et al. 2022, Sec. 4.3.1, App. E.2): each object is
(class, top-left, bottom-right) tokens on a quantized grid (``tokens.py``), and a transformer
trained jointly with the denoiser turns the sequence into the cross-attention context.
Layouts need multi-object scenes: this plugin's config switches the data to ``shapes_multi``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldmcore.conditioning import REGIONS, ConditionEncoder
from ldmcore.hookspecs import hookimpl
from ldmcore.nn.sequence import SequenceTransformer

from .tokens import LayoutVocabulary, format_layout, parse_layout

NAME = "layout"
KEYS = ("boxes", "box_labels")
NULLS = ("empty", "zeros")


class LayoutEncoder(ConditionEncoder):
    """Boxes and labels -> tokens (B, 1 + 3·max_objects) -> transformer -> (B, L, embed_dim)."""

    needs_positions = True  # tokens name places: the denoiser gets coordinate channels to match them

    def __init__(self, vocabulary: LayoutVocabulary, embed_dim: int, depth: int, num_heads: int, null: str = "empty",
                 corner_frequencies: int = 0, regions: bool = False, class_embedding: bool = False,
                 labels: bool = True):
        super().__init__()
        # labels=False: boxes only. Every object's class token is the one token of a one-class
        # vocabulary (an "object"), so the layout says where objects are and not what they are.
        if not labels and vocabulary.num_classes != 1:
            raise ValueError("condition.layout.labels=false needs a vocabulary of one class (an unlabelled object), "
                             f"got {vocabulary.num_classes}")
        self.labels = labels
        # Each object's tokens apply inside its box: the denoiser's cross-attention gets that prior
        # (ldmcore.nn.attention, "Token regions"); without it the model must learn the binding alone.
        self.token_regions = (vocabulary.bins, vocabulary.bins) if regions else None
        if null not in NULLS:
            raise ValueError(f"condition.layout.null_condition must be one of {', '.join(NULLS)}, got {null!r}")
        if corner_frequencies < 0:
            raise ValueError(f"condition.layout.corner_frequencies must be >= 0, got {corner_frequencies}")
        self.vocabulary, self.null_kind = vocabulary, null
        self.transformer = SequenceTransformer(vocabulary.size, vocabulary.length, embed_dim, depth, num_heads)
        # Fixed Fourier features of each corner's position, projected and added to its learned embedding.
        self.register_buffer("corner_table", vocabulary.corner_features(corner_frequencies), persistent=False)
        self.corner_projection = nn.Linear(4 * corner_frequencies, embed_dim) if corner_frequencies else None
        # A learned embedding of each object's class added to its three output tokens: inside a box the
        # denoiser's cross-attention reads the object's tokens, and every one of them then names the class.
        self.class_embedding = nn.Embedding(vocabulary.num_classes, embed_dim) if class_embedding else None
        self.outputs = {"crossattn": (vocabulary.length, embed_dim)}

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.transformer.position_embedding.device)
        extra = self.corner_projection(self.corner_table[tokens]) if self.corner_projection is not None else None
        out = self.transformer(tokens, tokens != self.vocabulary.pad, extra)  # (B, L, D)
        if self.class_embedding is not None:
            out = out + self.object_classes(tokens)
        return out

    def object_classes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D): each object's class embedding at its three slots, zeros at start and padding."""
        labels = tokens[:, 1::3]  # (B, max_objects): the class token of each object slot, or pad
        present = (labels < self.vocabulary.num_classes).unsqueeze(-1)
        per_object = self.class_embedding(labels.clamp(max=self.vocabulary.num_classes - 1)) * present  # (B, M, D)
        return torch.cat([torch.zeros_like(per_object[:, :1]), per_object.repeat_interleave(3, dim=1)], dim=1)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        labels = batch["box_labels"]
        if not self.labels:  # every object is the one unlabelled class
            labels = [torch.zeros(len(torch.as_tensor(l).reshape(-1)), dtype=torch.int64) for l in labels]
        out = {"crossattn": self.encode_tokens(self.vocabulary.encode_batch(batch["boxes"], labels))}
        if self.token_regions is not None:
            out[REGIONS] = self.vocabulary.regions_batch(batch["boxes"]).to(out["crossattn"].device)
        return out

    def null(self, batch_size, latent_size, device):
        """``empty``: the learned encoding of a layout without objects; ``zeros``: zeros."""
        if self.null_kind == "zeros":
            return super().null(batch_size, latent_size, device)
        empty = self.encode_tokens(self.vocabulary.encode(torch.zeros(0, 4), torch.zeros(0))[None])  # (1, L, D)
        out = {"crossattn": empty.expand(batch_size, *empty.shape[1:])}
        if self.token_regions is not None:  # no boxes: every token everywhere
            out[REGIONS] = torch.ones(batch_size, self.vocabulary.length, *self.token_regions, device=empty.device)
        return out


def _class_names(data) -> tuple[str, ...]:
    if not data.class_names:
        raise ValueError(f"the layout condition needs a data source with class names; {data.name} has none")
    return data.class_names


@hookimpl
def ldmcore_condition_name():
    return NAME


@hookimpl
def ldmcore_config_dir():
    return str(Path(__file__).parent / "conf")


@hookimpl
def ldmcore_batch_keys():
    return list(KEYS)


@hookimpl
def ldmcore_build_encoder(options, data):
    labels = bool(options.get("labels", True))
    num_classes = len(_class_names(data)) if labels else 1
    vocabulary = LayoutVocabulary(num_classes, int(options.bins), int(options.max_objects))
    return LayoutEncoder(vocabulary, int(options.embed_dim), int(options.depth), int(options.num_heads), str(options.null_condition),
                         int(options.get("corner_frequencies", 0)), bool(options.get("regions", False)),
                         bool(options.get("class_embedding", False)), labels)


@hookimpl
def ldmcore_parse_value(value, options, data):
    boxes, labels = parse_layout(value, _class_names(data), int(options.max_objects),
                                 labels_required=bool(options.get("labels", True)))
    return {"boxes": boxes, "box_labels": labels}


@hookimpl
def ldmcore_format_value(batch, index, data):
    return format_layout(batch["boxes"][index], batch["box_labels"][index], _class_names(data))


def box_recalls(objects, batch, data, match_labels: bool = True) -> list[float]:
    """Per sample: the share of its boxes matched by one of its read-back ``objects`` with IoU >= 0.5
    (of the same label unless ``match_labels`` is false)."""
    return [data.reader.box_recall(objs, boxes, labels, data.resolution, match_labels=match_labels)
            for objs, boxes, labels in zip(objects, batch["boxes"], batch["box_labels"])]


@hookimpl
def ldmcore_sample_success(images, batch, data):
    """A layout is followed when every one of its boxes is recalled."""
    if data.reader is None:
        return None
    return [recall == 1.0 for recall in box_recalls(data.reader.read_batch(images), batch, data)]


@hookimpl
def ldmcore_score(images, batch, data):
    """Box recall: the share of target boxes matched by a read-back object of the same label
    with IoU >= 0.5, averaged over samples; box placement: the same with any label (whether the
    boxes are followed at all, the whole of what an unlabelled layout, ``labels=false``, asks)."""
    if data.reader is None:
        return {}
    objects = data.reader.read_batch(images)  # read once, scored twice
    recalls = box_recalls(objects, batch, data)
    placed = box_recalls(objects, batch, data, match_labels=False)
    return {"box_recall": sum(recalls) / max(len(recalls), 1), "box_placement": sum(placed) / max(len(placed), 1)}
