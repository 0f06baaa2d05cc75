"""The reward model learns text, keeps its best epoch, is seeded, round-trips; the train stage writes what it says."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from estimators.reward.cache import validation_mask, write_pointwise_cache
from estimators.reward.calibrate import CALIBRATION_SCALE, calibrate_logits, calibrate_on_gold
from estimators.reward.hashed import CONFIG_FILE, MODEL_FILE
from estimators.reward.model import (
    load_reward_model,
    load_reward_models,
    new_encoder,
    predict_reward,
    save_reward_model,
    score,
)
from estimators.reward.trainer import Checkpoint, fit_pairwise_reward_model, fit_reward_model
from pipelines import train
from schemas import impressions as imp
from schemas import pairwise, pointwise
from schemas import run_dir as rd
from schemas import truth as tr
from schemas import units as un
from schemas.config import Config, InputConfig, TrainConfig, load_config
from schemas.errors import ConfigError, InputError
from schemas.run_dir import RunDir

CFG = TrainConfig(epochs=12, lr=0.3, hash_features=1024, batch_size=128, device="cpu")


def toy_table(n: int = 2400, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """The text decides the label: 'great' answers get a 1, 'awful' ones a 0, 10% flipped: P(1 | x) = 0.9 or 0.1.
    A 1 is rated more often than a 0 (p = 0.5 vs 0.2), as self-selected feedback is: missing not at random."""
    rng = np.random.default_rng(seed)
    good = rng.random(n) < 0.5
    filler = np.array(["the", "answer", "is", "here", "some", "words"])
    responses = [" ".join([*rng.choice(filler, 5), "great" if g else "awful"]) for g in good]
    y = good ^ (rng.random(n) < 0.1)
    p = np.where(y, 0.5, 0.2)
    observed = (rng.random(n) < p).astype(np.int8)
    label = np.where(observed == 1, y.astype(float), np.nan)
    table = pa.table({
        imp.PROMPT_ID: [f"p{i // 3}" for i in range(n)],
        imp.PROMPT: [f"question {i // 3 % 7}" for i in range(n)],
        imp.RESPONSE: responses,
        un.OBSERVED: pa.array(observed, pa.int8()),
        un.LABEL: pa.array(label, pa.float64(), from_pandas=True),          # null where unobserved
        pointwise.WEIGHT_CLIPPED: observed / p,
        pointwise.IMPUTED: np.full(n, 0.5),
    })
    return table, good


@pytest.fixture(scope="module")
def toy() -> tuple[pa.Table, np.ndarray]:
    return toy_table()


def _predict(model, table: pa.Table) -> np.ndarray:
    return predict_reward(model, table[imp.PROMPT].to_pylist(), table[imp.RESPONSE].to_pylist())


@pytest.mark.parametrize("loss", ["naive", "ips", "snips", "dr"])
def test_each_loss_learns_to_rank_good_above_bad(toy, loss):
    table, good = toy
    model, metrics = fit_reward_model(table, loss=loss, cfg=CFG, progress=False)
    pred = _predict(model, table)
    assert roc_auc_score(good, pred) > 0.99
    assert pred[good].mean() > pred[~good].mean() + 0.4
    observed = table[un.OBSERVED].to_numpy() == 1
    assert metrics["n_train"] + metrics["n_val"] == (observed.sum() if loss != "dr" else table.num_rows)
    assert metrics["loss"] == loss and metrics["n_val"] > 0


def test_ips_undoes_the_selection_that_biases_naive(toy):
    """1s are rated 5:2 more often than 0s, so naive over-predicts; weights 1/p bring P(1 | x) back to 0.9 / 0.1."""
    table, good = toy
    cfg = CFG.model_copy(update={"epochs": 40, "patience": 3})   # to convergence: 12 epochs left IPS under-fitted
    naive, _ = fit_reward_model(table, loss="naive", cfg=cfg, progress=False)
    ips, _ = fit_reward_model(table, loss="ips", cfg=cfg, progress=False)
    truth = np.where(good, 0.9, 0.1)
    naive_pred, ips_pred = _predict(naive, table), _predict(ips, table)
    naive_err, ips_err = np.abs(naive_pred - truth).mean(), np.abs(ips_pred - truth).mean()
    assert naive_err > 0.05 and ips_err < 0.7 * naive_err                 # measured: 0.069 vs 0.030
    assert abs(ips_pred.mean() - truth.mean()) < 0.5 * abs(naive_pred.mean() - truth.mean())


def test_hidden_layer_model_learns_and_round_trips(toy, tmp_path: Path):
    table, good = toy
    model, _ = fit_reward_model(table, loss="snips", cfg=CFG.model_copy(update={"hidden": 8, "lr": 0.05}),
                                progress=False)
    pred = _predict(model, table)
    assert roc_auc_score(good, pred) > 0.99
    save_reward_model(model, {"loss": "snips"}, tmp_path)
    np.testing.assert_array_equal(_predict(load_reward_model(tmp_path), table), pred)


def test_returns_the_best_epoch_not_the_last(toy):
    table, _ = toy
    cfg = TrainConfig(epochs=15, lr=2.0, hash_features=1024, batch_size=64, patience=3, device="cpu")
    model, metrics = fit_reward_model(table, loss="naive", cfg=cfg, progress=False)
    val_losses = [h["val_loss"] for h in metrics["history"]]
    assert metrics["best_epoch"] == 1 + int(np.argmin(val_losses)) and metrics["best_val_loss"] == min(val_losses)
    assert len(val_losses) == min(cfg.epochs, metrics["best_epoch"] + cfg.patience)
    # the returned model scores the validation units at exactly the best validation loss
    val = validation_mask(table[imp.PROMPT_ID].to_pylist(), cfg.val_fraction) & (table[un.OBSERVED].to_numpy() == 1)
    p = torch.tensor(_predict(model, table.filter(pa.array(val))), dtype=torch.float64)
    y = torch.tensor(table[un.LABEL].to_numpy(zero_copy_only=False)[val])
    assert torch.nn.functional.binary_cross_entropy(p, y).item() == pytest.approx(metrics["best_val_loss"], rel=1e-4)


def test_same_seed_same_model_and_save_load_round_trip(toy, tmp_path: Path):
    table, _ = toy
    a, _ = fit_reward_model(table, loss="ips", cfg=CFG, progress=False)
    b, _ = fit_reward_model(table.to_pydict(), loss="ips", cfg=CFG, progress=False)     # a mapping works too
    c, _ = fit_reward_model(table, loss="ips", cfg=CFG.model_copy(update={"seed": 1}), progress=False)
    pred = _predict(a, table)
    np.testing.assert_array_equal(pred, _predict(b, table))
    assert not np.array_equal(pred, _predict(c, table))                    # the seed is what makes them equal
    save_reward_model(a, {"loss": "ips"}, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["model"]["hash_features"] == CFG.hash_features
    np.testing.assert_array_equal(_predict(load_reward_model(tmp_path), table), pred)
    assert set(torch.load(tmp_path / MODEL_FILE, weights_only=True)) == set(a.state_dict())


def test_validation_split_keeps_prompts_together_and_is_stable():
    prompts = [f"p{i // 4}" for i in range(4000)]
    val = validation_mask(prompts, 0.2)
    by_prompt: dict[str, set[bool]] = {}
    for p, v in zip(prompts, val, strict=True):
        by_prompt.setdefault(p, set()).add(bool(v))
    assert all(len(s) == 1 for s in by_prompt.values())
    assert 0.15 < val.mean() < 0.25
    # blake2b, not hash(): the same split in every process and on every run (a change here reshuffles old runs)
    assert validation_mask([f"p{i}" for i in range(12)], 0.5).tolist() == EXPECTED_SPLIT


EXPECTED_SPLIT = [False, True, False, False, True, False, False, False, False, True, True, True]


@pytest.mark.parametrize(("change", "message"), [
    ({un.OBSERVED: pa.array([2] * 30, pa.int8())}, "observed must be 0/1"),
    ({un.LABEL: pa.array([None] * 30, pa.float64())}, "rows of 'label' are not in"),
    ({pointwise.WEIGHT_CLIPPED: pa.array([-1.0] * 30)}, "rows of 'weight_clipped' are not in"),
])
def test_bad_inputs_are_named(change, message):
    table = toy_table(30)[0]
    table = table.set_column(table.schema.get_field_index(next(iter(change))), next(iter(change)),
                             next(iter(change.values())))
    with pytest.raises(InputError, match=message):
        fit_reward_model(table, loss="ips", cfg=CFG, progress=False)


def test_missing_column_is_named(toy):
    with pytest.raises(InputError, match="column 'imputed' missing"):
        fit_reward_model(toy[0].drop_columns([pointwise.IMPUTED]), loss="dr", cfg=CFG, progress=False)


def test_train_stage_writes_main_and_baselines(toy, tmp_path: Path):
    table, good = toy
    run = RunDir(tmp_path / "run")
    (run.path(rd.POINTWISE)).mkdir(parents=True)
    pq.write_table(table, run.path(rd.POINTWISE) / "part-00000.parquet")
    cfg = Config(input=InputConfig(impressions=["unused"], signals=["unused"]),
                 train=CFG.model_copy(update={"loss": "ips", "baselines": ["naive", "ips", "dr"], "epochs": 4}))
    result = train.execute(run, cfg).to_manifest()
    assert result["counts"] == {"rows": table.num_rows, "observed": int(table[un.OBSERVED].to_numpy().sum())}
    assert list(result["diagnostics"]) == ["ips", "naive", "dr"]                # main first, ips not twice
    root = run.path(rd.REWARD_MODEL)
    assert sorted(p.name for p in (root / rd.BASELINES).iterdir()) == ["dr", "naive"]
    metrics = json.loads((root / rd.REWARD_METRICS).read_text())
    assert metrics["loss"] == "ips" and metrics["best_val_loss"] == result["diagnostics"]["ips"]["val_loss"]
    assert len(metrics["history"]) == metrics["epochs_run"] and metrics["device"] == "cpu"
    models = load_reward_models(run.path(rd.REWARD_MODEL))
    assert list(models) == ["ips", "dr", "naive"]
    assert all(roc_auc_score(good, _predict(m, table)) > 0.99 for m in models.values())
    assert not list(tmp_path.glob("run/.*")), "no staging directory left behind"


@pytest.mark.parametrize("loss", ["causalrm_ips", "causalrm_dr"])
def test_noise_aware_losses_undo_the_flips(toy, loss):
    """Labels are the clean class flipped 10% each way: IPS learns P(label=1 | x) = 0.9 / 0.1, the corrected
    loss with (ρ01, ρ10) = (0.1, 0.1) learns P(r*=1 | x), which is 1 / 0 here."""
    table, good = toy
    ips, _ = fit_reward_model(table, loss="ips", cfg=CFG, progress=False)
    model, metrics = fit_reward_model(table, loss=loss, cfg=CFG, progress=False, flip_rates=(0.1, 0.1))
    pred, ips_pred = _predict(model, table), _predict(ips, table)
    assert roc_auc_score(good, pred) > 0.99 and metrics["flip_rates"] == [0.1, 0.1]
    clean = good.astype(float)
    assert np.abs(pred - clean).mean() < 0.8 * np.abs(ips_pred - clean).mean()   # measured: 0.71 (ips), 0.46 (dr)
    assert pred[good].mean() > ips_pred[good].mean() and pred[~good].mean() < ips_pred[~good].mean()
    with pytest.raises(ConfigError, match="flip rates"):
        fit_reward_model(table, loss=loss, cfg=CFG, progress=False)


def test_train_stage_reads_the_fitted_flip_rates(toy, tmp_path: Path):
    table, _ = toy
    run = RunDir(tmp_path / "run")
    run.path(rd.POINTWISE).mkdir(parents=True)
    pq.write_table(table, run.path(rd.POINTWISE) / "part-00000.parquet")
    cfg = Config(input=InputConfig(impressions=["unused"], signals=["unused"]),
                 train=CFG.model_copy(update={"loss": "causalrm_dr", "baselines": [], "epochs": 3}))
    with pytest.raises(InputError, match="flip rates not found"):
        train.execute(run, cfg)
    run.path(rd.NOISE_MODEL).parent.mkdir(parents=True)
    run.path(rd.NOISE_MODEL).write_text(json.dumps({"rho01": 0.2, "rho10": 0.1, "method": "audit", "n": 500,
                                                    "estimates": {}}))
    train.execute(run, cfg)
    metrics = json.loads((run.path(rd.REWARD_MODEL) / rd.REWARD_METRICS).read_text())
    assert metrics["loss"] == "causalrm_dr" and metrics["flip_rates"] == [0.2, 0.1]


def toy_pairs(n: int = 1500, seed: int = 1) -> pa.Table:
    """Pairs within a prompt: the 'great' answer chosen over the 'awful' one, 10% of them the wrong way round."""
    rng = np.random.default_rng(seed)
    filler = np.array(["the", "answer", "is", "here", "some", "words"])

    def text(word: str) -> str:
        return " ".join([*rng.choice(filler, 5), word])

    swap = rng.random(n) < 0.1
    good, bad = [text("great") for _ in range(n)], [text("awful") for _ in range(n)]
    return pa.table({
        pairwise.PROMPT_ID: [f"p{i}" for i in range(n)], pairwise.PROMPT: [f"question {i % 7}" for i in range(n)],
        pairwise.CHOSEN: [b if s else g for g, b, s in zip(good, bad, swap, strict=True)],
        pairwise.REJECTED: [g if s else b for g, b, s in zip(good, bad, swap, strict=True)],
        pairwise.WEIGHT: rng.uniform(0.5, 1.5, n), pairwise.MARGIN: np.zeros(n),
    })


def test_bradley_terry_model_learns_the_preference_and_scores_single_responses():
    pairs = toy_pairs()
    model, metrics = fit_pairwise_reward_model(pairs, cfg=CFG, progress=False)
    assert metrics["loss"] == "bt" and 0.85 < metrics["val_pair_accuracy"] <= 0.95     # 10% of pairs are swapped
    table, good = toy_table(600, seed=3)
    assert roc_auc_score(good, _predict(model, table)) > 0.99
    with pytest.raises(InputError, match="column 'margin' missing"):
        fit_pairwise_reward_model(pairs.drop_columns([pairwise.MARGIN]), cfg=CFG, progress=False)


def test_train_stage_trains_bt_on_the_pairwise_dataset(toy, tmp_path: Path):
    table, good = toy
    run = RunDir(tmp_path / "run")
    for name, t in ((rd.POINTWISE, table), (rd.PAIRWISE, toy_pairs(600))):
        run.path(name).mkdir(parents=True)
        pq.write_table(t, run.path(name) / "part-00000.parquet")
    cfg = Config(input=InputConfig(impressions=["unused"], signals=["unused"]),
                 train=CFG.model_copy(update={"loss": "ips", "baselines": ["bt"], "epochs": 6}))
    result = train.execute(run, cfg).to_manifest()
    assert list(result["diagnostics"]) == ["ips", "bt"]
    assert any("pairwise" in i["path"] for i in result["inputs"])
    assert roc_auc_score(good, _predict(load_reward_models(run.path(rd.REWARD_MODEL))["bt"], table)) > 0.99


def _stage_run(tmp_path: Path, table: pa.Table, **train_settings) -> tuple[RunDir, Config]:
    run = RunDir(tmp_path / "run")
    run.path(rd.POINTWISE).mkdir(parents=True)
    pq.write_table(table, run.path(rd.POINTWISE) / "part-00000.parquet")
    cfg = Config(input=InputConfig(impressions=["unused"], signals=["unused"]),
                 train=CFG.model_copy(update=train_settings))
    return run, cfg


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(toy, tmp_path: Path, crash_then_resume):
    table, _ = toy
    cfg = CFG.model_copy(update={"epochs": 5, "patience": 5})
    whole, whole_metrics = fit_reward_model(table, loss="ips", cfg=cfg, progress=False)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    saved: list[int] = []

    def fit(checkpoint):
        if checkpoint.resume:                               # what the crashed attempt left
            saved.append(len(torch.load(path, weights_only=True)["history"]))
        return fit_reward_model(table, loss="ips", cfg=cfg, progress=False, checkpoint=checkpoint)

    resumed, metrics = crash_then_resume(fit, path)
    assert saved == [2]                                     # epochs 1 and 2 were saved
    assert [h["val_loss"] for h in metrics["history"]] == [h["val_loss"] for h in whole_metrics["history"]]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                  strict=True))
    with pytest.raises(InputError, match="other inputs or settings"):
        fit_reward_model(table, loss="ips", cfg=cfg, progress=False, checkpoint=Checkpoint(path, "new", resume=True))


def test_train_stage_resumes_only_what_did_not_finish(toy, tmp_path: Path, monkeypatch, capsys):
    table, _ = toy
    run, cfg = _stage_run(tmp_path, table, loss="ips", baselines=["naive", "dr"], epochs=3)
    real_fit = train.fit_reward_model

    def dr_fails(cache, *, loss, **kwargs):
        if loss == "dr":
            raise RuntimeError("out of memory")
        return real_fit(cache, loss=loss, **kwargs)

    monkeypatch.setattr(train, "fit_reward_model", dr_fails)
    with pytest.raises(RuntimeError):
        train.execute(run, cfg)
    monkeypatch.undo()
    assert not run.path(rd.REWARD_MODEL).exists()
    assert sorted(p.name for p in train.checkpoint_root(run).iterdir() if p.name != ".cache") == ["ips", "naive"]
    capsys.readouterr()
    train.execute(run, cfg, resume=True)
    err = capsys.readouterr().err
    assert "[ips] resumed after epoch 3 (finished)" in err and "[naive] resumed after epoch" in err
    assert "[dr] resumed" not in err and "[dr] epoch 1/3" in err
    assert sorted(load_reward_models(run.path(rd.REWARD_MODEL))) == ["dr", "ips", "naive"]
    assert not train.checkpoint_root(run).exists(), "checkpoints are removed once the output is committed"


def test_train_metrics_against_the_truth_when_the_config_names_it(toy, tmp_path: Path):
    table, good = toy
    ids = [f"i{k}" for k in range(table.num_rows)]
    table = table.append_column(un.IMPRESSION_ID, pa.array(ids))
    truth = tmp_path / "truth.parquet"
    pq.write_table(pa.table({tr.IMPRESSION_ID: ids, tr.REWARD_TRUE: np.where(good, 0.9, 0.1)}), truth)
    run, cfg = _stage_run(tmp_path, table, loss="ips", baselines=[], epochs=6)
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"truth": str(truth)})})
    result = train.execute(run, cfg).to_manifest()
    metrics = json.loads((run.path(rd.REWARD_MODEL) / rd.REWARD_METRICS).read_text())["truth"]
    val = validation_mask(table[imp.PROMPT_ID].to_pylist(), CFG.val_fraction)
    assert metrics["split"] == "validation" and metrics["units"] == val.sum() == metrics["units"]
    assert metrics["r2"] > 0.8 and metrics["pairwise_accuracy"] > 0.95
    assert result["diagnostics"]["ips"]["val_r2_vs_truth"] == metrics["r2"]


def test_score_function_on_new_data(toy, tmp_path: Path):
    table, _ = toy
    model, _ = fit_reward_model(table, loss="naive", cfg=CFG, progress=False)
    save_reward_model(model, {"loss": "naive"}, tmp_path / "m")
    prompts, responses = ["question 1", None], ["the answer is great", "awful words"]
    from_dir = score(tmp_path / "m", prompts, responses)
    assert np.array_equal(from_dir, score(model, prompts, responses)) and from_dir[0] > 0.7 > 0.3 > from_dir[1]


def test_cli_train_flags(toy, tmp_path: Path, capsys):
    from pipelines.orchestration.cli import main

    table, _ = toy
    run, cfg = _stage_run(tmp_path, table, loss="naive", baselines=[], epochs=2)
    run.config_path.write_text(cfg.to_toml())
    if not torch.cuda.is_available():
        assert main(["train", str(run.root), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["train", str(run.root), "--device", "cpu", "--resume"]) == 0
    metrics = json.loads((run.path(rd.REWARD_MODEL) / rd.REWARD_METRICS).read_text())
    assert metrics["device"] == "cpu"
    manifest = json.loads(run.path(rd.MANIFEST).read_text())
    cuda = load_config(run.config_path).model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})
    assert manifest["stages"]["train"]["status"] == "ok" and manifest["config_hash"] == cuda.digest()


def test_train_stage_with_dense_features(toy, tmp_path: Path):
    """train.numeric reaches the pointwise models and, where a pair can have it (response_length), bt."""
    table, good = toy
    table = table.append_column("position", pa.array(np.arange(table.num_rows) % 5, pa.float64()))
    run, cfg = _stage_run(tmp_path, table, loss="ips", baselines=["bt"], epochs=3, numeric=["response_length"])
    run.path(rd.PAIRWISE).mkdir(parents=True)
    pq.write_table(toy_pairs(600), run.path(rd.PAIRWISE) / "part-00000.parquet")
    train.execute(run, cfg)
    models = load_reward_models(run.path(rd.REWARD_MODEL))
    assert all(m.dense.dim == 1 and m.dense.numeric[0][0] == "response_length" for m in models.values())
    assert roc_auc_score(good, _predict(models["ips"], table)) > 0.99
    with pytest.raises(ConfigError, match="pairwise dataset has no"):
        train.execute(run, cfg.model_copy(update={"train": cfg.train.model_copy(update={"numeric": ["position"]})}))


def test_a_chunk_without_rated_units_and_a_record_batch_input(toy, tmp_path: Path):
    """An input batch whose units are all unrated (a file's short last batch) is skipped, not a crash."""
    table, _ = toy
    unrated = table.filter(pc.equal(table[un.OBSERVED], 0)).slice(0, 5).to_batches()[0]
    batches = [*table.to_batches(max_chunksize=1000), unrated]
    cache = write_pointwise_cache(iter(batches), tmp_path / "c", args=("weight",), observed_only=True, cfg=CFG,
                                  encoder=new_encoder(CFG))
    observed = int(table[un.OBSERVED].to_numpy().sum())
    assert cache.rows("train") + cache.rows("val") == observed and cache.meta["counts"]["rows_read"] == 2405
    model, metrics = fit_reward_model(table.to_batches()[0], loss="naive", cfg=CFG, progress=False)
    assert metrics["n_rows"] == table.to_batches()[0].num_rows


def test_factorisation_machine_learns_user_item_interactions(tmp_path: Path):
    """A rank-2 user × item world with no main effects: a linear model over id tokens learns nothing, the
    factorisation machine (matrix factorisation over the two tokens) does, and it saves and loads."""
    rng = np.random.default_rng(0)
    U, V = rng.normal(size=(80, 2)), rng.normal(size=(80, 2))
    users, items = rng.integers(0, 80, 8000), rng.integers(0, 80, 8000)
    p = 1 / (1 + np.exp(-2.5 * np.einsum("ij,ij->i", U[users], V[items])))
    label = (rng.random(8000) < p).astype(float)
    table = pa.table({imp.PROMPT_ID: [f"r{k}" for k in range(8000)], imp.PROMPT: [f"user{u}" for u in users],
                      imp.RESPONSE: [f"item{i}" for i in items], un.OBSERVED: pa.array(np.ones(8000, np.int8)),
                      un.LABEL: label})
    cfg = CFG.model_copy(update={"hash_features": 4096, "lr": 0.05, "epochs": 40, "patience": 4})
    linear, _ = fit_reward_model(table, loss="naive", cfg=cfg, progress=False)
    fm, _ = fit_reward_model(table, loss="naive", cfg=cfg.model_copy(update={"factors": 4}), progress=False)
    assert roc_auc_score(label, _predict(linear, table)) < 0.6 < 0.75 < roc_auc_score(label, _predict(fm, table))
    save_reward_model(fm, {"loss": "naive"}, tmp_path / "fm")
    assert np.allclose(_predict(load_reward_model(tmp_path / "fm"), table), _predict(fm, table))


def test_validation_split_by_unit_for_id_data(toy, tmp_path: Path):
    """val_by = unit holds out units, not prompts: every prompt keeps units on the training side."""
    table, _ = toy
    table = table.append_column(un.IMPRESSION_ID, pa.array([f"i{k}" for k in range(table.num_rows)]))
    cfg = CFG.model_copy(update={"val_by": "unit", "val_fraction": 0.3})
    cache = write_pointwise_cache(table, tmp_path / "c", args=("weight",), observed_only=False, cfg=cfg,
                                  encoder=new_encoder(cfg))
    assert cache.rows("val") == validation_mask(table[un.IMPRESSION_ID].to_pylist(), 0.3).sum()
    with pytest.raises(InputError, match="impression_id"):
        fit_reward_model(toy[0], loss="naive", cfg=cfg, progress=False)


def _tensors(**columns) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in columns.items()}


def test_calibration_recovers_a_known_affine_map():
    """Labels drawn from σ(2s − 1): Platt scaling with the naive risk finds a ≈ 2, b ≈ −1."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=40_000)
    y = (rng.random(s.size) < 1 / (1 + np.exp(-(2 * s - 1)))).astype(float)
    fitted = calibrate_logits("naive", torch.tensor(s), _tensors(label=y, observed=np.ones(s.size)))
    assert fitted["scale"] == pytest.approx(2.0, abs=0.06) and fitted["shift"] == pytest.approx(-1.0, abs=0.05)
    assert fitted["val_loss_after"] < fitted["val_loss_before"]


def test_calibration_with_the_corrected_risk_targets_the_clean_rate():
    """A model that learned nothing (s = noise) on labels that are selected (1s rated twice as often) and flipped
    (ρ01, ρ10) = (0.2, 0.1): naive calibration lands on the rated, noisy rate; causalrm_ips's on the clean rate
    0.5, with a slope near 0 (the scores carry no signal)."""
    rng = np.random.default_rng(1)
    n = 60_000
    clean = rng.random(n) < 0.5
    p = np.where(clean, 0.4, 0.2)
    observed = rng.random(n) < p
    noisy = np.where(clean, rng.random(n) >= 0.2, rng.random(n) < 0.1)
    label = np.where(observed, noisy.astype(float), np.nan)
    s = torch.tensor(rng.normal(scale=0.5, size=n))
    cols = _tensors(label=label, observed=observed.astype(np.int8), weight=observed / p)
    naive = calibrate_logits("naive", s, cols)
    fixed = calibrate_logits("causalrm_ips", s, cols, {"rho01": 0.2, "rho10": 0.1})
    rated_rate = (2 / 3) * 0.8 + (1 / 3) * 0.1                           # P(r=1 | rated) = 0.567
    assert 1 / (1 + np.exp(-naive["shift"])) == pytest.approx(rated_rate, abs=0.01)
    assert 1 / (1 + np.exp(-fixed["shift"])) == pytest.approx(0.5, abs=0.02)
    assert naive["scale"] < 0.05 and fixed["scale"] < 0.05


def test_gold_calibration_keeps_rankings_sets_the_level_and_is_saved(toy, tmp_path: Path):
    """Naive learns the rated (selected) rate; an audit of clean labels on random units puts the level back, with
    the ranking untouched; the map is saved with the model, and a model saved without one loads as identity."""
    table, good = toy
    model, _ = fit_reward_model(table, loss="naive", cfg=CFG, progress=False)
    plain = _predict(model, table)
    rng = np.random.default_rng(3)
    audit = rng.random(table.num_rows) < 0.3
    clean = good ^ (rng.random(good.size) < 0.1)                  # r* ~ Bernoulli(0.9 / 0.1): not separable
    prompts, responses = table[imp.PROMPT].to_pylist(), table[imp.RESPONSE].to_pylist()
    fitted = calibrate_on_gold(model, [p for p, a in zip(prompts, audit, strict=True) if a],
                               [r for r, a in zip(responses, audit, strict=True) if a], clean[audit].astype(float))
    assert CALIBRATION_SCALE[0] <= fitted["scale"] <= CALIBRATION_SCALE[1]
    assert fitted["val_loss_after"] < fitted["val_loss_before"] and fitted["n_gold"] == audit.sum()
    pred = _predict(model, table)
    logit = np.log(plain / (1 - plain))
    np.testing.assert_allclose(np.log(pred / (1 - pred)), fitted["scale"] * logit + fitted["shift"], atol=1e-3)
    assert roc_auc_score(good, pred) == roc_auc_score(good, plain)
    assert abs(pred.mean() - clean.mean()) < 0.02 < abs(plain.mean() - clean.mean())
    save_reward_model(model, {"loss": "naive"}, tmp_path)
    np.testing.assert_array_equal(_predict(load_reward_model(tmp_path), table), pred)
    state = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ("scale", "shift")}, tmp_path / MODEL_FILE)
    np.testing.assert_allclose(_predict(load_reward_model(tmp_path), table), plain, rtol=1e-6)
    with pytest.raises(ValueError, match="gold labels"):
        calibrate_on_gold(model, ["q"], ["a"], np.array([2.0]))


def test_train_stage_calibrates_on_the_audit_when_asked(toy, tmp_path: Path):
    table, good = toy
    audited = np.random.default_rng(4).random(table.num_rows) < 0.3
    gold = pa.array(np.where(audited, good.astype(float), np.nan), pa.float64(), from_pandas=True)
    run, cfg = _stage_run(tmp_path, table.append_column(un.LABEL_GOLD, gold), loss="naive", baselines=["ips"],
                          calibrate="gold")
    result = train.execute(run, cfg).to_manifest()
    for loss in ("naive", "ips"):
        cal = result["diagnostics"][loss]["calibration"]
        assert cal["n_gold"] == audited.sum() and cal["val_loss_after"] < cal["val_loss_before"]
    pred = _predict(load_reward_models(run.path(rd.REWARD_MODEL))["naive"], table)
    assert abs(pred.mean() - good.mean()) < 0.02
    run, cfg = _stage_run(tmp_path / "no-audit", table, calibrate="gold")
    with pytest.raises(InputError, match="label_gold"):
        train.execute(run, cfg)
