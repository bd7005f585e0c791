"""A tokenizer for plugins whose condition is a string: a SentencePiece model (Kudo & Richardson
2018) fitted to the strings of the data source and cached by a hash of the string set, so every run
on the same data reuses it (and rebuilding a trained model finds the very tokenizer it was trained
with). Shared by plugins through the core, since no plugin imports another.

Token ids: 0 unknown, 1 begin, 2 end, 3 pad; a string becomes ``[begin, pieces..., end, pad...]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch

log = logging.getLogger(__name__)
UNK, BEGIN, END, PAD = 0, 1, 2, 3


def strings_key(strings: Iterable[str], settings: dict) -> tuple[list[str], str]:
    """The sorted distinct strings, and a hash of them with the fitting settings."""
    distinct = sorted(set(strings))
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for string in distinct:
        h.update(string.encode())
        h.update(b"\0")
    return distinct, h.hexdigest()[:24]


def fit_sentencepiece(strings: list[str], vocab_size: int, model_type: str) -> bytes:
    """Train a SentencePiece model on ``strings`` (in this order); returns its serialized proto.
    Deterministic: the same strings and settings give the same bytes."""
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(strings), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        hard_vocab_limit=False,  # a small closed vocabulary has fewer pieces than vocab_size
        character_coverage=1.0, unk_id=UNK, bos_id=BEGIN, eos_id=END, pad_id=PAD, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Tokenizer:
    """A SentencePiece model with fixed-length encoding; copies and pickles as its bytes."""

    def __init__(self, model_proto: bytes, source: str = "memory"):
        self.model_proto = model_proto
        self.source = source  # where it came from, for logs
        self.digest = hashlib.sha256(model_proto).digest()  # 32 bytes
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)

    def __getstate__(self):
        return {"model_proto": self.model_proto, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["source"])

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    def encode(self, strings: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, length) int64, keep (B, length) bool: False on padding). Strings longer
        than ``length - 2`` pieces are cut, keeping the end token."""
        tokens = torch.full((len(strings), length), PAD, dtype=torch.int64)
        for row, pieces in enumerate(self._processor.encode(list(strings))):
            ids = [BEGIN, *pieces[: length - 2], END]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens, tokens != PAD

    def pieces(self, string: str) -> list[str]:
        return self._processor.encode(string, out_type=str)


def obtain_tokenizer(strings: Iterable[str], vocab_size: int, model_type: str, cache_dir: str | Path | None) -> Tokenizer:
    """The tokenizer of this set of strings: read from ``cache_dir/tokenizers`` when fitted before,
    otherwise fitted now (and written there when a cache folder is given)."""
    settings = {"kind": "sentencepiece", "vocab_size": vocab_size, "model_type": model_type}
    distinct, key = strings_key(strings, settings)
    if not distinct:
        raise ValueError("cannot fit a tokenizer: the data source gave no strings")
    path = Path(cache_dir).expanduser() / "tokenizers" / f"sentencepiece-{key}.model" if cache_dir else None
    if path is not None and path.is_file():
        return Tokenizer(path.read_bytes(), source=str(path))
    tokenizer = Tokenizer(fit_sentencepiece(distinct, vocab_size, model_type))
    if path is not None:
        try:
            _write_atomic(path, tokenizer.model_proto)
            tokenizer.source = str(path)
        except OSError as error:  # a read-only cache costs a refit next time, nothing else
            log.warning("could not cache the tokenizer at %s: %s", path, error)
    log.info("fitted a %s tokenizer (%d pieces) on %d distinct strings", model_type, tokenizer.vocab_size, len(distinct))
    return tokenizer
