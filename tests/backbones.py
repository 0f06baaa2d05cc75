"""Tiny, randomly initialised Hugging Face model folders for fast CPU tests (no downloads, no network).

Tests of the transformer reward trainers need a real ``from_pretrained`` folder (config, safetensors weights and a
fast tokenizer that ``AutoTokenizer`` loads) but not a real model: a 2-layer, 32-wide network over a ~200-word
vocabulary trains a step in milliseconds, and a word-level tokenizer makes token counts predictable (one word, one
token), which length and truncation tests rely on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTModel,
)

# Lowercase English words (and the punctuation the whitespace pre-tokeniser splits off): the whole vocabulary after
# the special tokens. Anything else maps to the unknown token, which is fine for tests.
_WORD_TEXT = """
    . , ? ! ' a an the this that these those it its i you he she we they me him her us them my your our their
    is are was were be been being am do does did done have has had having will would can could should may might must
    not no yes and or but if then so because when where what which who why how all any some many much more most few
    less one two three four five first last next other same new old good bad great small big long short high low
    right wrong true false best worst better worse easy hard fast slow early late here there now today tomorrow
    yesterday again also only very too just still even ever never always often please thanks thank hello hi sorry
    question answer reply prompt help explain tell show give make take get go come see look know think want need
    like use find write read say ask try call work play run move stop start keep let put turn feel seem leave mean
    time day week year way thing man woman child people world life hand part place case point group number fact
    water food money book word name home city car road house school friend family story idea problem system
    program code data model test result error list file page line text language music movie game weather
    cat dog bird fish tree sun moon rain snow red blue green black white happy sad kind rude safe harmful helpful
    correct useful clear wrongly quickly slowly well about after before with without from into over under between
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

ENCODER_SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
DECODER_SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "</s>")

_WIDTH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "max_position_embeddings": 128}
# Ten times the default 0.02: at 0.02 a 32-wide BERT gives every input the same reward to 1e-4 (its LayerNorms and
# tanh pooler flatten tiny weights), so accuracy and ordering tests would compare near-ties.
_INIT_RANGE = 0.2


def _vocab(specials: tuple[str, ...]) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))  # a word listed twice keeps its first id
    return vocab


def _word_level(vocab: dict[str, int], unk: str) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _save(path: Path, model_class: type, config: object, tokenizer: PreTrainedTokenizerFast, seed: int) -> Path:
    """The model, initialised from ``seed`` without touching the caller's RNG, and the tokenizer, saved in ``path``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(path)  # safetensors: the only format transformers 5 writes
    tokenizer.save_pretrained(path)
    return path


def tiny_encoder(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer BERT reward model (``num_labels=1``) and a word-level BERT-style tokenizer saved into ``path``.

    All dropout is 0 so a training step is deterministic given the seed. The tokenizer encodes a pair as
    ``[CLS] A [SEP] B [SEP]`` with token_type_ids 1 on ``B`` (the reply), as a BERT tokenizer does.
    """
    path = Path(path)
    vocab = _vocab(ENCODER_SPECIALS)
    tok = _word_level(vocab, "[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # transformers 5's BertTokenizer rebuilds its own WordPiece model from a vocabulary and would ignore this one,
    # so the generic fast wrapper (TokenizersBackend) carries it; model_input_names adds token_type_ids, which the
    # generic wrapper leaves out by default.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=_WIDTH["max_position_embeddings"],
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    config = BertConfig(
        vocab_size=len(vocab), **_WIDTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, num_labels=1, pad_token_id=vocab["[PAD]"], initializer_range=_INIT_RANGE,
    )
    return _save(path, BertForSequenceClassification, config, fast, seed)


def tiny_decoder(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama causal LM checkpoint and a word-level tokenizer saved into ``path``.

    Llama rather than Qwen2: transformers 5 loads a ``qwen2`` folder's tokenizer as ``Qwen2Tokenizer``, which
    rebuilds a byte-level BPE from the vocabulary whatever ``tokenizer_config.json`` says, so the word-level tokenizer
    would not survive ``AutoTokenizer.from_pretrained``; a ``llama`` folder keeps the saved tokenizer.
    It is saved as ``LlamaForCausalLM``, the way a pretrained decoder is published, so loading it with
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` exercises the usual LM-to-reward-model
    path: the body is loaded and the ``score`` head is newly (randomly) initialised, seeded by the caller's RNG.
    The tokenizer has no template: a pair is the two sequences concatenated; ``</s>`` is the EOS and ``<pad>`` a
    separate pad token (so the last-non-pad-token pooling of the sequence classifier never mistakes EOS for padding).
    """
    path = Path(path)
    vocab = _vocab(DECODER_SPECIALS)
    tok = _word_level(vocab, "<unk>")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
        model_max_length=_WIDTH["max_position_embeddings"],
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=_WIDTH["hidden_size"], num_hidden_layers=_WIDTH["num_hidden_layers"],
        num_attention_heads=_WIDTH["num_attention_heads"], num_key_value_heads=1,
        intermediate_size=_WIDTH["intermediate_size"], max_position_embeddings=_WIDTH["max_position_embeddings"],
        attention_dropout=0.0, tie_word_embeddings=True, pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
        bos_token_id=None, initializer_range=_INIT_RANGE,
    )
    return _save(path, LlamaForCausalLM, config, fast, seed)


def not_a_model(path: Path) -> Path:
    """A real model folder of a type transformers knows but that has no sequence-classification class (ViT).

    ``AutoModelForSequenceClassification.from_pretrained`` on it fails on the config's class, not on a missing or
    broken file, which is what a bad-backbone test wants to provoke.
    """
    path = Path(path)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path
