"""A local, closed-vocabulary word-level tokenizer for the task grammar (no download).

Built with the ``tokenizers`` library (``WordLevel`` model, whitespace pre-tokenizer) and wrapped
in transformers' ``PreTrainedTokenizerFast``, so it behaves like any HF tokenizer (``__call__``,
``batch_decode``, ``save_pretrained``, padding side) and a user with a real model swaps it for the
model's own tokenizer. The vocabulary is the special tokens below followed by ``tasks.VOCAB``
(every word any instruction or answer can contain), so encoding a task entry never yields
``<unk>``. The image placeholder tokens cover what the zoo's architectures expect around an image
(LLaVA's ``<image>``, Qwen2-VL's vision start/end, Idefics3's fake-token wrapper and global-image
marker, Pixtral's row breaks, Gemma 3's begin/end-of-image).
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dynamics.experiments.imax_dmax.tasks import VOCAB

PAD, UNK, BOS, EOS, SEP = "<pad>", "<unk>", "<bos>", "<eos>", "<sep>"
IMAGE, VIDEO = "<image>", "<video>"
IMAGE_START, IMAGE_END, IMAGE_BREAK, IMAGE_GLOBAL = (
    "<image_start>",
    "<image_end>",
    "<image_break>",
    "<image_global>",
)
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    UNK,
    BOS,
    EOS,
    SEP,
    IMAGE,
    VIDEO,
    IMAGE_START,
    IMAGE_END,
    IMAGE_BREAK,
    IMAGE_GLOBAL,
)


def build_tokenizer(words: tuple[str, ...] = VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``SPECIAL_TOKENS + words`` (ids in that order; ``<pad>`` is 0)."""
    dup = sorted({w for w in words if words.count(w) > 1} | (set(words) & set(SPECIAL_TOKENS)))
    if dup:
        raise ValueError(f"vocabulary words must be unique and distinct from special tokens; repeated: {dup}")
    if any(not w or w != w.strip() or " " in w for w in words):
        raise ValueError("vocabulary words must be non-empty and contain no whitespace")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        sep_token=SEP,
        additional_special_tokens=list(SPECIAL_TOKENS[5:]),
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "right"
    return fast
