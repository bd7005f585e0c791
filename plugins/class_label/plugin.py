"""The ``class`` condition plugin.

tau_theta is a learned embedding table with one extra row, the null class, used for condition
dropout and classifier-free guidance (Ho & Salimans 2022). It feeds one cross-attention token,
as in the paper's class-conditional ImageNet LDM, or a vector added to the timestep embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldmcore.conditioning import ConditionEncoder
from ldmcore.hookspecs import hookimpl

NAME = "class"
INJECTIONS = ("crossattn", "vector")


class ClassEncoder(ConditionEncoder):
    def __init__(self, num_classes: int, embed_dim: int, injection: str = "crossattn"):
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"condition.class.injection must be one of {', '.join(INJECTIONS)}, got {injection!r}")
        self.num_classes = num_classes
        self.injection = injection
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)  # last row: the null class
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.outputs = {"crossattn": (1, embed_dim)} if injection == "crossattn" else {"vector": (embed_dim,)}

    def _shape(self, e: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"crossattn": e[:, None, :]} if self.injection == "crossattn" else {"vector": e}  # (B, 1, D) or (B, D)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        labels = torch.as_tensor(batch["class_label"], device=self.embedding.weight.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"batch key class_label holds values outside [0, {self.num_classes})")
        return self._shape(self.embedding(labels))

    def null(self, batch_size, latent_size, device):
        labels = torch.full((batch_size,), self.num_classes, device=self.embedding.weight.device)
        return self._shape(self.embedding(labels))


def _class_names(data) -> tuple[str, ...]:
    if not data.class_names:
        raise ValueError(f"the class condition needs a data source with class names; {data.name} has none")
    return data.class_names


@hookimpl
def ldmcore_condition_name():
    return NAME


@hookimpl
def ldmcore_config_dir():
    return str(Path(__file__).parent / "conf")


@hookimpl
def ldmcore_batch_keys():
    return ["class_label"]


@hookimpl
def ldmcore_build_encoder(options, data):
    return ClassEncoder(len(_class_names(data)), int(options.embed_dim), str(options.injection))


@hookimpl
def ldmcore_parse_value(value, data):
    names = _class_names(data)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a class is given by name or index, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise ValueError(f"class index {value} out of range [0, {len(names)})")
        return {"class_label": torch.tensor(value)}
    if value not in names:
        raise ValueError(f"unknown class {value!r}; known classes: {', '.join(names)}")
    return {"class_label": torch.tensor(names.index(value))}


@hookimpl
def ldmcore_format_value(batch, index, data):
    return _class_names(data)[int(batch["class_label"][index])]


@hookimpl
def ldmcore_grid_conditions(rows, columns, data):
    """One row per class (``rows`` is ignored: the grid has as many rows as classes)."""
    names = _class_names(data)
    labels = torch.arange(len(names)).repeat_interleave(columns)
    return {"class_label": labels}, list(names)


def classes_correct(images, batch, data) -> list[bool]:
    """Per sample: exactly one valid read-back object, of the class."""
    objects = data.reader.read_batch(images)
    labels = torch.as_tensor(batch["class_label"]).tolist()
    return [data.reader.class_correct(objs, label) for objs, label in zip(objects, labels)]


@hookimpl
def ldmcore_sample_success(images, batch, data):
    return None if data.reader is None else classes_correct(images, batch, data)


@hookimpl
def ldmcore_score(images, batch, data):
    """Class accuracy read back by the data's exact reader: exactly one valid object, of the class."""
    if data.reader is None:
        return {}
    correct = classes_correct(images, batch, data)
    labels = torch.as_tensor(batch["class_label"]).tolist()
    scores = {"class_accuracy": sum(correct) / max(len(correct), 1)}
    # Per-group accuracy (e.g. per shape), where class names are "<attribute> <group>".
    groups: dict[str, list[bool]] = {}
    for ok, label in zip(correct, labels):
        groups.setdefault(data.class_names[label].split()[-1], []).append(ok)
    if len(groups) > 1:
        scores.update({f"class_accuracy/{g}": sum(v) / len(v) for g, v in groups.items()})
    return scores
