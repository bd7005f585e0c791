"""The ``text`` condition plugin: a caption, encoded by tau_theta into cross-attention tokens.

Learned path (default), as the paper's text-to-image LDM (Rombach et al. 2022, Sec. 4.3.1): a
transformer trained jointly with the denoiser, over the pieces of a SentencePiece tokenizer fitted
to the data source's captions. Pretrained path: a frozen encoder from a local Hugging Face folder.
Captions need multi-object scenes: this plugin's config switches the data to ``shapes_multi``.
"""

from __future__ import annotations

from pathlib import Path

from ldmcore.hookspecs import hookimpl

from ldmcore.nn.string_encoders import LearnedStringEncoder, PretrainedStringEncoder
from ldmcore.nn.tokenizer import obtain_tokenizer

NAME = "text"
KEY = "caption"
ENCODERS = ("learned", "pretrained")


@hookimpl
def ldmcore_condition_name():
    return NAME


@hookimpl
def ldmcore_config_dir():
    return str(Path(__file__).parent / "conf")


@hookimpl
def ldmcore_batch_keys():
    return [KEY]


@hookimpl
def ldmcore_build_encoder(options, data, cache_dir):
    """The learned encoder (its tokenizer fitted to the data's captions, cached under ``cache_dir``) or
    the pretrained one. Captions order their objects left to right, so the encoder declares
    ``needs_positions``: the denoiser gets coordinate channels to place them."""
    kind = str(options.encoder)
    if kind == "pretrained":
        if not options.pretrained:
            raise ValueError("condition.text.encoder=pretrained needs condition.text.pretrained=PATH, a local Hugging Face folder")
        encoder = PretrainedStringEncoder(str(Path(str(options.pretrained)).expanduser()), int(options.max_length),
                                          str(options.null_condition), key=KEY, option="condition.text")
    elif kind == "learned":
        if data.values is None:
            raise ValueError(f"the learned text encoder fits its tokenizer to the data's captions, but the data source "
                             f"{data.name} cannot list them (DataInfo.values is None); use condition.text.encoder=pretrained")
        captions = data.values(KEY, int(options.tokenizer_captions))
        tokenizer = obtain_tokenizer(captions, int(options.vocab_size), str(options.tokenizer_type), cache_dir)
        encoder = LearnedStringEncoder(tokenizer, int(options.vocab_size), int(options.max_length), int(options.embed_dim),
                                       int(options.depth), int(options.num_heads), str(options.null_condition), key=KEY,
                                       option="condition.text", token_embedding=bool(options.get("token_embedding", False)),
                                       position_embedding=bool(options.get("position_embedding", False)))
    else:
        raise ValueError(f"condition.text.encoder must be one of {', '.join(ENCODERS)}, got {kind!r}")
    encoder.needs_positions = True
    return encoder


@hookimpl
def ldmcore_parse_value(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a text condition is a non-empty caption string, e.g. \"a red circle and a blue square\"; got {value!r}")
    return {KEY: value}


@hookimpl
def ldmcore_format_value(batch, index):
    return str(batch[KEY][index])


def captions_correct(images, batch, data) -> list[bool]:
    """Per sample: every read-back object valid, and left to right they spell the caption."""
    objects = data.reader.read_batch(images)
    return [data.reader.caption_correct(objs, caption) for objs, caption in zip(objects, batch[KEY])]


@hookimpl
def ldmcore_sample_success(images, batch, data):
    return None if data.reader is None else captions_correct(images, batch, data)


@hookimpl
def ldmcore_score(images, batch, data):
    """Caption accuracy read back by the data's exact reader: every object valid, and left to
    right they spell the caption."""
    if data.reader is None:
        return {}
    correct = captions_correct(images, batch, data)
    scores = {"caption_accuracy": sum(correct) / max(len(correct), 1)}
    # By the number of objects named ("a, b and c": one more than the separators), and on captions
    # of 1-2 objects, where issue 3's bar is set.
    counts = [caption.count(",") + caption.count(" and ") + 1 for caption in batch[KEY]]
    for name, allowed in (("caption_accuracy_1_2", (1, 2)), *((f"caption_accuracy/{n}", (n,)) for n in sorted(set(counts)))):
        chosen = [ok for ok, n in zip(correct, counts) if n in allowed]
        if chosen:
            scores[name] = sum(chosen) / len(chosen)
    return scores
