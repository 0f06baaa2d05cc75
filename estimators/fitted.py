"""What the fit stage fitted, saved as one folder (``models/``) and loaded back as one object.

``FittedModels`` is the handler between the stage that fits and the ones that apply: ``save(models_dir)`` writes
every file of the folder (names from ``schemas.run_dir``, models through ``estimators.persist``: skops, never
pickle) and ``load(models_dir)`` reads them back, as Beam's ``ModelHandler`` separates loading a model from the
transform that uses it (the score stage's DoFn loads it once per worker, in ``setup``). The JSON files are the
fit stage's decisions: ``weights.json`` holds the propensity floor, and after fit it is the only source of it
(:func:`fitted_clip`, ``FittedModels.clip``): ``weights.clip`` in the config is read by fit alone, to choose it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from estimators import persist
from estimators.confounding import saved_effects
from estimators.noise import FlipRates
from schemas import run_dir as rd
from schemas.errors import InputError


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _required(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path}: fitted model not found (run the fit stage first)")
    return path


@dataclass(frozen=True)
class FittedModels:
    """The fitted objects of one fit (the files of ``models/``).

    ``propensity`` is None when the propensity is a logged units column (``fit.propensity_column``),
    ``calibration`` None unless ``fit.noise`` resolved to 'calibrate'; ``positivity`` and ``reference`` are None
    for models fitted before the overlap check and the drift reference existed."""

    featurizer: Any                     # the sklearn ColumnTransformer of estimators.features
    propensity: list | None             # one model per fold
    imputation: list                    # one model per fold
    noise: dict[str, Any]               # noise.json: the flip rates the targets use, and the other estimates
    weighting: dict[str, Any]           # weights.json: the propensity floor, the stabiliser's map
    confounding: dict[str, Any] | list  # confounding.json: the confounder effects and the selection E-value
    calibration: dict[str, list] | None = None      # the clean-reward calibrators
    positivity: dict[str, Any] | None = None        # the fit sample's overlap check
    reference: dict[str, Any] | None = None         # the fit sample's drift profile

    @property
    def clip(self) -> float:
        """The propensity floor fit chose (``weights.json``)."""
        return float(self.weighting["clip"])

    @property
    def flip_rates(self) -> FlipRates:
        return FlipRates.from_dict(self.noise)

    @property
    def confounders(self) -> list[dict]:
        return saved_effects(self.confounding)

    def save(self, models_dir: Path | str) -> None:
        """Write every file of ``models_dir`` (the caller makes it atomic: ``schemas.storage.atomic_dir``)."""
        d = Path(models_dir)
        persist.save(self.featurizer, d / rd.FEATURIZER)
        if self.propensity is not None:
            persist.save(self.propensity, d / rd.PROPENSITY)
        persist.save(self.imputation, d / rd.IMPUTATION)
        if self.calibration is not None:
            persist.save(self.calibration, d / rd.CALIBRATION)
        _write_json(d / rd.NOISE, self.noise)
        _write_json(d / rd.WEIGHTS, self.weighting)
        if self.positivity is not None:
            _write_json(d / rd.POSITIVITY, self.positivity)
        _write_json(d / rd.CONFOUNDING, self.confounding)
        if self.reference is not None:
            _write_json(d / rd.REFERENCE, self.reference)

    @classmethod
    def load(cls, models_dir: Path | str) -> FittedModels:
        """Every file fit wrote to ``models_dir``; a missing one is an InputError naming it (run the fit stage)."""
        d = Path(models_dir)
        weighting = read_weights(d)
        featurizer, imputation = _required(d / rd.FEATURIZER), _required(d / rd.IMPUTATION)
        noise = _read_json(_required(d / rd.NOISE))
        confounding = _read_json(_required(d / rd.CONFOUNDING))
        propensity = None if weighting.get("propensity_column") else persist.load(_required(d / rd.PROPENSITY))
        calibration = persist.load(_required(d / rd.CALIBRATION)) if noise.get("method") == "calibrate" else None
        optional = {name: _read_json(d / file) if (d / file).exists() else None
                    for name, file in (("positivity", rd.POSITIVITY), ("reference", rd.REFERENCE))}
        return cls(featurizer=persist.load(featurizer), propensity=propensity, imputation=persist.load(imputation),
                   noise=noise, weighting=weighting, confounding=confounding, calibration=calibration, **optional)


def read_weights(models_dir: Path | str) -> dict[str, Any]:
    """``weights.json``: the propensity floor and stabiliser fit chose; an InputError if fit has not run."""
    return _read_json(_required(Path(models_dir) / rd.WEIGHTS))


def fitted_clip(models_dir: Path | str) -> float:
    """The propensity floor fit chose: what score applied, and what report and evaluate show and rebuild with."""
    return float(read_weights(models_dir)["clip"])
