"""A tokenizer's vocabulary as the search sees it: each token's text, which tokens the search may
place in an instruction (boolean masks over the vocabulary), and text encoded as it reads inside a
sequence."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

_WORD_TOKEN = re.compile(r"[A-Za-z ]+")
_LETTERS = re.compile(r"[A-Za-z]+")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback


def continuation_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], list[int]]:
    """A function giving the token ids of a text as it reads after other text (no special tokens).

    SentencePiece tokenizers with a dummy prefix (Llama-2, Mistral, TinyLlama) mark the start of
    every text they encode as a word start: "Yes" alone encodes as " Yes". For those the text is
    encoded after a newline (or, where the text merges into that, a space) whose tokens are then
    cut off; other tokenizers encode it as is.
    """

    def plain(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    newline = plain("\n")
    if plain("\nb")[len(newline):] == plain("b"):  # a word after a newline encodes as it does alone
        return plain
    anchors = [(anchor, plain(anchor)) for anchor in ("\n", " ")]

    def after_anchor(text: str) -> list[int]:
        for anchor, anchor_ids in anchors:  # the first whose tokens the text does not merge into
            joined = plain(anchor + text)
            if text and joined[: len(anchor_ids)] == anchor_ids:
                return joined[len(anchor_ids):]
        return plain(text)

    return after_anchor


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each token's text as it reads inside a text, leading space included.

    Each token is decoded after an anchor token and the anchor's text cut off: SentencePiece
    tokenizers of the legacy (Llama-2) kind strip a leading space from the start of what they decode,
    so a token decoded alone would never show one.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    lead = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    pairs = tokenizer.batch_decode([[*anchor, i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    alone = lambda i: tokenizer.decode([i], clean_up_tokenization_spaces=False)  # noqa: E731
    return [pair[len(lead):] if anchor and pair.startswith(lead) else alone(i) for i, pair in enumerate(pairs)]


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, mode: str, texts: list[str] | None = None) -> torch.Tensor:
    """Tokens the search may place in an instruction.

    ``"words"``: ASCII letters and spaces, plus exactly "." and "," (the paper's filter);
    ``"whole_words"``: those, less the letter tokens without a leading space that the tokenizer does
    not also hold as a space-led word (so "Use" stays, the fragment "ermat" goes; the remaining word
    pieces stay off every position but the first, see :func:`position_tokens`);
    ``"ascii"``: printable ASCII; ``"all"``: every non-special token. Special tokens and tokens
    that decode to nothing or to part of a character are never allowed, byte-fallback tokens
    (``<0x41>``) only under ``"all"``. ``texts``: the tokenizer's :func:`token_texts`, when
    already at hand.
    """
    size = len(tokenizer)
    texts = token_texts(tokenizer) if texts is None else texts
    space_led = {text for text in texts if text[:1] == " "}
    excluded = set(tokenizer.all_special_ids)
    excluded |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    if mode != "all":  # a byte token's text encodes back to another token: it would not round-trip
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        excluded |= {i for i, piece in enumerate(pieces) if isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece)}
    mask = torch.zeros(size, dtype=torch.bool)
    for i, text in enumerate(texts):
        if i in excluded or not text or "\ufffd" in text:
            continue
        if mode in ("words", "whole_words"):
            mask[i] = bool(_WORD_TOKEN.fullmatch(text)) or text in (".", ",")
            if mode == "whole_words" and mask[i] and _LETTERS.fullmatch(text):
                mask[i] = " " + text in space_led
        elif mode == "ascii":
            mask[i] = text.isascii() and text.isprintable()
        else:
            mask[i] = True
    return mask


def position_tokens(allowed: torch.Tensor, texts: list[str], mode: str, *, first: bool) -> torch.Tensor:
    """``allowed`` (of :func:`allowed_tokens` in ``mode``) narrowed for one instruction position.

    The first position takes no token whose text (of :func:`token_texts`) starts with whitespace:
    the layout already separates the instruction, so its text round-trips. Under ``"whole_words"``
    a later position takes no word piece (letters without a leading space), which would glue onto
    the word before.
    """
    if first:
        return allowed & ~torch.tensor([t[:1].isspace() for t in texts], dtype=torch.bool)
    if mode == "whole_words":
        return allowed & ~torch.tensor([bool(_LETTERS.fullmatch(t)) for t in texts], dtype=torch.bool)
    return allowed
