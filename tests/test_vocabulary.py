"""dspy_greater.engine.vocabulary on tokenizers of both kinds: the embedded model's byte-level BPE,
and a SentencePiece-style BPE built here like Llama-2's (a dummy word-start prefix on every text
encoded, and a decoder that strips the first space), since no such model can be fetched."""

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.engine.vocabulary import allowed_tokens, continuation_encoder, position_tokens, token_texts

TEXTS = ["Yes", " the answer", "answer", "\n\nUse the options.", "step, then", "(A)", "é 日本", "  two", "\tx"]


def _sentencepiece_like(normalized: bool):
    """A small BPE with byte fallback, built like Llama-2's tokenizer.json: "▁" marks a word start
    and is put before every text encoded (by a ``Prepend`` normalizer, as Llama-2 and TinyLlama
    have it, or by the ``Metaspace`` pre-tokenizer, as later conversions do), and the decoder strips
    the first space of what it decodes."""
    import json

    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    text = ["Let's think step by step, then state the answer.\n", "Use the options (A) (B) to answer the question.\n",
            "Yes or no?\n\nQ: which way? [INST] [/INST]"] * 20
    trainer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    vocab = trainer.get_vocab()
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer.to_str())["model"]["merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    if normalized:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<unk>")
    tokenizer.chat_template = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"
    return tokenizer


@pytest.fixture(scope="module", params=["prepend_normalizer", "metaspace"])
def legacy(request):
    return _sentencepiece_like(normalized=request.param == "prepend_normalizer")


def _plain(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_token_texts_keep_the_space_a_legacy_decoder_strips(legacy):
    the = legacy.convert_tokens_to_ids("▁the")
    assert legacy.decode([the]) == "the"  # the decoder strips the space of a token alone
    texts = token_texts(legacy)
    assert texts[the] == " the"
    st, ep = legacy.convert_tokens_to_ids(["st", "ep"])  # pieces inside a word: no space
    assert (texts[st], texts[ep]) == ("st", "ep")
    words, whole = (allowed_tokens(legacy, mode, texts) for mode in ("words", "whole_words"))
    assert words[ep] and not whole[ep]  # "▁ep" is not in the vocabulary: a fragment
    assert whole[st] and whole[the]  # "▁st" is: "st" can start a word
    assert not words[legacy.convert_tokens_to_ids("<s>")]
    byte_a = legacy.convert_tokens_to_ids("<0x41>")  # "A" by byte fallback: not a token its text encodes to
    assert texts[byte_a] == "A" and not words[byte_a] and allowed_tokens(legacy, "all", texts)[byte_a]
    assert not position_tokens(words, texts, "words", first=True)[the]  # no space-led first token


def test_continuation_encoder_drops_the_dummy_prefix(legacy):
    encode, newline = continuation_encoder(legacy), _plain(legacy, "\n")
    assert legacy.decode(newline + _plain(legacy, "answer")) == "\n answer"  # what plain encoding inserts
    for text in TEXTS:
        assert legacy.decode(newline + encode(text)) == "\n" + text, text
    assert encode("") == []


def test_continuation_encoder_is_plain_encoding_on_a_byte_level_tokenizer(optimizer):
    tokenizer = optimizer[1]
    encode = continuation_encoder(tokenizer)
    for text in TEXTS:
        assert encode(text) == _plain(tokenizer, text), text


def test_layout_sequence_reads_as_the_whole_text_on_a_legacy_tokenizer(legacy):
    layout = GreaterLayout(legacy)
    instruction = layout.encode_instruction("Use the options.")
    sequence = layout.full("Q: which way?", instruction, _plain(legacy, "Let's think"), layout.encode("\nthe answer"),
                           layout.encode(" (A)"))
    whole = "<s>[INST] Q: which way?\n\nUse the options. [/INST] Let's think\nthe answer (A)"
    assert legacy.decode(sequence.ids) == legacy.decode(_plain(legacy, whole))  # reads as the whole text
    assert legacy.decode(sequence.ids[sequence.instruction_start:sequence.instruction_end]) == "Use the options."
    texts = token_texts(legacy)
    assert not texts[instruction[0]][:1].isspace()  # the search's first-position rule holds for the start


def test_a_search_runs_on_a_legacy_tokenizer_model(legacy):
    """A 2-layer random-weight Llama over the legacy tokenizer: two steps run, and the proposals
    for the first position (the current token included) start with no space."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dspy_greater.data import load_examples
    from dspy_greater.engine.config import GreaterConfig
    from dspy_greater.engine.extractor import derive_extractor
    from dspy_greater.engine.model import OptimizerLM
    from dspy_greater.engine.search import GreaterSearch, SearchExample

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(legacy), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval().requires_grad_(False)
    rows = load_examples("navigate")[:5]
    extractor = derive_extractor("answer", None, [r.answer for r in rows], [r.question for r in rows])
    examples = [SearchExample(r.question, extractor.canonical(r.answer)) for r in rows]
    config = GreaterConfig(num_steps=2, batch_size=3, max_reasoning_tokens=4, eval_every=1, seed=0)
    search = GreaterSearch(OptimizerLM(model, legacy, batch_size=4), GreaterLayout(legacy), extractor, config)
    result = search.run("Use the options.", examples[:3], examples[3:])
    assert len(result.trace) == 2 and result.best_instruction
    texts = token_texts(legacy)
    proposed = search.propose(search.layout.encode_instruction("Use the options."), 0, examples[:3],
                              random.Random(0))
    assert proposed and not any(texts[t][:1].isspace() for t in proposed)
