"""Tokenizers, the built-in corpus and its split, evaluation and calibration windows."""

import json

import numpy as np
import pytest

from jaxquant.data import (
    ByteTokenizer,
    HFTokenizer,
    builtin_corpus,
    builtin_split,
    calibration_windows,
    eval_windows,
    load_tokenizer,
    random_batches,
    read_text,
    split_text,
)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — ok"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids[:3]) == "na\ufffd"  # a cut multi-byte character is replaced, not an error


def test_builtin_corpus_and_split():
    text = builtin_corpus()
    assert 400_000 < len(text) < 600_000 and "The" in text
    assert builtin_corpus() == text  # deterministic
    parts = split_text(text)
    assert parts["train"] + parts["validation"] + parts["test"] == text
    n = len(text)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [
        int(n * 0.9), int(n * 0.95) - int(n * 0.9), n - int(n * 0.95)]
    assert builtin_split("validation") == parts["validation"]
    with pytest.raises(ValueError, match="split='dev'"):
        builtin_split("dev")


def test_eval_windows():
    w = eval_windows(np.arange(23), 5)
    np.testing.assert_array_equal(w, np.arange(20).reshape(4, 5))
    with pytest.raises(ValueError, match="text has 3 tokens, fewer than one window of seqlen=5"):
        eval_windows(np.arange(3), 5)
    with pytest.raises(ValueError, match="1-D integer"):
        eval_windows(np.zeros(10, np.float32), 5)


def test_calibration_windows_seeded_and_checked():
    tokens = np.arange(1000)
    a = calibration_windows(tokens, 8, 16, seed=3)
    assert a.shape == (8, 16)
    np.testing.assert_array_equal(a, calibration_windows(tokens, 8, 16, seed=3))
    assert not np.array_equal(a, calibration_windows(tokens, 8, 16, seed=4))
    np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # contiguous windows of the text
    with pytest.raises(ValueError, match="text has 100 tokens, fewer than num=8 x length=16 = 128"):
        calibration_windows(np.arange(100), 8, 16)


def test_random_batches():
    batch = next(random_batches(np.arange(500), 4, 10, seed=0))
    assert batch.shape == (4, 11)
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)


def test_read_text(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello\n")
    assert read_text(f) == "hello\n"
    f.write_text("  \n")
    with pytest.raises(ValueError, match="evaluation text .* is empty"):
        read_text(f)
    assert read_text("builtin", split="test") == builtin_split("test")


def test_load_tokenizer_byte_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "jaxquant_tokenizer.json").write_text(ByteTokenizer().note())
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "jaxquant_tokenizer.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'sentencepiece'"):
        load_tokenizer(tmp_path)


def test_load_hf_tokenizer_from_local_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [3, 4]
    assert tok.encode("hello", add_bos=True) == [0, 3]
    assert tok.eos_token_id == 1 and tok.vocab_size == 5
