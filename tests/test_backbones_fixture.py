"""The tiny test backbones load offline with plain transformers and behave like real ones where tests rely on it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from tests.backbones import not_a_model, tiny_encoder

PROMPTS = ["how is the weather today", "tell me a story"]
REPLIES = ["it is a good day", "no"]


def _load(path):
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)  # the decoder's score head is initialised at load
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True).eval()
    return tok, model


def test_encoder_pair_encoding_marks_the_reply(tiny_encoder_dir):
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir, local_files_only=True)
    enc = tok("A prompt", "a reply")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "a", "prompt", "[SEP]", "a", "reply", "[SEP]"]
    assert enc["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert tok("zebra")["input_ids"][1] == tok.unk_token_id
    assert (tok.pad_token, tok.cls_token, tok.sep_token) == ("[PAD]", "[CLS]", "[SEP]")


def test_decoder_pair_is_the_concatenation(tiny_decoder_dir):
    tok = AutoTokenizer.from_pretrained(tiny_decoder_dir, local_files_only=True)
    assert tok("a prompt", "a reply")["input_ids"] == tok("a prompt")["input_ids"] + tok("a reply")["input_ids"]
    assert "token_type_ids" not in tok("a prompt")
    config = AutoConfig.from_pretrained(tiny_decoder_dir, local_files_only=True)
    assert tok.pad_token_id == config.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "</s>"


@pytest.mark.parametrize("backbone", ["tiny_encoder_dir", "tiny_decoder_dir"])
def test_padded_pair_batch_gives_one_finite_reward_per_row(backbone, request):
    tok, model = _load(request.getfixturevalue(backbone))
    batch = tok(PROMPTS, REPLIES, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # the second row is padded
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**tok(PROMPTS[1], REPLIES[1], return_tensors="pt")).logits
    assert logits.shape == (2, 1)
    assert torch.isfinite(logits).all()
    assert logits[0, 0] != logits[1, 0]
    # Padding must not change a row's reward (the decoder pools its last non-pad token, the encoder masks pads).
    torch.testing.assert_close(logits[1], alone[0], atol=1e-5, rtol=1e-5)


def test_seed_fixes_the_weights(tmp_path):
    a = load_file(tiny_encoder(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(tiny_encoder(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(tiny_encoder(tmp_path / "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_not_a_model_is_known_but_cannot_score(tmp_path):
    path = not_a_model(tmp_path / "vit")
    assert AutoConfig.from_pretrained(path, local_files_only=True).model_type == "vit"
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
