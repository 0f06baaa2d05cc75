"""The reward model's dense features: standardised numerics and a local sentence embedding (docs/reward-trainer.md)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from estimators.reward.features import CLIP, DenseSpec, features, fit_dense_spec
from estimators.reward.model import load_reward_model, save_reward_model, score
from estimators.reward.trainer import fit_reward_model
from estimators.text_embedding import WordVectors, load_encoder
from schemas import impressions as imp
from schemas import pointwise
from schemas import units as un
from schemas.config import TrainConfig, parse_config
from schemas.errors import ConfigError, InputError

CFG = TrainConfig(epochs=15, lr=0.3, hash_features=1024, batch_size=128, device="cpu", patience=3)


def test_fit_dense_spec_standardises_over_every_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 1000)
    responses = [" ".join(["w"] * k) for k in rng.integers(1, 30, 1000)]
    batches = [pa.record_batch({"position": x[i:i + 300], "response": responses[i:i + 300]})
               for i in range(0, 1000, 300)]
    spec = fit_dense_spec(batches, numeric=["position", "response_length"], embedding_model=None)
    (name, mean, sd), (length, lmean, lsd) = spec.numeric
    assert (name, length) == ("position", "response_length") and spec.dim == 2
    assert mean == pytest.approx(x.mean()) and sd == pytest.approx(x.std())
    log_words = np.log([len(r.split()) for r in responses])
    assert lmean == pytest.approx(log_words.mean()) and lsd == pytest.approx(log_words.std())
    D = spec.transform({"position": np.array([mean, mean + sd, np.nan, mean + 100 * sd])},
                       [None] * 4, ["w", "w", "w", "w"])
    assert D[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.0, CLIP])         # missing → the mean; outliers clipped
    assert DenseSpec.from_dict(spec.to_dict()) == spec and spec.needs == ["position"]
    with pytest.raises(InputError, match="no finite values"):
        fit_dense_spec([pa.record_batch({"position": [np.nan], "response": ["a"]})], numeric=["position"],
                       embedding_model=None)


def test_dense_block_follows_the_hashed_columns():
    spec = DenseSpec((("position", 1.0, 2.0),))
    X = features(["q"], ["an answer"], hash_features=64, ngram_max=1, dense=spec, columns={"position": [5.0]})
    assert X.shape == (1, 65) and X[0, 64] == pytest.approx(2.0) and X[0, :64].sum() == pytest.approx(1.0)


def _vectors(tmp_path: Path) -> Path:
    """2-d word vectors: good words point one way, bad words the other, filler words are orthogonal."""
    lines = ["8 2", "great 1 0.1", "superb 0.9 0.2", "awful -1 0.1", "poor -0.9 0.2",
             "the 0 1", "answer 0 1", "is 0 1", "here 0 1"]
    path = tmp_path / "vectors.vec"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_word_vectors_average_known_words(tmp_path: Path):
    enc = WordVectors(_vectors(tmp_path))
    E = enc(["Great answer", "unknown words only", "great"])
    assert E.shape == (3, 2) and enc.dim == 2
    assert E[0] == pytest.approx(np.array([1, 1.1]) / np.linalg.norm([1, 1.1]))
    assert E[1].tolist() == [0, 0] and np.linalg.norm(E[2]) == pytest.approx(1.0)
    bad = tmp_path / "bad.vec"
    bad.write_text("a 1 2\nb 1\n")
    with pytest.raises(ConfigError, match="bad.vec:2: 1 values"):
        WordVectors(bad)


def test_embedding_model_must_be_local_and_recognised(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_encoder(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="without modules.json"):
        load_encoder(str(tmp_path))
    (tmp_path / "modules.json").write_text("[]")
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="sentence-transformers package is not installed"):
            load_encoder(str(tmp_path))
    cfg = parse_config('[input]\nimpressions = ["i"]\nsignals = ["s"]\n[train]\nembedding_model = "m/v.vec"\n',
                       base=tmp_path)
    assert cfg.train.embedding_model == str(tmp_path / "m" / "v.vec")      # relative to the config file


def _table(words: tuple[str, str], n: int, seed: int, position_signal: bool = False) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    good = rng.random(n) < 0.5
    position = np.where(good, 1.0, 4.0) + rng.normal(0, 0.5, n)
    word = np.where(good, words[0], words[1]) if not position_signal else np.full(n, "here")
    table = pa.table({
        imp.PROMPT_ID: [f"p{i}" for i in range(n)], imp.PROMPT: ["question"] * n,
        imp.RESPONSE: [f"the answer is {w}" for w in word], un.OBSERVED: pa.array(np.ones(n, np.int8)),
        un.LABEL: good.astype(float), pointwise.WEIGHT_CLIPPED: np.ones(n), pointwise.IMPUTED: np.full(n, 0.5),
        "position": position,
    })
    return table, good


def test_a_numeric_feature_is_learned_saved_and_needed_to_score(tmp_path: Path):
    table, good = _table(("x", "x"), 1500, 0, position_signal=True)     # the text says nothing
    model, _ = fit_reward_model(table, loss="naive", cfg=CFG.model_copy(update={"numeric": ["position"]}),
                                progress=False)
    save_reward_model(model, {"loss": "naive"}, tmp_path / "m")
    loaded = load_reward_model(tmp_path / "m")
    texts = (table[imp.PROMPT].to_pylist(), table[imp.RESPONSE].to_pylist())
    pred = score(loaded, *texts, columns={"position": table["position"].to_numpy()})
    assert roc_auc_score(good, pred) > 0.95 and loaded.dense == model.dense
    with pytest.raises(InputError, match="'position' missing"):
        score(loaded, *texts)


def test_a_local_embedding_carries_meaning_to_words_never_trained_on(tmp_path: Path):
    """Trained on 'great' vs 'awful', tested on 'superb' vs 'poor': only the embedding knows they are alike."""
    train, _ = _table(("great", "awful"), 1200, 1)
    test, good = _table(("superb", "poor"), 400, 2)
    texts = (test[imp.PROMPT].to_pylist(), test[imp.RESPONSE].to_pylist())
    hashed, _ = fit_reward_model(train, loss="naive", cfg=CFG, progress=False)
    embedded, _ = fit_reward_model(train, loss="naive", progress=False,
                                   cfg=CFG.model_copy(update={"embedding_model": str(_vectors(tmp_path))}))
    assert roc_auc_score(good, score(embedded, *texts)) > 0.95
    assert roc_auc_score(good, score(hashed, *texts)) == pytest.approx(0.5, abs=0.1)
    assert embedded.dense.embedding_dim == 2 and embedded.config()["dense"]["embedding_model"].endswith(".vec")


def test_standardisation_keeps_its_digits_on_large_values():
    """E[x²] − mean² would lose every digit of a timestamp-like column's variance; the merged update does not."""
    rng = np.random.default_rng(1)
    x = 1.7e9 + rng.normal(0, 10.0, 3000)
    batches = [pa.record_batch({"ts": x[i:i + 700]}) for i in range(0, 3000, 700)]
    ((_, mean, sd),) = fit_dense_spec(batches, numeric=["ts"], embedding_model=None).numeric
    assert mean == pytest.approx(x.mean(), rel=1e-12) and sd == pytest.approx(x.std(), rel=1e-6)


def test_response_length_is_always_derived_from_the_text():
    """A column named response_length (here a raw word count) must not make fitting and scoring disagree."""
    responses = ["a b c", "a", "a b c d e f g h"]
    batch = pa.record_batch({"response": responses, "response_length": [3.0, 1.0, 8.0]})
    spec = fit_dense_spec([batch], numeric=["response_length"], embedding_model=None)
    assert spec.numeric[0][1] == pytest.approx(np.log([3, 1, 8]).mean())
    with_column = spec.transform({"response_length": [3.0, 1.0, 8.0]}, [None] * 3, responses)
    assert np.array_equal(with_column, spec.transform({}, [None] * 3, responses))
