"""tau_theta for a condition given as a string (one per sample, under one batch key): a transformer
trained with the denoiser (the paper's text-to-image LDM, Rombach et al. 2022, Sec. 4.3.1), or a
frozen pretrained encoder read from a local Hugging Face folder. Both map strings to ``crossattn``
tokens (B, max_length, D). Plugins build them with their batch key and option prefix (for errors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldmcore.conditioning import ConditionEncoder
from ldmcore.nn.sequence import SequenceTransformer

from ldmcore.nn.tokenizer import Tokenizer

NULLS = ("empty", "zeros")


class _StringEncoder(ConditionEncoder):
    """Shared by both paths: ``encode(strings)`` of batch key ``key``, and the null condition.
    ``option`` is the plugin's config prefix (e.g. ``condition.text``), named in errors."""

    def __init__(self, null: str, key: str, option: str):
        super().__init__()
        if null not in NULLS:
            raise ValueError(f"{option}.null_condition must be one of {', '.join(NULLS)}, got {null!r}")
        self.null_kind, self.key, self.option = null, key, option

    def encode(self, strings: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch) -> dict[str, torch.Tensor]:
        strings = batch[self.key]
        if isinstance(strings, str):
            raise ValueError(f"batch key {self.key} must be a list of strings, one per sample, not one string")
        return {"crossattn": self.encode(list(strings))}

    def null(self, batch_size, latent_size, device):
        """``empty``: the encoding of the empty string (learned along with tau_theta on the
        learned path), as Stable Diffusion's unconditional context; ``zeros``: zeros."""
        if self.null_kind == "zeros":
            return super().null(batch_size, latent_size, device)
        empty = self.encode([""])  # (1, L, D)
        return {"crossattn": empty.expand(batch_size, *empty.shape[1:])}


class LearnedStringEncoder(_StringEncoder):
    """SentencePiece tokens -> :class:`SequenceTransformer`, trained jointly with the denoiser.

    The tokenizer is not a tensor, so the model keeps its SHA-256 as a buffer: loading weights
    trained with another tokenizer fails instead of silently reading other token ids.

    ``token_embedding``: a second learned embedding of each token (std 1) added to its output, so that
    every output token names its piece however much the layers mixed it with the others (the
    transformer's own embeddings start at std 0.02, and at initialization its outputs hardly depend
    on the token: docs/conditions.md, "Layout meets its bar").

    ``position_embedding``: a learned embedding of each position (std 1) added to its output as well, so
    every output token also says where in the string it stands. A caption names its objects in order
    ("a red circle and a blue square": the first object's pieces always stand at the same positions),
    and the piece embedding alone makes the two objects' colour tokens look alike to the denoiser
    whatever their order (docs/conditions.md, "Text meets its bar").
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_length: int, embed_dim: int, depth: int,
                 num_heads: int, null: str = "empty", key: str = "text", option: str = "condition",
                 token_embedding: bool = False, position_embedding: bool = False):
        super().__init__(null, key, option)
        if max_length < 3:
            raise ValueError(f"{option}.max_length must leave room for a piece between begin and end tokens, got {max_length}")
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than {option}.vocab_size={vocab_size}")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.transformer = SequenceTransformer(vocab_size, max_length, embed_dim, depth, num_heads)
        self.token_embedding = nn.Embedding(vocab_size, embed_dim) if token_embedding else None
        self.position_embedding = nn.Parameter(torch.randn(max_length, embed_dim)) if position_embedding else None
        self.register_buffer("tokenizer_digest", torch.tensor(list(tokenizer.digest), dtype=torch.uint8))
        self.register_load_state_dict_post_hook(_check_tokenizer)
        self.outputs = {"crossattn": (max_length, embed_dim)}

    def encode(self, strings: Sequence[str]) -> torch.Tensor:
        tokens, keep = self.tokenizer.encode(strings, self.max_length)  # 2 × (B, L)
        device = self.tokenizer_digest.device
        tokens = tokens.to(device)
        out = self.transformer(tokens, keep.to(device))  # (B, L, D)
        if self.token_embedding is not None:
            out = out + self.token_embedding(tokens)
        if self.position_embedding is not None:
            out = out + self.position_embedding
        return out


def _check_tokenizer(module: LearnedStringEncoder, incompatible_keys) -> None:
    loaded = bytes(module.tokenizer_digest.tolist())
    if loaded != module.tokenizer.digest:
        raise ValueError(
            "these weights were trained with another tokenizer (sha256 "
            f"{loaded.hex()[:16]}...) than the one rebuilt from the data ({module.tokenizer.digest.hex()[:16]}..., "
            f"from {module.tokenizer.source}); sample with the data config and cache the model was trained with"
        )


class PretrainedStringEncoder(_StringEncoder):
    """A frozen encoder (e.g. BERT) and its tokenizer from a local Hugging Face folder; its last
    hidden states are the tokens. Never downloads (``local_files_only``); never trained."""

    def __init__(self, path: str, max_length: int, null: str = "empty", key: str = "text", option: str = "condition"):
        super().__init__(null, key, option)
        from transformers import AutoModel, AutoTokenizer  # heavy: imported only on this path

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"{option}.pretrained={path!r} is not a local Hugging Face model folder "
                             f"with a tokenizer: {error}") from None
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.outputs = {"crossattn": (max_length, int(self.model.config.hidden_size))}

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: no dropout even while the denoiser trains
        return self

    @torch.no_grad()
    def encode(self, strings: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(strings), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        out = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
        return out.last_hidden_state  # (B, L, hidden)
