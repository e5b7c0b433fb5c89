"""Text tokenizer (core/text.py): training from strings and files, round trips, save/load,
and every error path."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.core.text import TextTokenizer

WORDS = "the a cat dog bird sat ran flew on under over mat tree red blue green big small quickly".split()


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(sentences(), vocab_size=320, user_defined_symbols=("<sep>",))


def test_trained_model_compresses_and_disables_its_own_specials(tok: TextTokenizer) -> None:
    assert tok.vocab_size == 320 and tok.unk_id == 0
    s = "the big red cat sat on the mat."
    ids = tok.encode(s)
    # learned merges: far fewer pieces than characters (bytes would be len(s))
    assert len(ids) <= len(s) // 3
    assert tok._sp.bos_id() == tok._sp.eos_id() == tok._sp.pad_id() == -1
    assert tok.id_to_piece(tok.encode("<sep>")[-1]) == "<sep>"  # one piece, never split


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_round_trip_any_unicode(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_save_load_same_ids_and_sha(tok: TextTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "text.model")
    back = TextTokenizer.load(tmp_path / "text.model")
    assert back.sha256 == tok.sha256
    s = "a blue bird flew over the tree."
    assert back.encode(s) == tok.encode(s)


def test_train_from_files_unigram_and_out(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(sentences(150, seed=1)))
    b.write_text("\n".join(sentences(150, seed=2)))
    out = tmp_path / "m" / "uni.model"
    tok = TextTokenizer.train([a, b], vocab_size=300, model_type="unigram", out=out)
    assert out.is_file() and TextTokenizer.load(out).sha256 == tok.sha256
    assert tok.decode(tok.encode("the dog ran.")) == "the dog ran."
    # the same corpus as strings gives the identical model (training is deterministic)
    again = TextTokenizer.train(sentences(150, seed=1) + sentences(150, seed=2), vocab_size=300, model_type="unigram")
    assert again.sha256 == tok.sha256


def test_different_corpus_different_sha() -> None:
    t1 = TextTokenizer.train(sentences(200, seed=3), vocab_size=290)
    t2 = TextTokenizer.train(sentences(200, seed=4), vocab_size=290)
    assert t1.sha256 != t2.sha256


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"vocab_size": 100}, "vocab_size > 257"),
        ({"vocab_size": 300, "model_type": "wordpiece"}, "use 'bpe' or 'unigram'"),
        ({"vocab_size": 300, "user_defined_symbols": ("<|bos|>",)}, "owned by the unified vocabulary"),
        ({"vocab_size": 5000}, "too high.*lower vocab_size"),
        ({"vocab_size": 270, "character_coverage": 1.0}, "smaller than required_chars.*raise vocab_size"),
    ],
)
def test_train_errors_say_what_and_how(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("|", r"\|")):
        TextTokenizer.train(sentences(50), **kwargs)


def test_input_errors(tok: TextTokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one string.*list of sentences"):
        TextTokenizer.train("the cat sat", vocab_size=300)
    with pytest.raises(ValueError, match="does not exist; check the path"):
        TextTokenizer.train([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(ValueError, match="must be str or pathlib.Path, got int"):
        TextTokenizer.train(["ok", 3], vocab_size=300)
    with pytest.raises(ValueError, match=r"text id 320 is outside the text range \[0, 320\)"):
        tok.decode([5, 320])
    with pytest.raises(ValueError, match=r"text id -1 is outside \[0, 320\)"):
        tok.id_to_piece(-1)
    with pytest.raises(ValueError, match="encode takes a str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(ValueError, match="no such sentencepiece model file"):
        TextTokenizer.load(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        TextTokenizer.load(tmp_path / "junk.model")


def test_model_with_its_own_bos_is_rejected(tmp_path: Path) -> None:
    import io

    import sentencepiece as spm

    w = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(100)), model_writer=w, vocab_size=40, minloglevel=2, num_threads=1
    )
    (tmp_path / "plain.model").write_bytes(w.getvalue())
    with pytest.raises(ValueError, match="defines its own bos.*retrain with TextTokenizer.train"):
        TextTokenizer.load(tmp_path / "plain.model")
