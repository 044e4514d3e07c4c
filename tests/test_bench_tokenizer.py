"""The real-model benchmark's BERT tokenizer (tools/bench_real_data.py ``WordPiece``) on a small vocabulary
written here: lowercasing, accent stripping, punctuation splitting, greedy longest-match WordPiece, [UNK],
and the padded [CLS] ... [SEP] encoding with its attention mask. No network, no model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")  # bench_real_data renders text with Pillow at import
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_real_data import WordPiece

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "a", "##ff", "cafe", "hello", "!"]
VOCAB += [",", ".", "world", "$", "5", "x", "##x", "¿", "que", "##a"]


@pytest.fixture
def wp() -> WordPiece:
    return WordPiece(VOCAB)


def test_greedy_longest_match_with_continuation_prefix(wp):
    # "##aff" wins over "##a" + "##ff" (longest first); "un" starts the word, continuations carry "##"
    assert wp.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert wp.tokenize("xxx") == ["x", "##x", "##x"]


def test_lowercase_and_accents_stripped(wp):
    assert wp.tokenize("Café HELLO") == ["cafe", "hello"]
    assert wp.tokenize("CAFÉ") == ["cafe"]  # É decomposes (NFD) to E + a combining accent, which goes


def test_punctuation_is_split_off(wp):
    # ASCII non-alphanumerics ('$') and Unicode P* ('¿', inverted question mark) are single tokens
    assert wp.tokenize("hello,world!") == ["hello", ",", "world", "!"]
    assert wp.tokenize("$5.") == ["$", "5", "."]
    assert wp.tokenize("¿que") == ["¿", "que"]


def test_unknown_words(wp):
    assert wp.tokenize("hello zebra") == ["hello", "[UNK]"]  # no piece starts it
    assert wp.tokenize("unzip") == ["[UNK]"]  # "un" matches, the rest cannot: the whole word is unknown
    assert wp.tokenize("x" * 100) == ["x"] + ["##x"] * 99
    assert wp.tokenize("x" * 101) == ["[UNK]"]  # over 100 characters


def test_encode_pads_truncates_and_masks(wp):
    ids, mask = wp.encode("Hello, world!", 8)
    assert ids.dtype == mask.dtype == np.int64
    assert ids.tolist() == [2, 10, 12, 14, 11, 3, 0, 0]  # [CLS] hello , world ! [SEP] [PAD] [PAD]
    assert mask.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    ids, mask = wp.encode("hello hello hello hello", 4)  # truncated to length - 2 tokens, [SEP] kept
    assert ids.tolist() == [2, 10, 10, 3]
    assert mask.tolist() == [1, 1, 1, 1]


def test_vocabulary_file_splits_on_newlines_only(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\na\u2028b\nc\n", encoding="utf-8")  # U+2028 is inside a token
    assert WordPiece.from_file(path).ids == {"[PAD]": 0, "[UNK]": 1, "a\u2028b": 2, "c": 3}
