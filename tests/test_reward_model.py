from pathlib import Path

import numpy as np
import pytest

from estimators.reward_model import (
    fit_reward_model,
    load_reward_model,
    predict_reward,
    save_reward_model,
    validation_mask,
)
from schemas.config import TrainConfig


@pytest.fixture(scope="module")
def toy():
    """The text decides the label: 'great' answers are good, 'awful' ones are not; a third is rated."""
    rng = np.random.default_rng(0)
    n = 3000
    good = rng.random(n) < 0.5
    filler = np.array(["the", "answer", "is", "here", "some", "words"])
    responses = [" ".join([*rng.choice(filler, 5), "great" if g else "awful"]) for g in good]
    observed = (rng.random(n) < 0.35).astype(np.int8)
    label = np.where(observed == 1, (good ^ (rng.random(n) < 0.1)).astype(float), np.nan)
    return {"prompt_id": [f"p{i // 3}" for i in range(n)], "prompt": ["question"] * n, "response": responses,
            "observed": observed, "label": label, "weight": np.where(observed == 1, 1 / 0.35, 0.0),
            "imputed": np.full(n, 0.5)}, good


CFG = TrainConfig(epochs=20, lr=0.5, hash_features=1024, batch_size=128, device="cpu")


@pytest.mark.parametrize("loss", ["naive", "ips", "snips", "dr"])
def test_each_loss_learns_the_text(toy, loss):
    cols, good = toy
    model, metrics = fit_reward_model(cols, loss=loss, cfg=CFG, progress=False)
    pred = predict_reward(model, cols["prompt"], cols["response"])
    assert pred[good].mean() > pred[~good].mean() + 0.3
    assert metrics["n_train"] > metrics["n_val"] > 0 and metrics["loss"] == loss


def test_same_seed_same_model_and_save_load_round_trip(toy, tmp_path: Path):
    cols, _ = toy
    a, _ = fit_reward_model(cols, loss="ips", cfg=CFG, progress=False)
    b, _ = fit_reward_model(cols, loss="ips", cfg=CFG, progress=False)
    pa_, pb = predict_reward(a, cols["prompt"], cols["response"]), predict_reward(b, cols["prompt"], cols["response"])
    np.testing.assert_array_equal(pa_, pb)
    save_reward_model(a, tmp_path, {"loss": "ips"})
    np.testing.assert_array_equal(predict_reward(load_reward_model(tmp_path), cols["prompt"], cols["response"]), pa_)


def test_validation_split_keeps_prompts_together():
    prompts = [f"p{i // 4}" for i in range(4000)]
    val = validation_mask(prompts, 0.2)
    by_prompt: dict[str, set[bool]] = {}
    for p, v in zip(prompts, val, strict=True):
        by_prompt.setdefault(p, set()).add(bool(v))
    assert all(len(s) == 1 for s in by_prompt.values())
    assert 0.15 < val.mean() < 0.25
