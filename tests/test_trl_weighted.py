"""WeightedRewardTrainer: TRL's RewardTrainer with the inverse-propensity weighted Bradley–Terry loss.

Everything is checked against hand computations from the model's own rewards and from the plain tokenizer, on a tiny
random BERT and Llama (tests/backbones.py), so the tests need no download and run on CPU.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from estimators.reward.trl import RewardConfig, WeightedRewardTrainer  # noqa: E402

MAX_LENGTH = 24
SHORT = [  # (prompt, chosen, rejected): well inside MAX_LENGTH as a pair
    ("how is the weather today", "it is a good day", "bad"),
    ("tell me a story", "a dog and a cat play in the rain", "no"),
    ("what is a good name for a dog", "sun is a good name", "i do not know"),
    ("please help me with my code", "yes here is the answer", "no"),
    ("is this a question", "yes it is", "maybe"),
    ("explain the problem", "the system has an error in one file", "it is hard"),
    ("give me a list", "one two three", "list"),
    ("say hello", "hello", "bye"),
    ("where is the school", "the school is in the city", "here"),
    ("who are you", "i am a helpful model", "a model"),
    ("what time is it", "it is late", "time"),
    ("can you help", "yes i can help you", "no i can not"),
]
LONG_PROMPT = " ".join(["tell me a long story about a dog and a cat"] * 4)  # 44 words
LONG_REPLY = " ".join(["the dog and the cat play in the rain"] * 4)  # 36 words
LONG = [  # longer than MAX_LENGTH: three by the prompt, one by the chosen response alone
    (LONG_PROMPT, "a good story", "no"),
    (LONG_PROMPT, "the dog is happy", "the cat is sad"),
    (LONG_PROMPT + " please", "yes", "no no"),
    ("tell me a story", LONG_REPLY, "no"),
]
WEIGHTS = [0.2, 3.0, 1.0, 0.5, 2.5, 0.1, 1.5, 4.0, 0.7, 0.3, 1.2, 2.0, 0.4, 3.5, 0.9, 1.1]
MARGINS = [0.0, 0.5, 1.0, 0.25, 0.0, 0.75, 0.1, 0.0, 0.3, 0.6, 0.0, 0.2, 0.4, 0.0, 0.8, 0.05]


def _pairs(rows, weights, margins) -> Dataset:
    return Dataset.from_dict({
        "prompt_id": [f"p{i}" for i in range(len(rows))],
        "prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows],
        "weight": list(weights), "margin": list(margins),
    })


def _config(out: Path, **overrides) -> RewardConfig:
    kwargs = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=3,
                  learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                  max_length=MAX_LENGTH, logging_steps=1, seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return RewardConfig(**kwargs)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    """TRL pings the Hub when a trainer is built; the tests run offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture(scope="module")
def raw() -> Dataset:
    return _pairs(SHORT + LONG, WEIGHTS, MARGINS)


@pytest.fixture(scope="module")
def trained(tiny_encoder_dir, raw, tmp_path_factory):
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        trainer = WeightedRewardTrainer(model=str(tiny_encoder_dir), args=_config(tmp_path_factory.mktemp("trl")),
                                        train_dataset=raw)
        trainer.train()
    trainer.model.eval()
    return trainer


def _rewards(model, tok, prompts, responses) -> torch.Tensor:
    """The model's rewards for (prompt, response) pairs encoded by the plain tokenizer (padded together)."""
    with torch.no_grad():
        return model(**tok(list(prompts), list(responses), padding=True, return_tensors="pt")).logits.squeeze(-1)


def _hand_loss(rc, rr, w, m) -> torch.Tensor:
    return (w * -torch.nn.functional.logsigmoid(rc - rr - m)).mean()


def test_trains_two_steps_to_a_finite_loss(trained):
    assert trained.state.global_step == 2
    losses = [h["loss"] for h in trained.state.log_history if "loss" in h]
    assert len(losses) == 2 and np.isfinite(losses).all()


def test_compute_loss_is_the_weighted_bradley_terry_formula(trained, tiny_encoder_dir):
    idx = [0, 1, 2, 3, 4]
    batch = trained.data_collator([trained.train_dataset[i] for i in idx])
    with torch.no_grad():
        loss = trained.compute_loss(trained.model, batch)
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    rows = [SHORT[i] for i in idx]
    rc = _rewards(trained.model, tok, [r[0] for r in rows], [r[1] for r in rows])
    rr = _rewards(trained.model, tok, [r[0] for r in rows], [r[2] for r in rows])
    w = torch.tensor([WEIGHTS[i] for i in idx]) / float(np.mean(WEIGHTS))  # normalised over the whole dataset
    m = torch.tensor([MARGINS[i] for i in idx])
    expected = _hand_loss(rc, rr, w, m)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # The weights and margins matter: the unweighted and the margin-free losses are different numbers.
    assert abs(loss.item() - _hand_loss(rc, rr, torch.ones_like(w), m).item()) > 1e-3
    assert abs(loss.item() - _hand_loss(rc, rr, w, torch.zeros_like(m)).item()) > 1e-3


def test_weights_are_normalised_over_the_dataset_not_the_batch(trained):
    weights = np.asarray(trained.train_dataset["weight"], dtype=np.float64)
    assert abs(weights.mean() - 1.0) < 1e-6
    np.testing.assert_allclose(weights, np.asarray(WEIGHTS) / np.mean(WEIGHTS), rtol=1e-12)
    batch = trained.data_collator([trained.train_dataset[i] for i in range(4)])
    np.testing.assert_allclose(batch["weight"].numpy(), np.asarray(WEIGHTS[:4]) / np.mean(WEIGHTS), rtol=1e-6)
    assert abs(batch["weight"].mean().item() - 1.0) > 0.1  # a batch keeps the dataset-level scale


def test_weight_travels_through_the_dataloader(trained):
    batch = next(iter(trained.get_train_dataloader()))
    assert {"input_ids", "attention_mask", "token_type_ids", "margin", "weight"} <= set(batch)
    assert batch["input_ids"].shape[0] == 2 * batch["weight"].shape[0]


def test_long_pairs_are_truncated_not_dropped(trained, raw, tiny_encoder_dir):
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    full = [len(tok(p, c)["input_ids"]) for p, c in zip(raw["prompt"], raw["chosen"], strict=True)]
    assert sum(n > MAX_LENGTH for n in full) == len(LONG)  # the fixture really has pairs TRL would drop
    assert len(trained.train_dataset) == len(raw)
    assert trained.train_dataset["prompt_id"] == raw["prompt_id"]
    for row in trained.train_dataset:
        assert len(row["chosen_ids"]) <= MAX_LENGTH and len(row["rejected_ids"]) <= MAX_LENGTH
    # A long prompt loses its start: what is kept is the pair encoding of the prompt's last words and the reply.
    row = trained.train_dataset[len(SHORT)]
    reply = LONG[0][1]
    keep = MAX_LENGTH - 3 - len(reply.split())
    assert row["chosen_ids"] == tok(" ".join(LONG_PROMPT.split()[-keep:]), reply)["input_ids"]
    assert row["chosen_token_type_ids"] == [0] * (keep + 2) + [1] * (len(reply.split()) + 1)
    # A reply too long on its own keeps its start and no prompt.
    row = trained.train_dataset[len(SHORT) + 3]
    assert row["chosen_ids"] == tok("", " ".join(LONG_REPLY.split()[: MAX_LENGTH - 3]))["input_ids"]
    assert row["rejected_ids"] == tok("tell me a story", "no")["input_ids"]


def test_short_pairs_are_the_tokenizers_pair_encoding(trained, tiny_encoder_dir):
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    for i, (p, c, r) in enumerate(SHORT):
        row = trained.train_dataset[i]
        assert row["chosen_ids"] == tok(p, c)["input_ids"]
        assert row["rejected_token_type_ids"] == tok(p, r)["token_type_ids"]


def test_weighted_eval_accuracy_and_loss_are_the_hand_formulas(trained, tiny_encoder_dir):
    # Each pair and its swap: exactly one of the two is ranked right, so the unweighted accuracy is 1/2 and only
    # the weights move the weighted one; distinct powers of 2 make the weighted accuracy differ from 1/2 whichever
    # side wins. Eight rows in batches of three: a mean of per-batch accuracies would not give the same number.
    rows = SHORT[:4] + [(p, r, c) for p, c, r in SHORT[:4]]
    weights = [1.0, 4.0, 16.0, 64.0, 2.0, 8.0, 32.0, 128.0]
    margins = [0.1, 0.0, 0.3, 0.2, 0.0, 0.4, 0.1, 0.0]
    metrics = trained.evaluate(eval_dataset=_pairs(rows, weights, margins))
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    rc = _rewards(trained.model, tok, [r[0] for r in rows], [r[1] for r in rows])
    rr = _rewards(trained.model, tok, [r[0] for r in rows], [r[2] for r in rows])
    w, m = torch.tensor(weights, dtype=torch.float64), torch.tensor(margins, dtype=torch.float64)
    correct = (rc > rr).double()
    assert correct.mean().item() == 0.5
    expected_acc = ((w * correct).sum() / w.sum()).item()
    assert abs(expected_acc - 0.5) > 1e-3
    assert metrics["eval_weighted_accuracy"] == pytest.approx(expected_acc, abs=1e-6)  # float32 batch weights
    per_pair = -torch.nn.functional.logsigmoid(rc.double() - rr.double() - m)
    expected_loss = ((w * per_pair).sum() / w.sum()).item()
    assert metrics["eval_weighted_loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected_loss, abs=1e-5)  # eval weights have mean 1 too


def test_decoder_pairs_are_the_tokenizers_pair_without_eos(tiny_decoder_dir, raw, tmp_path):
    trainer = WeightedRewardTrainer(model=str(tiny_decoder_dir), args=_config(tmp_path), train_dataset=raw)
    tok = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    assert "chosen_token_type_ids" not in trainer.train_dataset.column_names
    p, c, _ = SHORT[0]
    row = trainer.train_dataset[0]["chosen_ids"]
    assert row == tok(p, c)["input_ids"] == tok(p)["input_ids"] + tok(c)["input_ids"]  # no template, no EOS added
    assert tok.eos_token_id not in row
    long_reply = trainer.train_dataset[len(SHORT) + 3]["chosen_ids"]
    assert long_reply == tok(" ".join(LONG_REPLY.split()[:MAX_LENGTH]))["input_ids"]  # the reply's start, no prompt
    assert len(trainer.train_dataset) == len(raw)


@pytest.mark.parametrize("backbone", ["tiny_encoder_dir", "tiny_decoder_dir"])
def test_untruncated_pairs_are_what_plain_transformers_encodes(backbone, raw, tmp_path, request):
    """max_length=None: every pair, the long ones too, is ``tokenizer(prompt, response)`` exactly, as in obsfeed
    train, so a user scoring with plain transformers feeds the model what it was trained on."""
    folder = request.getfixturevalue(backbone)
    trainer = WeightedRewardTrainer(model=str(folder), args=_config(tmp_path, max_length=None), train_dataset=raw)
    tok = AutoTokenizer.from_pretrained(folder)
    assert max(len(ids) for ids in trainer.train_dataset["chosen_ids"]) > MAX_LENGTH  # the long pairs are whole
    for row, p, c, r in zip(trainer.train_dataset, raw["prompt"], raw["chosen"], raw["rejected"], strict=True):
        assert row["chosen_ids"] == tok(p, c)["input_ids"]
        assert row["rejected_ids"] == tok(p, r)["input_ids"]


def test_no_prompt_column_is_the_empty_prompt(tiny_encoder_dir, raw, tmp_path):
    trainer = WeightedRewardTrainer(model=str(tiny_encoder_dir), args=_config(tmp_path),
                                    train_dataset=raw.remove_columns("prompt"))
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    _, c, r = SHORT[0]
    assert trainer.train_dataset[0]["chosen_ids"] == tok("", c)["input_ids"]
    assert trainer.train_dataset[0]["rejected_token_type_ids"] == tok("", r)["token_type_ids"]


def test_max_length_without_room_for_a_response_raises(tiny_encoder_dir, raw, tmp_path):
    with pytest.raises(ValueError, match="max_length=3.*leaving no room"):  # BERT adds 3 special tokens to a pair
        WeightedRewardTrainer(model=str(tiny_encoder_dir), args=_config(tmp_path, max_length=3), train_dataset=raw)


@pytest.mark.parametrize(("weights", "match"), [
    ([-1.0] + WEIGHTS[1:], "negative"),
    ([float("nan")] + WEIGHTS[1:], "not finite"),
    ([0.0] * len(WEIGHTS), "all 0"),
])
def test_bad_weights_raise(tiny_encoder_dir, tmp_path, weights, match):
    with pytest.raises(ValueError, match=match):
        WeightedRewardTrainer(model=str(tiny_encoder_dir), args=_config(tmp_path),
                              train_dataset=_pairs(SHORT + LONG, weights, MARGINS))


def test_missing_weight_column_raises(tiny_encoder_dir, tmp_path, raw):
    with pytest.raises(ValueError, match="no 'weight' column"):
        WeightedRewardTrainer(model=str(tiny_encoder_dir), args=_config(tmp_path),
                              train_dataset=raw.remove_columns("weight"))


def test_pretokenised_long_pairs_raise_instead_of_dropping(trained, tiny_encoder_dir, tmp_path):
    pretokenised = trained.train_dataset.remove_columns(["prompt", "chosen", "rejected"])
    with pytest.raises(ValueError, match="longer than max_length"):
        WeightedRewardTrainer(model=str(tiny_encoder_dir), args=_config(tmp_path, max_length=8),
                              train_dataset=pretokenised)


def test_missing_trl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "estimators.reward.trl")
    with pytest.raises(ImportError, match=r"pip install obsfeed\[trl\]"):
        importlib.import_module("estimators.reward.trl")


# A top-level (unindented) import of TRL or of this module; an import inside a function is allowed.
_TOP_LEVEL_TRL_IMPORT = re.compile(
    r"^(?:from\s+(?:estimators\.reward|\.)\s+import\s+[^\n]*\btrl\b|(?:from|import)\s+(?:estimators\.reward\.|\.)?trl\b)",
    re.M)


def test_nothing_in_obsfeed_imports_trl_at_import_time():
    root = Path(__file__).resolve().parents[1]
    importers = [str(p.relative_to(root)) for pkg in ("estimators", "pipelines", "transforms", "schemas")
                 for p in (root / pkg).rglob("*.py")
                 if p != root / "estimators/reward/trl.py" and _TOP_LEVEL_TRL_IMPORT.search(p.read_text())]
    assert importers == []
    assert _TOP_LEVEL_TRL_IMPORT.search("from .trl import WeightedRewardTrainer\n")  # the pattern does match
    assert not _TOP_LEVEL_TRL_IMPORT.search("def f():\n    from estimators.reward.trl import X\n")
