"""Pretrained transformer backbones for the reward model: a local Hugging Face folder, loaded as a
sequence-classification model with one output (the reward logit), and its tokenizer.

Why transformers' own classes: a reward model that ``AutoModelForSequenceClassification.from_pretrained`` loads is
one TRL, vLLM and serving stacks use as it is. Encoders (BERT, DeBERTa, ...) pool their first token; decoders
(Qwen, Llama, ...) pool the last non-pad token, which needs a pad token: the tokenizer's, else its end-of-sequence
token. Nothing is ever downloaded: a folder that is missing, or that is not a model with a sequence-classification
class, is a ``ConfigError`` naming the path, before any data is read.

Text: a unit is the tokenizer's *pair* (prompt, response), so special tokens and token types are the model's own.
When a pair is longer than ``max_length``, the prompt loses tokens from its left (its end, next to the response,
stays), and only a response longer than the whole budget is cut (its start stays). No row is ever dropped for
its length: under inverse-propensity weights that would be a hidden, length-dependent selection; the truncated
rows are counted instead (``Tokens.prompt_truncated``/``response_truncated``). Without truncation the ids equal
``tokenizer(prompt, response)["input_ids"]``, so a user scoring with plain transformers gets obsfeed's scores.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from estimators.reward.data import Ragged
from schemas.errors import ConfigError

logger = logging.getLogger(__name__)

HASHED = "hashed"
"""``train.backbone`` for the hashed n-gram model; anything else is a local Hugging Face folder."""
OBSFEED_FILE = "obsfeed.json"
"""obsfeed's record beside a Hugging Face folder (loss, settings, calibration): transformers ignores it."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


@dataclass
class Tokens(Ragged):
    """Tokenised pairs, with which rows lost prompt tokens and which lost response tokens to ``max_length``."""

    prompt_truncated: np.ndarray | None = None
    response_truncated: np.ndarray | None = None


def check_backbone_folder(path: Path | str) -> Path:
    """The folder of a local sequence-classification-capable model, or a ConfigError naming what is wrong."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"train.backbone = {str(path)!r}: no such folder (a local Hugging Face model folder; "
                          "obsfeed never downloads models)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"train.backbone = {str(path)!r}: no config.json in the folder (not a Hugging Face model)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"train.backbone = {str(path)!r}: transformers cannot read its config.json "
                          f"({str(e).splitlines()[0]})") from None
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ConfigError(f"train.backbone = {str(path)!r}: model type {config.model_type!r} has no "
                          "sequence-classification class in transformers, so it cannot be a reward model")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"train.backbone = {str(path)!r}: no weights ({' or '.join(WEIGHT_FILES[::2])})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"train.backbone = {str(path)!r}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                          "without them transformers builds an empty vocabulary and every word is unknown")
    return folder


def position_limit(config: Any, tokenizer: Any | None = None) -> int | None:
    """The longest input the model takes: its position table, less RoBERTa's offset (its positions start after
    the pad id), and the tokenizer's own limit when it sets one."""
    limit = getattr(config, "max_position_embeddings", None)
    kind = config.model_type or ""
    if limit is not None and ("roberta" in kind or kind == "camembert"):
        limit -= int(config.pad_token_id or 0) + 1
    declared = getattr(tokenizer, "model_max_length", None)
    if declared is not None and declared < 1_000_000:       # transformers' "no limit" is a huge integer
        limit = min(limit, declared) if limit is not None else declared
    return limit


def check_settings(folder: Path, *, max_length: int, lora_rank: int, trainable_layers: int | None,
                   calibrate: str = "none", tokenizer: Any | None = None) -> None:
    """The settings that need the model's config, checked before any data is read or model built."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    limit = position_limit(config, tokenizer)
    if limit is not None and max_length > limit:
        raise ConfigError(f"train.max_length = {max_length}: the backbone takes at most {limit} tokens")
    if calibrate == "gold":
        config.num_labels = 1
        with torch.device("meta"), quiet_transformers():    # the architecture only: no memory, no weights read
            skeleton = AutoModelForSequenceClassification.from_config(config)
        if head(skeleton).bias is None:
            raise ConfigError(f"train.calibrate = 'gold': the reward head of {config.model_type!r} has no bias, so "
                              "the calibrated shift cannot be saved in a folder transformers loads; use "
                              "train.calibrate = 'none' (rankings are the same)")
    layers = getattr(config, "num_hidden_layers", None)
    if trainable_layers is not None and layers is not None and trainable_layers > layers:
        raise ConfigError(f"train.trainable_layers = {trainable_layers}: the backbone has {layers} layers")
    if lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError(f"train.lora_rank = {lora_rank} needs peft, which is not installed "
                              "(pip install 'obsfeed[lora]')") from None


class PairTokenizer:
    """Encodes (prompt, response) pairs as the backbone's tokenizer does, within ``max_length`` tokens.

    Works on the fast tokenizer's backend (``tokenizers``), in batches: the prompt and the response are encoded
    without special tokens, truncated as the module docstring says, and joined by the tokenizer's own pair
    template (``post_process``).
    """

    def __init__(self, tokenizer: Any, max_length: int):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError("train.backbone: the model's tokenizer has no fast (tokenizers) backend")
        self.tokenizer = tokenizer
        self.backend = copy.deepcopy(backend)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.max_length = max_length
        self.special = tokenizer.num_special_tokens_to_add(pair=True)
        self.budget = max_length - self.special
        if self.budget < 1:
            raise ConfigError(f"train.max_length = {max_length}: the tokenizer adds {self.special} special tokens "
                              "to a pair, leaving no room for the response")
        self.pad_id = int(tokenizer.pad_token_id)
        self.has_types = "token_type_ids" in tokenizer.model_input_names
        self.n_features = len(tokenizer)
        self.needs: list[str] = []                             # numeric columns: a transformer reads text only

    def meta(self) -> dict[str, Any]:
        """What the token cache records about how it was made."""
        return {"backbone": "transformer", "tokenizer": self.tokenizer.name_or_path, "max_length": self.max_length,
                "pad_token_id": self.pad_id}

    def encode(self, prompts: Sequence[str | None], responses: Sequence[str | None],
               columns: Mapping[str, Any] | None = None) -> Tokens:
        """The pairs' tokens (``columns`` unused: a transformer reads text only)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        a = self.backend.encode_batch([p or "" for p in prompts], add_special_tokens=False)
        b = self.backend.encode_batch([r or "" for r in responses], add_special_tokens=False)
        ids, types = [], []
        cut_prompt = np.zeros(len(a), dtype=bool)
        cut_response = np.zeros(len(a), dtype=bool)
        for i, (ea, eb) in enumerate(zip(a, b, strict=True)):
            if len(eb) > self.budget:
                eb.truncate(self.budget)                       # keep the response's start
                cut_response[i] = True
            room = self.budget - len(eb)
            if len(ea) > room:
                if room > 0:
                    ea.truncate(room, direction="left")        # keep the prompt's end, next to the response
                else:
                    ea = self.backend.encode("", add_special_tokens=False)
                cut_prompt[i] = True
            joined = self.backend.post_process(ea, eb, add_special_tokens=True)
            ids.append(joined.ids)
            types.append(joined.type_ids)
        tokens = Ragged.from_lists(ids, types if self.has_types else None)
        return Tokens(tokens.ids, tokens.offsets, tokens.types, cut_prompt, cut_response)


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"train.backbone = {str(folder)!r}: no tokenizer that transformers can load "
                          f"({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:                          # decoders: pad with the end-of-sequence token
        if tokenizer.eos_token is None:
            raise ConfigError(f"train.backbone = {str(folder)!r}: the tokenizer has neither a pad nor an "
                              "end-of-sequence token, so padded batches cannot be pooled")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' notices and progress bars off while a model loads or saves: a new reward head is expected
    ("newly initialised weights"), and the train stage reports its own progress."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def head(model: nn.Module) -> nn.Linear:
    """The output layer that makes the one reward logit (``classifier``, ``score``, ``classifier.out_proj``...):
    the last ``nn.Linear`` with one output."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    if not found:
        raise ConfigError("train.backbone: the model has no linear layer with one output to use as the reward head")
    return found[-1]


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's stack of blocks (e.g. ``bert.encoder.layer``, ``model.layers``): the first ModuleList as
    long as ``config.num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ConfigError(f"train.trainable_layers: cannot find the model's {n} transformer layers")


def _called_after(model: nn.Module, stack: nn.ModuleList) -> list[nn.Module]:
    """The leaf modules a forward pass first calls after the last block of ``stack`` (pooler, final norm, head):
    found by running one tiny input, since registration order does not say it (DeBERTa registers its relative
    position embeddings, read by every layer, after the layers)."""
    order: list[nn.Module] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    last = list(stack)[-1]
    hooks = [m.register_forward_hook(lambda m, *_: order.append(m)) for m in [*leaves, last]]
    vocab = int(getattr(model.config, "vocab_size", 8) or 8)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[min(i, vocab - 1) for i in (1, 2, 3, 4)]]),
                  attention_mask=torch.ones(1, 4, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    end = max(i for i, m in enumerate(order) if m is last)
    inside = {id(m) for block in stack for m in block.modules()}
    first_seen: dict[int, int] = {}
    for i, m in enumerate(order):
        first_seen.setdefault(id(m), i)
    return [m for m in leaves if first_seen.get(id(m), -1) > end and id(m) not in inside]


def freeze_lower_layers(model: nn.Module, trainable_layers: int) -> int:
    """Train only the top ``trainable_layers`` blocks, the head, and what runs between them (pooler, final norm):
    the embeddings and lower blocks stay as pretrained, which makes CPU fine-tuning affordable. Returns the
    number of trainable parameters."""
    _, stack = layer_stack(model)
    if trainable_layers > len(stack):
        raise ConfigError(f"train.trainable_layers = {trainable_layers}: the backbone has {len(stack)} layers")
    after = _called_after(model, stack)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in [*list(stack)[len(stack) - trainable_layers:], *after, head(model)]:
        for p in module.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora(model: nn.Module, rank: int, alpha: float | None) -> nn.Module:
    """LoRA adapters (rank ``rank``) on every linear layer of the backbone, through peft; the head trains fully."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError(f"train.lora_rank = {rank} needs peft, which is not installed "
                          "(pip install 'obsfeed[lora]')") from None
    head_name = next(n for n, m in model.named_modules() if m is head(model))
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules="all-linear", modules_to_save=[head_name.split(".")[0]])
    return get_peft_model(model, config)


class TransformerRewardModel(nn.Module):
    """s(x) = the backbone's one logit for the pair (prompt, response); P(label=1|x) = σ(s).

    ``scale`` and ``shift`` are the post-hoc calibration s' = a·s + b (``calibrate``), identity until fitted;
    ``save`` folds them into the head, so the saved folder scores as this module does.
    """

    backbone_kind = "transformer"

    def __init__(self, model: nn.Module, tokenizer: Any, *, source: str, max_length: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source, self.max_length = source, max_length
        self.pair_tokenizer = PairTokenizer(tokenizer, max_length)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("shift", torch.zeros(1))

    @property
    def pad_id(self) -> int:
        return self.pair_tokenizer.pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.squeeze(-1)
        return self.scale * out.float() + self.shift

    def encode(self, prompts: Sequence[str | None], responses: Sequence[str | None],
               columns: Mapping[str, Any] | None = None) -> Tokens:
        """This model's input rows for raw texts (``columns`` unused: a transformer reads text only)."""
        return self.pair_tokenizer.encode(prompts, responses)

    def config(self) -> dict[str, Any]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {"backbone": self.backbone_kind, "source": self.source, "max_length": self.max_length,
                "architecture": type(base).__name__}

    def plain_model(self) -> nn.Module:
        """The transformers model, with LoRA adapters merged in if it has them (a copy then: training may go on)."""
        if hasattr(self.model, "merge_and_unload"):
            return copy.deepcopy(self.model).merge_and_unload()
        return self.model

    def save(self, directory: Path, record: Mapping[str, Any]) -> None:
        """A Hugging Face folder (config, safetensors, tokenizer) with the calibration folded into the head, and
        ``obsfeed.json`` beside it. The copy is made on cpu: a second copy of a large model on its GPU could not
        fit."""
        device = next(self.parameters()).device
        self.to("cpu")
        try:
            model = copy.deepcopy(self.plain_model()).float()
        finally:
            self.to(device)
        scale, shift = float(self.scale), float(self.shift)
        if scale != 1.0 or shift != 0.0:
            layer = head(model)
            with torch.no_grad():
                layer.weight.mul_(scale)
                if layer.bias is not None:
                    layer.bias.mul_(scale).add_(shift)
                elif shift != 0.0:
                    raise ConfigError("train.calibrate = 'gold': the backbone's reward head has no bias, so the "
                                      "calibrated shift cannot be saved in a folder transformers loads")
        model.config.pad_token_id = self.pad_id
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        (directory / OBSFEED_FILE).write_text(json.dumps({**record, "model": self.config(),
                                                          "calibration": {"scale": scale, "shift": shift}},
                                                         indent=2) + "\n")


def load_transformer(path: Path | str, *, max_length: int, seed: int = 0, lora_rank: int = 0,
                     lora_alpha: float | None = None, trainable_layers: int | None = None,
                     gradient_checkpointing: bool = False) -> TransformerRewardModel:
    """The reward model on backbone ``path`` (checked with ``check_backbone_folder``), ready to train: one output,
    a pad token, the head seeded by ``seed``, and the LoRA / frozen-layer / checkpointing settings applied."""
    from transformers import AutoModelForSequenceClassification

    folder = check_backbone_folder(path)
    tokenizer = load_tokenizer(folder)
    if lora_rank and trainable_layers is not None:
        raise ConfigError("train.lora_rank and train.trainable_layers: choose one (LoRA already freezes the backbone)")
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)                      # a new head's (and LoRA's) init is the run's seed, not the clock
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, local_files_only=True, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32)
        if lora_rank:
            model = add_lora(model, lora_rank, lora_alpha)
    model.config.pad_token_id = tokenizer.pad_token_id
    limit = position_limit(model.config, tokenizer)
    if limit is not None and max_length > limit:
        raise ConfigError(f"train.max_length = {max_length}: the backbone takes at most {limit} tokens")
    if gradient_checkpointing:
        model.config.use_cache = False                       # a decoder's key/value cache: no use in training
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if trainable_layers is not None:
        n = freeze_lower_layers(model, trainable_layers)
        logger.info("backbone %s: top %d layers and the head trainable (%s parameters)", folder.name,
                    trainable_layers, f"{n:,}")
    return TransformerRewardModel(model, tokenizer, source=str(folder), max_length=max_length)


def load_saved_transformer(directory: Path) -> TransformerRewardModel:
    """A reward model the train stage saved (``save``): the calibration is already in the head's weights."""
    record = json.loads((directory / OBSFEED_FILE).read_text())
    model = load_transformer(directory, max_length=int(record["model"]["max_length"]))
    model.source = record["model"].get("source", str(directory))
    return model.eval()
