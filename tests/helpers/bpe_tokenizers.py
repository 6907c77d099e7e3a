"""Two real BPE tokenizers of different vocabularies trained on the same text, built in the test.

``byte_level_bpe`` is GPT-2/SmolLM2 style (``Ġ`` for spaces, no unknown byte); ``sentencepiece_bpe``
is Llama-2/Gemma style (``▁`` for spaces, ``<0xNN>`` byte fallback, a prepended space). Both are
``PreTrainedTokenizerFast`` objects that can be saved and loaded back with ``AutoTokenizer``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["CORPUS", "byte_level_bpe", "sentencepiece_bpe"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café — déjà vu!",
    "def add(x, y):\n    return x + y\n",
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be, that is the question:",
] * 40


def byte_level_bpe(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def sentencepiece_bpe(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
