"""Which tokens the search may place in an instruction, as boolean masks over a tokenizer's vocabulary."""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizerBase

_WORD_TOKEN = re.compile(r"[A-Za-z ]+")
_LETTERS = re.compile(r"[A-Za-z]+")


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, mode: str) -> torch.Tensor:
    """Tokens the search may place in an instruction.

    ``"words"``: ASCII letters and spaces, plus exactly "." and "," (the paper's filter);
    ``"whole_words"``: those, less the letter tokens without a leading space that the tokenizer does
    not also hold as a space-led word (so "Use" stays, the fragment "ermat" goes; the search keeps
    the remaining word pieces off every position but the first, see :func:`word_piece_tokens`);
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
        if mode in ("words", "whole_words"):
            mask[i] = bool(_WORD_TOKEN.fullmatch(text)) or text in (".", ",")
            if mode == "whole_words" and mask[i] and _LETTERS.fullmatch(text):
                mask[i] = len(tokenizer.encode(" " + text, add_special_tokens=False)) == 1
        elif mode == "ascii":
            mask[i] = text.isascii() and text.isprintable()
        else:
            mask[i] = True
    return mask


def leading_space_tokens(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokens whose text starts with whitespace."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([t[:1].isspace() for t in texts], dtype=torch.bool)


def word_piece_tokens(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokens of letters alone without a leading space: placed after a word, they extend it."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([bool(_LETTERS.fullmatch(t)) for t in texts], dtype=torch.bool)
