"""The estimators the fit stage saves, built from ``[fit]`` in one place.

The skops allow-list test (``tests/test_nuisance_models.py``) builds the featuriser, propensity and imputation
models here for every ``option_grid()`` config, so a new option that puts a new class into a saved model fails it
until ``estimators.persist.ALLOWED_TYPES`` lists the class. That holds for what ``pipelines.fit`` saves only as long
as it builds its models with these functions too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Literal, get_args, get_origin

from pydantic import ValidationError
from sklearn.compose import ColumnTransformer

from estimators.features import make_featurizer
from estimators.imputation import ImputationModel
from estimators.propensity import PropensityModel
from schemas.config import FitConfig


def featurizer(fc: FitConfig) -> ColumnTransformer:
    """The unfitted featuriser of ``fc`` (saved as ``featurizer.skops``)."""
    return make_featurizer(numeric=fc.numeric, categorical=fc.categorical, hash_features=fc.hash_features,
                           ngram_max=fc.ngram_max)


def propensity_model(fc: FitConfig, passthrough: Sequence[int]) -> PropensityModel:
    """The unfitted propensity model of ``fc``; its cross-fitted copies are saved as ``propensity.skops``."""
    C = fc.C if fc.propensity_C is None else fc.propensity_C
    return PropensityModel(model=fc.propensity_model, calibration=fc.calibration, C=C, passthrough=passthrough,
                           random_state=fc.seed)


def imputation_model(fc: FitConfig, passthrough: Sequence[int], model: str | None = None) -> ImputationModel:
    """The unfitted imputation model of ``fc`` (saved as ``imputation.skops``); ``model`` overrides
    ``fc.imputation_model``, e.g. with ``fc.noise_proxy`` for the (unsaved) noise proxy."""
    return ImputationModel(model=model or fc.imputation_model, C=fc.C, passthrough=passthrough, random_state=fc.seed)


def calibration_model(fc: FitConfig) -> ImputationModel:
    """One unfitted calibrator of the clean reward (``estimators.calibration``; its fold copies are saved as
    ``calibration.skops``): a logistic model over a few dense columns, fitted on soft gold labels."""
    return ImputationModel(model="logistic", C=fc.C, random_state=fc.seed)


def choices(annotation: object) -> tuple[object, ...]:
    """The values of a choice field (a ``Literal`` or ``bool``, optionally ``| None``); () for any other field."""
    if annotation is bool:
        return (False, True)
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    args = get_args(annotation)
    if args and type(None) in args:
        inner = [choices(a) for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0]:
            return (*inner[0], None)
    return ()


def option_grid(**fixed: object) -> Iterator[FitConfig]:
    """Every valid ``FitConfig`` with the ``fixed`` other fields, in all combinations of its choice fields.

    Read from the field annotations, so a new ``Literal`` value or choice field is in the grid without a
    change here. Cheap (configs, not fits): callers build the models and fit only the distinct ones.
    """
    fields = {name: choices(f.annotation) for name, f in FitConfig.model_fields.items() if name not in fixed}
    fields = {name: values for name, values in fields.items() if values}
    for combo in itertools.product(*fields.values()):
        values = dict(zip(fields, combo, strict=True))
        for (name, value), extra in COMPANIONS.items():
            if values.get(name) == value:
                values.update({k: v for k, v in extra.items() if k not in fixed})
        try:
            yield FitConfig(**fixed, **values)
        except ValidationError:
            continue


COMPANIONS: dict[tuple[str, object], dict[str, object]] = {("noise", "fixed"): {"flip_rates": [0.2, 0.1]}}
"""Keys a choice needs beside it to be a valid config, for ``option_grid`` (fit.noise = 'fixed' needs
fit.flip_rates; any valid value will do: the grid is about which models get built)."""
