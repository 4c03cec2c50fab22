"""The closed-vocabulary word-level tokenizer: round trips, no <unk>, clear errors."""

from __future__ import annotations

import pytest

from dynamics.experiments.imax_dmax import tokenizer as tk
from dynamics.experiments.imax_dmax.constructions import build_bundle
from dynamics.experiments.imax_dmax.data import encode_words
from dynamics.experiments.imax_dmax.tasks import VOCAB


@pytest.fixture(scope="module")
def tok():
    return tk.build_tokenizer()


def test_every_instruction_and_answer_round_trips(tok):
    b = build_bundle(40, 10, seed=1)
    texts = {t for c in (b.imax, b.dmax, b.eval) for e in c.entries for t in (e.instruction, e.answer)}
    for text in texts:
        ids = encode_words(tok, text)
        assert len(ids) == len(text.split())  # one token per word: the vocabulary is closed
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_ids_layout_and_special_tokens(tok):
    assert len(tok) == len(tk.SPECIAL_TOKENS) + len(VOCAB)
    assert tok.pad_token_id == 0
    for i, s in enumerate(tk.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(s) == i
    ids = [tok.bos_token_id, tok.convert_tokens_to_ids(tk.IMAGE), *encode_words(tok, "yes"), tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "yes"


def test_out_of_vocabulary_words_are_reported(tok):
    with pytest.raises(ValueError, match="pneumothorax"):
        encode_words(tok, "is there a pneumothorax ?")
    with pytest.raises(ValueError, match="unique"):
        tk.build_tokenizer(("a", "a"))
    with pytest.raises(ValueError, match="whitespace"):
        tk.build_tokenizer(("a b",))
