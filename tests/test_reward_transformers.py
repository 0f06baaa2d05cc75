"""The reward trainer on transformer backbones (tiny random BERT and Llama folders from tests/backbones.py): every
loss trains, text is truncated but never dropped, optimisation settings mean what they say, resume and processes
do not change the result, and the saved folder is a plain Hugging Face model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from estimators.losses import bradley_terry
from estimators.reward.backbones import OBSFEED_FILE, PairTokenizer, load_tokenizer
from estimators.reward.cache import CHOSEN, REJECTED
from estimators.reward.data import TRAIN, DeviceBatch, StreamingBatches
from estimators.reward.model import load_reward_model, load_reward_models, predict_reward, save_reward_model, score
from estimators.reward.trainer import _Objective, build_cache, fit_reward_model, lr_factor
from pipelines.orchestration.cli import main
from pipelines.orchestration.registry import freeze_config
from schemas import impressions as imp
from schemas import pairwise, pointwise
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config, InputConfig, TrainConfig
from schemas.errors import ConfigError
from schemas.run_dir import RunDir

GOOD, BAD = "good helpful correct clear", "bad wrong rude harmful"


def texts(n: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """Prompts of 3-8 filler words; a response says 'good ...' or 'bad ...' after 2-6 filler words."""
    from tests.backbones import WORDS

    rng = np.random.default_rng(seed)
    filler = [w for w in WORDS[40:200] if w not in GOOD.split() + BAD.split()]
    good = rng.random(n) < 0.5
    prompts = [" ".join(rng.choice(filler, rng.integers(3, 9))) for _ in range(n)]
    responses = [" ".join([*rng.choice(filler, rng.integers(2, 7)), *(GOOD if g else BAD).split()[:2]])
                 for g in good]
    return prompts, responses, good


def units(n: int = 240, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    prompts, responses, good = texts(n, seed)
    rng = np.random.default_rng(seed + 1)
    p = np.where(good, 0.7, 0.3)
    observed = (rng.random(n) < p).astype(np.int8)
    table = pa.table({
        imp.IMPRESSION_ID: [f"i{k}" for k in range(n)], imp.PROMPT_ID: [f"p{k // 2}" for k in range(n)],
        imp.PROMPT: prompts, imp.RESPONSE: responses, un.OBSERVED: pa.array(observed, pa.int8()),
        un.LABEL: pa.array(np.where(observed == 1, good.astype(float), np.nan), pa.float64(), from_pandas=True),
        pointwise.WEIGHT_CLIPPED: observed / p, pointwise.IMPUTED: np.where(good, 0.8, 0.2)})
    return table, good


def pairs(n: int = 120, seed: int = 0) -> pa.Table:
    prompts, responses, good = texts(2 * n, seed)
    chosen = [r for r, g in zip(responses, good, strict=True) if g][:n]
    rejected = [r for r, g in zip(responses, good, strict=True) if not g][:n]
    m = min(len(chosen), len(rejected))
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            pairwise.PROMPT_ID: [f"p{k}" for k in range(m)],
            pairwise.PROMPT: prompts[:m],
            pairwise.CHOSEN: chosen[:m],
            pairwise.REJECTED: rejected[:m],
            pairwise.WEIGHT: rng.uniform(0.5, 1.5, m),
            pairwise.MARGIN: rng.uniform(0, 0.2, m),
        }
    )


def cfg_for(backbone: Path, **kw) -> TrainConfig:
    base = {"backbone": str(backbone), "max_length": 24, "batch_size": 16, "epochs": 3, "patience": 3, "lr": 2e-3,
            "device": "cpu", "val_fraction": 0.25}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("backbone", ["tiny_encoder_dir", "tiny_decoder_dir"])
@pytest.mark.parametrize("loss", ["naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr", "bt"])
def test_every_loss_trains_on_both_backbones(backbone, loss, request):
    folder = request.getfixturevalue(backbone)
    data = pairs() if loss == "bt" else units()[0]
    rates = (0.1, 0.1) if loss.startswith("causalrm") else None
    model, metrics = fit_reward_model(data, loss=loss, cfg=cfg_for(folder), flip_rates=rates, progress=False)
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    assert metrics["backbone"]["backbone"] == "transformer" and metrics["tokens_per_s"] > 0
    assert metrics["optimisation"]["lr_schedule"] == "linear" and metrics["optimisation"]["max_grad_norm"] == 1.0
    if loss == "bt":
        assert metrics["val_pair_accuracy"] > 0.5


def test_weighted_bradley_terry_is_the_formula_on_the_models_own_scores(tiny_encoder_dir, tmp_path: Path):
    cfg = cfg_for(tiny_encoder_dir)
    cache = build_cache(pairs(40), tmp_path / "c", loss="bt", cfg=cfg)
    from estimators.reward.model import new_model

    model = new_model(cfg, cache).eval()
    host = next(StreamingBatches(cache, TRAIN, batch_size=8, shuffle=False).epoch(0))
    batch = DeviceBatch.from_batch(host, pad_id=cache.pad_id)
    with torch.no_grad():
        value = _Objective("bt", None, cache.pad_id)(model, batch)
        s_c = model(**batch.features[CHOSEN])                 # each side alone, its own padding
        s_r = model(**batch.features[REJECTED])
    w, m = batch.columns["weight"].double(), batch.columns["margin"].double()
    by_hand = (w * torch.log1p(torch.exp(-(s_c.double() - s_r.double() - m)))).mean()
    assert float(value) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(bradley_terry(s_c, s_r, w, m)) == pytest.approx(float(by_hand), rel=1e-5)


def test_long_prompt_is_cut_from_the_left_and_the_row_kept_and_counted(tiny_encoder_dir):
    tok = load_tokenizer(tiny_encoder_dir)
    encode = PairTokenizer(tok, max_length=12)                # [CLS] p [SEP] r [SEP]: 9 tokens of text
    prompt = "one two three four five first last next other same"
    short = encode.encode(["hello there"], ["a good answer"])
    assert list(short.ids) == tok("hello there", "a good answer")["input_ids"]   # untruncated: the tokenizer's own
    long = encode.encode([prompt, prompt], ["a good answer", "good " * 20])
    ids = [long.ids[long.offsets[i]:long.offsets[i + 1]].tolist() for i in range(2)]
    assert len(ids[0]) == len(ids[1]) == 12
    assert tok.decode(ids[0], skip_special_tokens=True) == "five first last next other same a good answer"
    assert tok.decode(ids[1], skip_special_tokens=True) == " ".join(["good"] * 9)   # the response's start
    assert long.prompt_truncated.tolist() == [True, True] and long.response_truncated.tolist() == [False, True]
    with pytest.raises(ConfigError, match="max_length = 3"):
        PairTokenizer(tok, max_length=3)


def test_truncated_rows_are_trained_on_and_counted(tiny_encoder_dir):
    table, _ = units(120)
    long_prompts = [" ".join([p] * 6) for p in table[imp.PROMPT].to_pylist()]
    table = table.set_column(table.schema.get_field_index(imp.PROMPT), imp.PROMPT, pa.array(long_prompts))
    _, metrics = fit_reward_model(table, loss="dr", cfg=cfg_for(tiny_encoder_dir, epochs=1), progress=False)
    assert metrics["n_train"] + metrics["n_val"] == 120 and metrics["truncated"]["prompt_truncated"] > 60
    with pytest.raises(ConfigError, match="below the shortest response"):
        fit_reward_model(table, loss="dr", cfg=cfg_for(tiny_encoder_dir, max_length=4), progress=False)


def test_grad_accumulation_and_checkpointing_do_not_change_the_result(tiny_encoder_dir):
    table, _ = units(160)
    cfg = cfg_for(tiny_encoder_dir, batch_size=8, epochs=2, patience=2)
    whole, _ = fit_reward_model(table, loss="ips", cfg=cfg, progress=False)
    accumulated, metrics = fit_reward_model(table, loss="ips", progress=False,
                                            cfg=cfg.model_copy(update={"batch_size": 4, "grad_accumulation": 2}))
    recomputed, _ = fit_reward_model(table, loss="ips", progress=False,
                                     cfg=cfg.model_copy(update={"gradient_checkpointing": True}))
    assert metrics["optimisation"]["step_rows"] == 8
    _assert_same_model(whole, accumulated, table)
    _assert_same_model(whole, recomputed, table)


def _assert_same_model(a, b, table: pa.Table) -> None:
    """The same rewards up to float summation order. (Weights are not compared one by one: Adam divides by the
    root of a gradient's square, so a weight whose gradient is ~0 moves by ±lr on a rounding difference.)"""
    prompts, responses = table[imp.PROMPT].to_pylist(), table[imp.RESPONSE].to_pylist()
    np.testing.assert_allclose(predict_reward(a, prompts, responses), predict_reward(b, prompts, responses),
                               atol=2e-4)


@pytest.mark.parametrize("loss", ["ips", "naive", "snips", "dr", "bt"])
def test_micro_batches_add_up_to_the_whole_batchs_gradient(loss, tmp_path: Path):
    """Accumulated micro-batches (uneven: 4, 4, 4, 3 rows) weighted by their share of the risk's mass give the
    gradient of the whole batch's risk: for means over rows, and for naive (Σ o) and snips (Σ o·w), which are not."""
    from estimators.reward.cache import write_pointwise_cache
    from estimators.reward.model import new_encoder, new_model
    from estimators.reward.trainer import _micro_batches

    cfg = TrainConfig(hash_features=256, batch_size=4, grad_accumulation=4, device="cpu", hidden=4)
    if loss == "bt":
        cache = build_cache(pairs(60), tmp_path / "c", loss=loss, cfg=cfg)
    else:                                                  # every unit, rated or not: naive's mass is Σ o
        cache = write_pointwise_cache(units(80)[0], tmp_path / "c", args=("weight", "imputed"), observed_only=False,
                                      cfg=cfg, encoder=new_encoder(cfg))
    model = new_model(cfg, cache)
    objective = _Objective(loss, None, 0)
    host = next(StreamingBatches(cache, TRAIN, batch_size=15, shuffle=False).epoch(0))
    objective(model, DeviceBatch.from_batch(host)).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = _micro_batches(host, loss, cfg, 0, pin=False)
    assert [part.size for part, _ in parts] == [4, 4, 4, 3]
    for part, share in parts:
        (objective(model, part) * share).backward()
    for a, p in zip(whole, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


def test_pairwise_training_leaves_the_output_bias_alone():
    """s(chosen) − s(rejected) cancels the bias: its gradient is rounding noise, which AdamW would amplify."""
    model, _ = fit_reward_model(pairs(80), loss="bt", progress=False,
                                cfg=TrainConfig(hash_features=256, epochs=4, device="cpu"))
    assert float(model.bias) == 0.0


def test_lora_initialisation_follows_train_seed(tiny_encoder_dir):
    pytest.importorskip("peft")
    table, _ = units(80)
    cfg = cfg_for(tiny_encoder_dir, lora_rank=2, epochs=1)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)                    # the caller's RNG must not decide the adapters
        runs.append(fit_reward_model(table, loss="naive", cfg=cfg, progress=False)[0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(),
                                                  strict=True))


def test_learning_rate_warms_up_then_decays():
    factors = [lr_factor(s, total=10, warmup=2, schedule="linear") for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(0.125) and factors == sorted(
        factors[:2]) + sorted(factors[2:], reverse=True)
    assert lr_factor(5, total=10, warmup=0, schedule="constant") == 1.0
    assert lr_factor(6, total=10, warmup=2, schedule="cosine") == pytest.approx(0.5)


def test_trainable_layers_freeze_the_rest_and_lora_merges_into_a_plain_folder(tiny_encoder_dir, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    table, _ = units(120)
    before = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_dir, num_labels=1).state_dict()
    frozen, metrics = fit_reward_model(table, loss="naive", cfg=cfg_for(tiny_encoder_dir, trainable_layers=1,
                                                                        epochs=1), progress=False)
    after = frozen.model.state_dict()
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[embeddings], before[embeddings])
    assert torch.equal(after["bert.encoder.layer.0.attention.self.query.weight"],
                       before["bert.encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(after["bert.encoder.layer.1.attention.self.query.weight"],
                           before["bert.encoder.layer.1.attention.self.query.weight"])
    assert metrics["trainable_parameters"] < metrics["parameters"] / 2
    pytest.importorskip("peft")
    lora, metrics = fit_reward_model(table, loss="naive", cfg=cfg_for(tiny_encoder_dir, lora_rank=2, epochs=1),
                                     progress=False)
    assert metrics["trainable_parameters"] < metrics["parameters"] / 4
    save_reward_model(lora, {"loss": "naive"}, tmp_path / "lora")
    _assert_plain_transformers_scores_as_obsfeed(tmp_path / "lora", lora, table)


def _assert_plain_transformers_scores_as_obsfeed(folder: Path, model, table: pa.Table,
                                                 max_length: int | None = None) -> None:
    """No obsfeed import: AutoTokenizer(prompt, response) → AutoModelForSequenceClassification → σ(logit); with
    ``max_length``, truncated as the README says (the prompt only, from the left)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts, responses = table[imp.PROMPT].to_pylist()[:20], table[imp.RESPONSE].to_pylist()[:20]
    tok = AutoTokenizer.from_pretrained(folder)
    tok.truncation_side = "left"
    cut = {"truncation": "only_first", "max_length": max_length} if max_length else {}
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = plain(**tok(prompts, responses, padding=True, return_tensors="pt", **cut)).logits.squeeze(-1)
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), predict_reward(model, prompts, responses), atol=1e-6)
    np.testing.assert_allclose(score(folder, prompts, responses), predict_reward(model, prompts, responses),
                               atol=1e-6)


@pytest.mark.parametrize("backbone", ["tiny_encoder_dir", "tiny_decoder_dir"])
def test_saved_folder_is_a_plain_hugging_face_model(backbone, request, tmp_path: Path):
    table, _ = units(120)
    model, _ = fit_reward_model(table, loss="naive", cfg=cfg_for(request.getfixturevalue(backbone), epochs=1),
                                progress=False)
    save_reward_model(model, {"loss": "naive"}, tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json", OBSFEED_FILE} <= {p.name for p in
                                                                                     (tmp_path / "m").iterdir()}
    _assert_plain_transformers_scores_as_obsfeed(tmp_path / "m", model, table)
    if backbone == "tiny_encoder_dir":                     # a calibrated model: a·s + b folded into the head
        model.scale.fill_(0.5)
        model.shift.fill_(-0.25)
        save_reward_model(model, {"loss": "naive"}, tmp_path / "calibrated")
        _assert_plain_transformers_scores_as_obsfeed(tmp_path / "calibrated", model, table)
        assert load_reward_model(tmp_path / "calibrated").scale.item() == 1.0     # it is in the weights now


def test_resume_is_bit_identical(tiny_encoder_dir, tmp_path: Path, crash_then_resume):
    table, _ = units(160)
    cfg = cfg_for(tiny_encoder_dir, epochs=4, patience=4)
    whole, whole_metrics = fit_reward_model(table, loss="ips", cfg=cfg, progress=False)
    resumed, metrics = crash_then_resume(
        lambda checkpoint: fit_reward_model(table, loss="ips", cfg=cfg, progress=False, checkpoint=checkpoint),
        tmp_path / "ckpt" / "checkpoint.pt")
    assert [h["val_loss"] for h in metrics["history"]] == [h["val_loss"] for h in whole_metrics["history"]]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                  strict=True))


def _stage_run(root: Path, table: pa.Table, **train_settings) -> RunDir:
    run = RunDir(root)
    run.path(rd.POINTWISE).mkdir(parents=True)
    pq.write_table(table, run.path(rd.POINTWISE) / "part-00000.parquet")
    cfg = Config(input=InputConfig(impressions=["unused"], signals=["unused"]), train=TrainConfig(**train_settings))
    freeze_config(run, cfg)
    return run


def test_train_stage_writes_hugging_face_folders_with_truncation_counts(tiny_encoder_dir, tmp_path: Path):
    table, good = units(160)
    settings = {"backbone": str(tiny_encoder_dir), "max_length": 12, "batch_size": 16, "epochs": 2, "lr": 2e-3,
                "device": "cpu", "loss": "ips", "baselines": ["naive"]}
    run = _stage_run(tmp_path / "run", table, **settings)
    assert main(["train", str(run.root)]) == 0
    root = run.path(rd.REWARD_MODEL)
    for folder in (root, root / rd.BASELINES / "naive"):
        assert {"config.json", "model.safetensors", OBSFEED_FILE, rd.REWARD_METRICS} <= {p.name for p in
                                                                                          folder.iterdir()}
    metrics = json.loads((root / rd.REWARD_METRICS).read_text())
    assert metrics["truncated"]["prompt_truncated"] > 0 and metrics["backbone"]["backbone"] == "transformer"
    models = load_reward_models(run.path(rd.REWARD_MODEL))
    assert list(models) == ["ips", "naive"]
    _assert_plain_transformers_scores_as_obsfeed(root, models["ips"], table, max_length=12)


@pytest.mark.parametrize(("setting", "message"), [
    ({"backbone": "no/such/folder"}, "train.backbone = .*no such folder"),
    ({"backbone": "NOT_A_MODEL"}, "has no sequence-classification class"),
    ({"max_length": 3}, "train.max_length = 3"),
    ({"lora_rank": 4, "_no_peft": True}, "needs peft"),
    ({"trainable_layers": 5}, "train.trainable_layers = 5: the backbone has 2 layers"),
    ({"_nproc": 512}, "--nproc 512: this machine has"),
    ({"backbone": "no/such/folder", "_nproc": 2}, "train.backbone = .*no such folder"),   # before torchrun starts
    ({"backbone": "NO_TOKENIZER"}, "no tokenizer files"),
    ({"backbone": "DECODER", "calibrate": "gold"}, "reward head of 'llama' has no bias"),
])
def test_bad_settings_exit_2_with_one_line_before_training(setting, message, tiny_encoder_dir, tmp_path: Path,
                                                           capsys, monkeypatch, request):
    from tests.backbones import not_a_model

    settings = {"backbone": str(tiny_encoder_dir), "max_length": 24, "device": "cpu", "loss": "naive",
                "baselines": []}
    extra = {k: v for k, v in setting.items() if not k.startswith("_")}
    if extra.get("backbone") == "NOT_A_MODEL":
        extra["backbone"] = str(not_a_model(tmp_path / "vit"))
    if extra.get("backbone") == "NO_TOKENIZER":
        import shutil

        folder = shutil.copytree(tiny_encoder_dir, tmp_path / "bare")
        for f in folder.glob("tokenizer*"):
            f.unlink()
        extra["backbone"] = str(folder)
    if extra.get("backbone") == "DECODER":
        extra["backbone"] = str(request.getfixturevalue("tiny_decoder_dir"))
    if setting.get("_no_peft"):
        monkeypatch.setitem(sys.modules, "peft", None)        # import peft → ImportError
    run = _stage_run(tmp_path / "run", units(40)[0], **{**settings, **extra})
    capsys.readouterr()
    argv = ["train", str(run.root), *(["--nproc", str(setting["_nproc"])] if "_nproc" in setting else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("obsfeed train: "), err
    assert pytest.importorskip("re").search(message, err[0]), err[0]
    assert not run.path(rd.REWARD_MODEL).exists()


def test_two_gloo_processes_train_what_one_process_trains(tiny_encoder_dir, tmp_path: Path):
    """torchrun with 2 CPU processes at batch 4 each = 1 process at batch 8: the same global batches, so the same
    weights up to float summation order; one model folder, written by rank 0."""
    table, _ = units(200)
    settings = {"backbone": str(tiny_encoder_dir), "max_length": 24, "epochs": 2, "patience": 2, "lr": 2e-3,
                "device": "cpu", "loss": "ips", "baselines": []}
    one = _stage_run(tmp_path / "one", table, batch_size=8, **settings)
    two = _stage_run(tmp_path / "two", table, batch_size=4, **settings)
    assert main(["train", str(one.root)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.orchestration.cli", "train", str(two.root), "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stderr
    a, b = (load_reward_model(r.path(rd.REWARD_MODEL)) for r in (one, two))
    _assert_same_model(a, b, table)
    metrics = [json.loads((r.path(rd.REWARD_MODEL) / rd.REWARD_METRICS).read_text()) for r in (one, two)]
    assert metrics[1]["optimisation"]["processes"] == 2 and metrics[1]["optimisation"]["step_rows"] == 8
    assert metrics[0]["best_val_loss"] == pytest.approx(metrics[1]["best_val_loss"], rel=1e-4)
    assert not list(two.path(rd.REWARD_MODEL).parent.glob(".reward_model*")), "no second or partial output"
