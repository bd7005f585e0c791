"""The text condition's tau_theta: a transformer trained with the denoiser (the paper's
text-to-image LDM, Rombach et al. 2022, Sec. 4.3.1), or a frozen pretrained encoder read from a
local Hugging Face folder. Both map captions to ``crossattn`` tokens (B, max_length, D)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldmcore.conditioning import ConditionEncoder
from ldmcore.nn.sequence import SequenceTransformer

from .tokenizer import Tokenizer

NULLS = ("empty", "zeros")


def _check_null(null: str) -> None:
    if null not in NULLS:
        raise ValueError(f"condition.text.null_condition must be one of {', '.join(NULLS)}, got {null!r}")


class _CaptionEncoder(ConditionEncoder):
    """Shared by both paths: ``encode(captions)`` and the null condition."""

    def __init__(self, null: str):
        super().__init__()
        _check_null(null)
        self.null_kind = null

    def encode(self, captions: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch) -> dict[str, torch.Tensor]:
        captions = batch["caption"]
        if isinstance(captions, str):
            raise ValueError("batch key caption must be a list of strings, one per sample, not one string")
        return {"crossattn": self.encode(list(captions))}

    def null(self, batch_size, latent_size, device):
        """``empty``: the encoding of the empty caption (learned along with tau_theta on the
        learned path), as Stable Diffusion's unconditional context; ``zeros``: zeros."""
        if self.null_kind == "zeros":
            return super().null(batch_size, latent_size, device)
        empty = self.encode([""])  # (1, L, D)
        return {"crossattn": empty.expand(batch_size, *empty.shape[1:])}


class LearnedCaptionEncoder(_CaptionEncoder):
    """SentencePiece tokens -> :class:`SequenceTransformer`, trained jointly with the denoiser.

    The tokenizer is not a tensor, so the model keeps its SHA-256 as a buffer: loading weights
    trained with another tokenizer fails instead of silently reading other token ids.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_length: int, embed_dim: int, depth: int,
                 num_heads: int, null: str = "empty"):
        super().__init__(null)
        if max_length < 3:
            raise ValueError(f"condition.text.max_length must leave room for a piece between begin and end tokens, got {max_length}")
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than condition.text.vocab_size={vocab_size}")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.transformer = SequenceTransformer(vocab_size, max_length, embed_dim, depth, num_heads)
        self.register_buffer("tokenizer_digest", torch.tensor(list(tokenizer.digest), dtype=torch.uint8))
        self.register_load_state_dict_post_hook(_check_tokenizer)
        self.outputs = {"crossattn": (max_length, embed_dim)}

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        tokens, keep = self.tokenizer.encode(captions, self.max_length)  # 2 × (B, L)
        device = self.tokenizer_digest.device
        return self.transformer(tokens.to(device), keep.to(device))  # (B, L, D)


def _check_tokenizer(module: LearnedCaptionEncoder, incompatible_keys) -> None:
    loaded = bytes(module.tokenizer_digest.tolist())
    if loaded != module.tokenizer.digest:
        raise ValueError(
            "these weights were trained with another tokenizer (sha256 "
            f"{loaded.hex()[:16]}...) than the one rebuilt from the data ({module.tokenizer.digest.hex()[:16]}..., "
            f"from {module.tokenizer.source}); sample with the data config and cache the model was trained with"
        )


class PretrainedCaptionEncoder(_CaptionEncoder):
    """A frozen encoder (e.g. BERT) and its tokenizer from a local Hugging Face folder; its last
    hidden states are the tokens. Never downloads (``local_files_only``); never trained."""

    def __init__(self, path: str, max_length: int, null: str = "empty"):
        super().__init__(null)
        from transformers import AutoModel, AutoTokenizer  # heavy: imported only on this path

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"condition.text.pretrained={path!r} is not a local Hugging Face model folder "
                             f"with a tokenizer: {error}") from None
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.outputs = {"crossattn": (max_length, int(self.model.config.hidden_size))}

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: no dropout even while the denoiser trains
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        out = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
        return out.last_hidden_state  # (B, L, hidden)
