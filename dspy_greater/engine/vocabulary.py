"""Which tokens the search may place in an instruction, as boolean masks over a tokenizer's vocabulary."""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizerBase

_WORD_TOKEN = re.compile(r"[A-Za-z ]+")


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, mode: str) -> torch.Tensor:
    """Tokens the search may place in an instruction.

    ``"words"``: ASCII letters and spaces, plus exactly "." and "," (the paper's filter);
    ``"ascii"``: printable ASCII; ``"all"``: every non-special token. Special tokens and tokens
    that decode to nothing or to part of a character are never allowed.
    """
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    mask = torch.zeros(size, dtype=torch.bool)
    for i, text in enumerate(texts):
        if i in special or not text or "\ufffd" in text:
            continue
        if mode == "words":
            mask[i] = bool(_WORD_TOKEN.fullmatch(text)) or text in (".", ",")
        elif mode == "ascii":
            mask[i] = text.isascii() and text.isprintable()
        else:
            mask[i] = True
    return mask


def leading_space_tokens(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokens whose text starts with whitespace."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([t[:1].isspace() for t in texts], dtype=torch.bool)
