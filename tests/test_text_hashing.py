"""The Arrow text hasher gives scikit-learn's HashingVectorizer matrix, and the Arrow feature frame pandas' one."""

import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.utils import murmurhash3_32 as sklearn_murmurhash3_32

from estimators import text_hashing
from estimators.features import SparseColumnTransformer, feature_frame, make_featurizer, word_counts
from estimators.text_hashing import TextHasher, murmurhash3_32

ALPHABET = "abcdeXYZ éüßÅ 12_,.!?'\t\n中文日本語🙂ǅⅫ²٣·\u00a0\u2003-"
"""Letters (with accents, title case, CJK), digits of other scripts, an emoji, underscores, punctuation and
Unicode spaces. Left out: the Greek capital sigma and the Turkish dotted capital I, whose lowercase in Python
depends on their context (see estimators.text_hashing)."""


def random_texts(n: int, seed: int, max_len: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def test_murmurhash_of_each_string_is_sklearns():
    texts = random_texts(3000, 0, max_len=120) + ["", "a", "ab", "abc", "abcd", "abcde"]
    expected = np.array([sklearn_murmurhash3_32(t, seed=0) for t in texts], dtype=np.int32)
    np.testing.assert_array_equal(murmurhash3_32(pa.array(texts)), expected)
    np.testing.assert_array_equal(murmurhash3_32(pa.array(texts).slice(5, 100)), expected[5:105])
    assert murmurhash3_32(pa.array(["x", None]))[1] == sklearn_murmurhash3_32("", seed=0)


@pytest.mark.parametrize(("ngram_max", "n_features"), [(1, 2**10), (2, 2**14), (3, 64)])
def test_text_hasher_is_sklearns_hashing_vectorizer(ngram_max: int, n_features: int):
    """Including 64 columns, where collisions must be summed as FeatureHasher sums them."""
    texts = random_texts(2000, ngram_max) + ["", "   ", "a b c", "Word word WORD", "x_y z9 q"]
    expected = HashingVectorizer(n_features=n_features, ngram_range=(1, ngram_max), alternate_sign=False,
                                 norm="l2").transform(texts)
    got = TextHasher(n_features=n_features, ngram_max=ngram_max).fit_transform(texts)
    assert got.shape == expected.shape and got.has_canonical_format
    assert abs(got - expected).max() < 1e-12
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)


def test_chunks_and_threads_do_not_change_the_matrix(monkeypatch):
    texts = random_texts(500, 7)
    one = TextHasher(n_threads=1).fit_transform(texts)
    monkeypatch.setattr(text_hashing, "CHUNK_ROWS", 37)
    for threads in (1, 3):
        many = TextHasher(n_threads=threads).fit_transform(texts)
        assert (abs(many - one).max() if many.nnz else 0) == 0
        np.testing.assert_array_equal(many.indptr, one.indptr)


def test_text_hasher_inputs_and_edge_cases():
    hasher = TextHasher(n_features=256).fit([])
    assert hasher.transform([]).shape == (0, 256)
    X = hasher.transform(pa.chunked_array([["hello world", None], ["!!"]]))
    assert X.shape == (3, 256) and X[0].nnz == 3 and X[1].nnz == 0 and X[2].nnz == 0
    arrow_series = pd.Series(pd.arrays.ArrowExtensionArray(pa.array(["hello world", "hello"])))
    assert (hasher.transform(arrow_series) != hasher.transform(["hello world", "hello"])).nnz == 0
    assert TextHasher(dtype=np.float32).fit_transform(["a bc"]).dtype == np.float32
    with pytest.raises(ValueError, match="column of texts"):
        hasher.transform("one string")
    with pytest.raises(ValueError, match="n_features"):
        TextHasher(n_features=0).fit(["x"])


def test_word_counts_are_str_split():
    spaces = [chr(i) for i in range(0x110000) if chr(i).isspace()]
    rng = random.Random(1)
    texts = random_texts(2000, 3) + ["".join(rng.choice(spaces + ["ab", "c"]) for _ in range(20))
                                     for _ in range(500)] + [None, "", "   ", " a  b "]
    np.testing.assert_array_equal(word_counts(texts), [len((t or "").split()) for t in texts])


def test_feature_frame_from_arrow_columns_is_the_frame_from_python_lists():
    texts, other = random_texts(300, 4), random_texts(300, 5)
    columns = {"prompt": texts, "response": [None if i % 7 == 0 else t for i, t in enumerate(other)],
               "position": list(range(300)), "model_version": ["a", "b", None] * 100}
    kw = dict(text=["prompt", "response"], numeric=["response_length", "position"], categorical=["model_version"])
    from_lists = feature_frame(columns, **kw)
    from_arrow = feature_frame({k: pa.array(v) for k, v in columns.items()}, **kw)
    pd.testing.assert_frame_equal(from_lists, from_arrow)
    expected_text = [f"{p} {r or ''}" for p, r in zip(columns["prompt"], columns["response"], strict=True)]
    assert from_lists["_text"].tolist() == expected_text


def test_featurizer_stacks_as_columntransformer_does():
    texts = random_texts(400, 6)
    frame = feature_frame({"prompt": texts, "response": texts[::-1], "position": np.arange(400.0),
                           "model_version": ["a", "b"] * 200}, text=["prompt", "response"],
                          numeric=["response_length", "position"], categorical=["model_version"])
    ours = make_featurizer(numeric=["response_length", "position"], categorical=["model_version"])
    assert isinstance(ours, SparseColumnTransformer)
    plain = ColumnTransformer(ours.transformers, sparse_threshold=1.0)
    a, b = ours.fit_transform(frame), plain.fit_transform(frame)
    assert sp.isspmatrix_csr(a) and a.shape == b.shape and abs(a - b).max() == 0


@pytest.mark.parametrize("n_threads", [1, 2])
def test_stack_columns_gives_scipys_arrays(monkeypatch, n_threads: int):
    """Blocks with empty rows, an empty block, a dense-from block and one of float32, in tasks of 16 rows on one
    or two threads: the very arrays of ``sp.hstack(...).tocsr()``; a block with other rows is refused."""
    from estimators import features

    monkeypatch.setattr(features, "STACK_ROWS", 16)
    rng = np.random.default_rng(3)
    blocks = [sp.random(50, 30, density=0.2, format="csr", random_state=1), sp.csr_matrix((50, 4)),
              sp.csr_matrix(np.where(rng.random((50, 3)) < 0.5, rng.normal(size=(50, 3)), 0.0)),
              sp.random(50, 7, density=0.5, format="csr", random_state=2, dtype=np.float32)]
    blocks[0][5:9] = 0
    blocks[0].eliminate_zeros()
    ours, theirs = features.stack_columns(blocks, n_threads=n_threads), sp.hstack(blocks).tocsr()
    assert ours.shape == theirs.shape == (50, 44) and ours.dtype == theirs.dtype
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
        assert getattr(ours, name).dtype == getattr(theirs, name).dtype
    with pytest.raises(ValueError, match="rows"):
        features.stack_columns([blocks[0], sp.csr_matrix((49, 2))])


ASCII_ALPHABET = "".join(chr(i) for i in range(128)) + "abcXYZ 09_ " * 4
"""Every ASCII character (control bytes, punctuation, digits, both cases), words made more likely: the texts that
:func:`estimators.text_hashing.tokens` splits without its regex."""


@pytest.mark.parametrize(("ngram_max", "n_features"), [(1, 2**10), (2, 2**14), (3, 64)])
def test_text_hasher_is_sklearns_hashing_vectorizer_on_ascii_texts(ngram_max: int, n_features: int):
    rng = random.Random(ngram_max)
    texts = ["".join(rng.choice(ASCII_ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["", "   ", "a b c", "Word word WORD", "x_y z9 q", "A-B,c.D!!e"]
    expected = HashingVectorizer(n_features=n_features, ngram_range=(1, ngram_max), alternate_sign=False,
                                 norm="l2").transform(texts)
    got = TextHasher(n_features=n_features, ngram_max=ngram_max).fit_transform(texts)
    assert abs(got - expected).max() < 1e-12
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    words, rows = text_hashing.tokens(pa.array(texts[-6:]).slice(1))    # a slice: its own offsets
    assert words.to_pylist() == ["word", "word", "word", "x_y", "z9"] and rows.tolist() == [2, 2, 2, 3, 3]


@pytest.mark.parametrize("alphabet", ["ab \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x01\x07z", "ab \t\x85\xa0\u3000\u2028é"])
def test_word_counts_are_pythons_split(alphabet: str):
    """response_length is len(text.split()): ASCII texts (control bytes that are and are not spaces to Python)
    through the byte path in slices of 65,536, others through the regex; nulls count 0, chunks and offsets kept."""
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list(alphabet), size=rng.integers(0, 12))) for _ in range(70_000)]
    texts += [None, "", " ", "a", " a", "a "]
    expected = np.array([len(t.split()) if t else 0 for t in texts], float)
    np.testing.assert_array_equal(word_counts(pa.array(texts)), expected)
    np.testing.assert_array_equal(word_counts(pa.chunked_array([pa.array(texts[:9]), pa.array(texts[9:])])), expected)
    np.testing.assert_array_equal(word_counts(pa.array(texts).slice(3, 66_000)), expected[3:66_003])
    np.testing.assert_array_equal(word_counts(np.array(texts[-6:], dtype=object)), expected[-6:])
    assert word_counts(pa.array([], pa.string())).shape == (0,)
