"""Saving fitted sklearn models with skops, and loading them only if every type is on an allow-list.

Never pickle: a pickle from disk runs arbitrary code. skops refuses types it does not know unless they are
trusted explicitly; ``ALLOWED_TYPES`` is that list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import skops.io as sio

ALLOWED_TYPES = frozenset({
    "estimators.features.SparseColumnTransformer",
    "estimators.imputation.ImputationModel",
    "estimators.propensity.PropensityModel",
    "estimators.stacking.LinearThenBoosted",
    "estimators.text_hashing.TextHasher",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "numpy.dtype",
})
"""The non-skops-trusted types of every model the fit stage can save, written out rather than computed: loading
stays cheap and a change to what we trust shows in review. ``tests/test_nuisance_models.py`` keeps it exact: it
fits the models of every ``estimators.nuisance.option_grid()`` config (all values of FitConfig's Literal fields),
saves them, and asserts the union of their untrusted types equals this set."""


def save(obj: Any, path: Path | str) -> None:
    """Serialise ``obj`` (models, lists and dicts of them) with skops."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sio.dump(obj, str(path))


def untrusted_types(path: Path | str) -> list[str]:
    """The types in a skops file that skops does not trust by default (what ``load`` checks)."""
    return sio.get_untrusted_types(file=str(path))


def load(path: Path | str) -> Any:
    """Load a skops file, refusing any type that is neither skops-trusted nor in ``ALLOWED_TYPES``."""
    found = set(untrusted_types(path))
    unknown = sorted(found - ALLOWED_TYPES)
    if unknown:
        raise ValueError(f"{path}: refusing to load untrusted types {unknown}")
    return sio.load(str(path), trusted=sorted(found))
