"""Saving fitted sklearn models with skops, and loading them only if every type is on an allow-list.

Never pickle: a pickle from disk runs arbitrary code. skops refuses types it does not know unless they are
trusted explicitly; ``ALLOWED_TYPES`` is that list, and a test keeps it equal to what our models need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import skops.io as sio

ALLOWED_TYPES = frozenset({
    "estimators.imputation.ImputationModel",
    "estimators.propensity.PropensityModel",
    "estimators.stacking.LinearThenBoosted",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.calibration._CalibratedClassifier",
    "numpy.dtype",
})


def save(obj: Any, path: Path | str) -> None:
    """Serialise ``obj`` (models, lists and dicts of them) with skops."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sio.dump(obj, str(path))


def untrusted_types(path: Path | str) -> list[str]:
    return sio.get_untrusted_types(file=str(path))


def load(path: Path | str) -> Any:
    """Load a skops file, refusing any type that is neither skops-trusted nor in ``ALLOWED_TYPES``."""
    unknown = sorted(set(untrusted_types(path)) - ALLOWED_TYPES)
    if unknown:
        raise ValueError(f"{path}: refusing to load untrusted types {unknown}")
    return sio.load(str(path), trusted=sorted(set(untrusted_types(path))))
