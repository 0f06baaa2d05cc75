"""The hashed n-gram reward model: obsfeed's own small backbone (``train.backbone = "hashed"``, the default).

Features: hashed word n-grams of ``prompt + " " + response`` (``HashingVectorizer``, l1-normalised: the model
sees the share of each n-gram in the text). The sparse rows feed ``nn.EmbeddingBag(mode="sum")`` directly
(indices, offsets, per-sample weights): a linear model when ``hidden == 0``, and nothing densified on the way
to a GPU. Nothing is fitted outside torch, so a state_dict plus ``config.json`` rebuilds the model exactly.
It learns from any text in seconds, but it is a bag of n-grams: for real text, a transformer backbone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from estimators.reward.backbones import HASHED
from estimators.reward.features import FEATURES, DenseSpec, features
from schemas.errors import InputError

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


class HashedRewardModel(nn.Module):
    """s(x) = bag of n-gram embeddings (+ ReLU → Linear when hidden > 0) → one logit; P(label=1|x) = σ(s).

    ``dense``: the optional dense block (``features.DenseSpec``), columns ``hash_features`` on of the
    same bag: a linear term in the dense features.
    ``factors`` = k > 0 adds a factorisation machine's pairwise term (Rendle 2010), ½ Σ_f [(Σ_j x_j v_jf)² −
    Σ_j x_j² v_jf²] = Σ_{j<l} x_j x_l ⟨v_j, v_l⟩, in O(nnz·k) with two bags. Over a user token and an item token
    this is matrix factorisation with biases: the model for id-based data such as Coat.
    """

    backbone_kind = HASHED

    def __init__(self, *, hash_features: int, ngram_max: int = 1, hidden: int = 0, dense: DenseSpec | None = None,
                 factors: int = 0):
        super().__init__()
        self.pad_id = 0                                    # the batches' token padding: unused by sparse blocks
        self.hash_features, self.ngram_max, self.hidden, self.factors = hash_features, ngram_max, hidden, factors
        self.dense = dense or DenseSpec()
        self.bag = nn.EmbeddingBag(hash_features + self.dense.dim, hidden or 1, mode="sum")
        if hidden == 0:
            nn.init.zeros_(self.bag.weight)            # a linear model: start from "every n-gram is neutral"
            self.head = None
        else:
            nn.init.normal_(self.bag.weight, std=1.0)  # l1-normalised rows: a bag is a mean, of scale ~std
            self.head = nn.Linear(hidden, 1, bias=False)   # ``bias`` below is the one intercept
        self.pairs = None
        if factors:
            self.pairs = nn.EmbeddingBag(hash_features + self.dense.dim, factors, mode="sum")
            nn.init.normal_(self.pairs.weight, std=0.1)
        self.bias = nn.Parameter(torch.zeros(1))
        # The post-hoc affine calibration of the logit (``calibrate``): identity until fitted, saved with the model.
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("shift", torch.zeros(1))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Logits for a CSR batch: ``indices``/``values`` = its column ids and values, ``offsets`` = indptr[:-1]."""
        h = self.bag(indices, offsets, per_sample_weights=values)
        if self.head is not None:
            h = self.head(torch.relu(h))
        out = h.squeeze(-1) + self.bias
        if self.pairs is not None:
            total = self.pairs(indices, offsets, per_sample_weights=values)
            squares = F.embedding_bag(indices, self.pairs.weight ** 2, offsets, mode="sum",
                                      per_sample_weights=values ** 2)
            out = out + 0.5 * (total ** 2 - squares).sum(-1)
        return self.scale * out + self.shift

    def config(self) -> dict[str, Any]:
        """What ``load`` needs to rebuild the module before loading its state_dict."""
        return {"backbone": HASHED, "features": FEATURES, "hash_features": self.hash_features,
                "ngram_max": self.ngram_max,
                "hidden": self.hidden, "factors": self.factors, "dense": self.dense.to_dict()}

    def encode(self, prompts: Sequence[str | None], responses: Sequence[str | None],
               columns: Mapping[str, Any] | None = None) -> sp.csr_matrix:
        """This model's input rows for raw texts (and the numeric columns its dense block reads)."""
        return HashedEncoder(hash_features=self.hash_features, ngram_max=self.ngram_max,
                             dense=self.dense).encode(prompts, responses, columns)

    def save(self, directory: Path, record: Mapping[str, Any]) -> None:
        """``model.pt`` (state_dict only: loadable with ``weights_only=True``) and ``config.json`` = ``record`` (the
        loss, the settings) plus ``"model"``, the module's own hyper-parameters that ``load`` rebuilds it from."""
        if "model" in record:
            raise ValueError("record must not have a 'model' key: it is the module's own configuration")
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.state_dict().items()}, directory / MODEL_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps({**record, "model": self.config()}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> HashedRewardModel:
        """Rebuild from ``config.json`` and load ``model.pt`` with ``weights_only=True`` (no pickle code runs)."""
        cfg = json.loads((directory / CONFIG_FILE).read_text()).get("model", {})
        if cfg.get("features") != FEATURES:                # also a config.json from before "model" was recorded
            raise InputError(f"{directory}: model was trained on features {cfg.get('features')!r} (None: older "
                             f"obsfeed), this code makes {FEATURES!r}; re-run the train stage")
        model = cls(hash_features=cfg["hash_features"], ngram_max=cfg["ngram_max"], hidden=cfg["hidden"],
                    dense=DenseSpec.from_dict(cfg.get("dense")), factors=cfg.get("factors", 0))
        state = torch.load(directory / MODEL_FILE, weights_only=True, map_location="cpu")
        for name, identity in (("scale", torch.ones(1)), ("shift", torch.zeros(1))):
            state.setdefault(name, identity)                # saved before calibration existed: the identity map
        model.load_state_dict(state)
        return model.eval()


class HashedEncoder:
    """What the feature cache calls to featurise rows for the hashed model: hashed n-grams and the dense block."""

    def __init__(self, *, hash_features: int, ngram_max: int, dense: DenseSpec | None = None):
        self.hash_features, self.ngram_max, self.dense = hash_features, ngram_max, dense or DenseSpec()
        self.n_features = hash_features + self.dense.dim
        self.pad_id = 0
        self.needs = self.dense.needs

    def encode(self, prompts: Sequence[str | None], responses: Sequence[str | None],
               columns: Mapping[str, Any] | None = None) -> sp.csr_matrix:
        return features(prompts, responses, hash_features=self.hash_features, ngram_max=self.ngram_max,
                        dense=self.dense, columns=columns)

    def meta(self) -> dict[str, Any]:
        return {"backbone": HASHED, "dense": self.dense.to_dict()}
