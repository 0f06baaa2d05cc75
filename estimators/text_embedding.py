"""Optional sentence embeddings for the reward model, from a model on local disk only (nothing is ever
downloaded at run time: docs/reward-trainer.md).

Two kinds of local model:

* a **sentence-transformers folder** (``modules.json`` inside; needs the ``sentence-transformers`` package,
  which obsfeed does not install), loaded with ``local_files_only=True``;
* a **word-vector text file** in the GloVe / word2vec / fastText ``.vec`` format (``word v1 … vd`` per line, an
  optional ``count dim`` header): the text's embedding is the mean of its known words' vectors, L2-normalised
  (the classic averaged-word-vector sentence embedding; no extra package).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from schemas.errors import ConfigError

TOKEN = re.compile(r"\w+")


class WordVectors:
    """Averaged word vectors of a text: a sentence embedding from a local word-vector file."""

    def __init__(self, path: Path):
        words: dict[str, int] = {}
        rows: list[np.ndarray] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                parts = line.rstrip().split(" ")
                if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue                                      # word2vec / fastText header: count dim
                if len(parts) < 2:
                    continue
                try:
                    vector = np.asarray(parts[1:], dtype=np.float32)
                except ValueError as e:
                    raise ConfigError(f"{path}:{number}: not a word-vector line ({e})") from e
                if rows and vector.size != rows[0].size:
                    raise ConfigError(f"{path}:{number}: {vector.size} values, the first vector has {rows[0].size}")
                words.setdefault(parts[0].lower(), len(rows))
                rows.append(vector)
        if not rows:
            raise ConfigError(f"{path}: no word vectors found")
        self.words, self.vectors = words, np.vstack(rows)
        self.dim = self.vectors.shape[1]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = [j for w in TOKEN.findall(text.lower()) if (j := self.words.get(w)) is not None]
            if ids:
                v = self.vectors[ids].mean(axis=0)
                out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
        return out


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local folder, on cpu, embeddings L2-normalised."""

    def __init__(self, path: Path):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ConfigError(f"train.embedding_model = {str(path)!r} is a sentence-transformers folder, but the "
                              "sentence-transformers package is not installed (pip install sentence-transformers, "
                              "or give a word-vector file)") from e
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.dim = int(self.model.get_sentence_embedding_dimension())

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)


@lru_cache(maxsize=4)
def load_encoder(path: str) -> WordVectors | SentenceTransformerEncoder:
    """The encoder at a local ``path`` (cached: scoring calls it once per batch)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"train.embedding_model: {path} not found (a local model is required; nothing is "
                          "downloaded)")
    if p.is_dir():
        if not (p / "modules.json").is_file():
            raise ConfigError(f"train.embedding_model: {path} is a folder without modules.json (not a "
                              "sentence-transformers model)")
        return SentenceTransformerEncoder(p)
    return WordVectors(p)
