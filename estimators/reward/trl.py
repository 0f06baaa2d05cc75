"""Weighted Bradley–Terry reward training on TRL's ``RewardTrainer`` (optional extra: ``pip install obsfeed[trl]``).

Why this exists: obsfeed's pairwise dataset gives every pair an inverse-propensity ``weight``; without it the reward
model learns the logging policy's selection, not the users' preference. No off-the-shelf reward trainer takes a
per-sample weight — TRL's ``RewardTrainer`` takes only ``margin``, OpenRLHF's and LLaMA-Factory's reward-model trainers
neither — so this subclass keeps TRL's model loading, PEFT, accelerate and logging and changes what the weights touch:

* Loss: ``mean_batch w · (−log σ(r_c − r_r − m))`` with ``w`` the ``weight`` column and ``m`` the ``margin`` column
  (0 when the dataset has none); TRL's ``center_rewards_coefficient`` term is weighted the same way.
* ``weight`` is normalised to mean 1 over each whole dataset once, when the dataset is prepared (the training set
  when the trainer is built), never per batch: per-batch normalisation would re-weight batches against each other.
* No pair is dropped. ``RewardTrainer._prepare_dataset`` silently *filters out* pairs whose chosen or rejected
  sequence is longer than ``max_length`` (default 1024); under inverse-propensity weights that is a hidden,
  length-dependent selection. Here a too-long sequence is truncated instead: the prompt is cut from the left (the
  words nearest the response stay), and only if the response alone does not fit is the response cut from the right.
  ``max_length=None`` turns truncation off. Pre-tokenised datasets (``chosen_ids`` / ``rejected_ids``) cannot be cut
  at the prompt, so a too-long pair there raises instead of being dropped.
* Tokenisation: TRL joins ``prompt + chosen`` as strings (no separator, so with a whitespace pre-tokeniser the last
  prompt word and the first response word fuse) and appends ``eos_token`` as text (which fails outright for a
  tokenizer without one, e.g. BERT's). Here each side goes through ``estimators.reward.backbones.PairTokenizer``, the
  tokeniser of ``obsfeed train``, so both trainers read a pair the same way: prompt and response are tokenised
  separately and joined by the tokenizer's own pair template, ``tokenizer(prompt, response)`` — for an encoder
  ``[CLS] prompt [SEP] response [SEP]`` with token_type_ids where the model takes them, for a decoder whatever its
  template adds (often nothing: ``prompt response``), with no EOS appended. Untruncated ids therefore equal
  ``tokenizer(prompt, response)["input_ids"]`` and plain transformers scores a pair as the model was trained on it.
  A dataset without a ``prompt`` column, or a null prompt, is the empty prompt, as in ``obsfeed train``:
  ``tokenizer("", response)``, which for an encoder is ``[CLS] [SEP] response [SEP]``, not ``tokenizer(response)``.
* The collator carries ``weight`` (and token_type_ids) into the batch, and ``weight`` is kept among the signature
  columns: TRL's collator keeps only ``chosen_ids``, ``rejected_ids`` and ``margin``, and ``Trainer`` drops every
  other column when ``remove_unused_columns`` is on (the default).
* Evaluation adds ``eval_weighted_accuracy`` (Σ w·[r_c > r_r] / Σ w) and ``eval_weighted_loss`` (Σ w·ℓ / Σ w) over
  the whole evaluation set; TRL's own ``eval_accuracy`` stays the unweighted mean of per-batch accuracies.

Nothing in obsfeed imports this module at import time; TRL is an optional dependency.
"""

from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from estimators.reward.backbones import PairTokenizer
from schemas.errors import ConfigError

try:
    from datasets import Dataset, IterableDataset
    from trl import RewardConfig, RewardTrainer
    from trl.data_utils import is_conversational
    from trl.trainer.reward_trainer import DataCollatorForPreference
    from trl.trainer.utils import global_then_local_main_first, pad
except ImportError as e:  # trl is an optional extra (tests/test_trl_weighted.py hides it to check this message)
    raise ImportError(
        f"estimators.reward.trl needs TRL (and its datasets/tokenizers): pip install obsfeed[trl] ({e})"
    ) from e

logger = logging.getLogger(__name__)

PROMPT, CHOSEN, REJECTED, WEIGHT, MARGIN = "prompt", "chosen", "rejected", "weight", "margin"
CHOSEN_IDS, REJECTED_IDS = "chosen_ids", "rejected_ids"
CHOSEN_TYPE_IDS, REJECTED_TYPE_IDS = "chosen_token_type_ids", "rejected_token_type_ids"
_TRUNC_FLAGS = ("_prompt_cut", "_response_cut")
_NO_LIMIT = sys.maxsize  # the PairTokenizer budget for max_length=None

__all__ = ["RewardConfig", "WeightedPreferenceCollator", "WeightedRewardTrainer", "normalise_weights"]


def normalise_weights(dataset: Dataset, name: str = "train") -> Dataset:
    """``dataset`` with its ``weight`` column divided by its mean over the whole dataset (mean 1 afterwards).

    Raises if a weight is missing, negative or not finite, or if they sum to 0: such a weight is a bug upstream, and
    dropping or clipping it here would change the estimand silently. A non-finite ``margin`` raises too.
    """
    if WEIGHT not in dataset.column_names:
        raise ValueError(f"the {name} dataset has no {WEIGHT!r} column; WeightedRewardTrainer needs one per pair "
                         "(use trl.RewardTrainer for unweighted pairs)")
    w = np.asarray(dataset.with_format("numpy")[WEIGHT], dtype=np.float64)
    if w.size == 0:
        raise ValueError(f"the {name} dataset is empty")
    if not np.isfinite(w).all() or (w < 0).any():
        bad = int((~np.isfinite(w) | (w < 0)).sum())
        raise ValueError(f"{bad} of {w.size} {WEIGHT!r} values in the {name} dataset are missing, negative or not "
                         "finite")
    if MARGIN in dataset.column_names:
        m = np.asarray(dataset.with_format("numpy")[MARGIN], dtype=np.float64)
        if not np.isfinite(m).all():
            raise ValueError(f"{int((~np.isfinite(m)).sum())} {MARGIN!r} values in the {name} dataset are missing "
                             "or not finite")
    mean = float(w.mean())
    if mean <= 0:
        raise ValueError(f"the {WEIGHT!r} values in the {name} dataset are all 0")
    return dataset.map(_divide_weight, fn_kwargs={"scale": mean}, batched=True,
                       desc=f"Normalising {name} weights to mean 1")


def _divide_weight(batch: dict[str, list], scale: float) -> dict[str, np.ndarray]:
    return {WEIGHT: np.asarray(batch[WEIGHT], dtype=np.float64) / scale}


class _PairEncoder:
    """Tokenises (prompt, response) for ``datasets.map`` with obsfeed's ``PairTokenizer`` (see the module docstring),
    so that a reward model trained here reads a pair exactly as one trained by ``obsfeed train`` does."""

    def __init__(self, processing_class: Any, max_length: int | None) -> None:
        if getattr(processing_class, "backend_tokenizer", None) is None:
            raise TypeError(f"WeightedRewardTrainer needs a fast (tokenizers-backed) tokenizer, got "
                            f"{type(processing_class).__name__}")
        try:  # max_length=None: a budget no text reaches, so nothing is ever cut
            self.pairs = PairTokenizer(processing_class, _NO_LIMIT if max_length is None else max_length)
        except ConfigError:  # PairTokenizer words it for obsfeed's config (train.max_length); here it is RewardConfig's
            n = processing_class.num_special_tokens_to_add(pair=True)
            raise ValueError(f"max_length={max_length}: the tokenizer adds {n} special tokens to a pair, leaving no "
                             "room for the response") from None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        for col in (CHOSEN, REJECTED):
            if not all(isinstance(t, str) for t in batch[col]):
                raise ValueError(f"column {col!r} must hold plain strings (conversational rows: apply the chat "
                                 "template first)")
        n = len(batch[CHOSEN])
        prompts = batch.get(PROMPT, [None] * n)  # no prompt column, or a null prompt: the empty prompt
        if not all(t is None or isinstance(t, str) for t in prompts):
            raise ValueError(f"column {PROMPT!r} must hold plain strings (conversational rows: apply the chat "
                             "template first)")
        out: dict[str, list] = {}
        prompt_cut = response_cut = np.zeros(n, dtype=bool)
        for side, ids_col, type_col in ((CHOSEN, CHOSEN_IDS, CHOSEN_TYPE_IDS),
                                        (REJECTED, REJECTED_IDS, REJECTED_TYPE_IDS)):
            tokens = self.pairs.encode(prompts, batch[side])
            bounds = tokens.offsets.tolist()
            out[ids_col] = [tokens.ids[a:b].tolist() for a, b in itertools.pairwise(bounds)]
            if tokens.types is not None:
                out[type_col] = [tokens.types[a:b].tolist() for a, b in itertools.pairwise(bounds)]
            prompt_cut = prompt_cut | tokens.prompt_truncated
            response_cut = response_cut | tokens.response_truncated
        out["_prompt_cut"], out["_response_cut"] = prompt_cut.tolist(), response_cut.tolist()
        return out


@dataclass
class WeightedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus the pair ``weight`` and, when present, the token_type_ids.

    Rows are stacked as TRL does: all chosen sequences, then all rejected ones, right-padded.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if CHOSEN_TYPE_IDS in examples[0]:
            type_ids = [torch.tensor(e[CHOSEN_TYPE_IDS]) for e in examples]
            type_ids += [torch.tensor(e[REJECTED_TYPE_IDS]) for e in examples]
            output["token_type_ids"] = pad(type_ids, padding_value=0, padding_side="right",
                                           pad_to_multiple_of=self.pad_to_multiple_of)
        output[WEIGHT] = torch.tensor([e[WEIGHT] for e in examples], dtype=torch.float)
        return output


class WeightedRewardTrainer(RewardTrainer):
    """``trl.RewardTrainer`` with the inverse-propensity weighted Bradley–Terry loss (see the module docstring).

    Takes the same arguments as ``RewardTrainer``; ``train_dataset`` (and ``eval_dataset``) must be map-style
    ``datasets.Dataset`` with ``chosen``, ``rejected``, ``weight`` and optionally ``prompt`` and ``margin``, e.g.
    obsfeed's ``RUN/datasets/pairwise`` read with ``datasets.load_dataset("parquet", ...)``. A custom
    ``data_collator`` must put ``weight`` into the batch.
    """

    _tag_names = [*RewardTrainer._tag_names, "obsfeed-weighted"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        own_collator = kwargs.get("data_collator") is None and (len(args) < 3 or args[2] is None)
        self._eval_sums: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        if own_collator:
            self.data_collator = WeightedPreferenceCollator(
                pad_token_id=self.processing_class.pad_token_id, pad_to_multiple_of=self.args.pad_to_multiple_of)

    def _prepare_dataset(self, dataset: Dataset | IterableDataset, processing_class: Any, args: RewardConfig,
                         dataset_name: str) -> Dataset:
        """Normalise the weights and tokenise with truncation; unlike TRL's, never drops a row."""
        if not isinstance(dataset, Dataset):
            raise TypeError(f"the {dataset_name} dataset must be a map-style datasets.Dataset (weights are "
                            f"normalised over the whole dataset), got {type(dataset).__name__}")
        n_in = len(dataset)
        with global_then_local_main_first():
            dataset = normalise_weights(dataset, dataset_name)
            columns = dataset.column_names
            if CHOSEN_IDS in columns and REJECTED_IDS in columns:
                self._check_pretokenised(dataset, args.max_length, dataset_name)
            else:
                missing = [c for c in (CHOSEN, REJECTED) if c not in columns]
                if missing:
                    raise ValueError(f"the {dataset_name} dataset lacks {missing}")
                if is_conversational(dataset[0]):
                    raise ValueError("WeightedRewardTrainer takes plain-text pairs; apply the chat template first")
                encoder = _PairEncoder(processing_class, args.max_length)
                dataset = dataset.map(encoder, batched=True, num_proc=args.dataset_num_proc,
                                      desc=f"Tokenizing {dataset_name} dataset")
                flags = dataset.with_format("numpy")
                prompt_cut, response_cut = (np.asarray(flags[c], dtype=bool) for c in _TRUNC_FLAGS)
                dataset = dataset.remove_columns(list(_TRUNC_FLAGS))
                if (cut := int((prompt_cut | response_cut).sum())) > 0:
                    logger.warning("%s: %d of %d pairs longer than max_length=%s kept and truncated (%d with the "
                                   "prompt cut from the left, %d with a response cut as well)", dataset_name, cut,
                                   n_in, args.max_length, int(prompt_cut.sum()), int(response_cut.sum()))
        return dataset

    @staticmethod
    def _check_pretokenised(dataset: Dataset, max_length: int | None, name: str) -> None:
        if max_length is None:
            return
        too_long = sum(1 for c, r in zip(dataset[CHOSEN_IDS], dataset[REJECTED_IDS], strict=True)
                       if len(c) > max_length or len(r) > max_length)
        if too_long:
            raise ValueError(f"{too_long} pre-tokenised pairs in the {name} dataset are longer than max_length="
                             f"{max_length}; TRL would drop them silently, which biases a weighted fit. Pass text "
                             "columns (they are truncated at the prompt) or set max_length=None")

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = [CHOSEN_IDS, REJECTED_IDS, CHOSEN_TYPE_IDS, REJECTED_TYPE_IDS, MARGIN, WEIGHT]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        if WEIGHT not in inputs:
            raise KeyError(f"the batch has no {WEIGHT!r}; a custom data_collator must pass the pair weights")
        weight = inputs.pop(WEIGHT)
        margin = inputs.pop(MARGIN, None)
        # TRL's compute_loss runs the model and logs its (unweighted) reward statistics; its loss is recomputed here.
        _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # In float32 even under bf16 autocast: the weights span orders of magnitude.
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
        diff = rewards_chosen - rewards_rejected
        if margin is not None:
            diff = diff - margin.to(diff.dtype)
        weight = weight.to(diff.dtype)
        per_pair = -nn.functional.logsigmoid(diff)
        loss = (weight * per_pair).mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * (
                weight * (rewards_chosen + rewards_rejected) ** 2).mean()
        if not model.training and self._eval_sums is not None:
            w, correct, pp = self.accelerator.gather_for_metrics(
                (weight.detach(), (rewards_chosen > rewards_rejected).to(weight.dtype), per_pair.detach()))
            self._eval_sums += torch.stack([(w * correct).sum(), w.sum(), (w * pp).sum()]).double().cpu()
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        """The base loop, plus weighted pair accuracy and loss over the whole evaluation set."""
        self._eval_sums = torch.zeros(3, dtype=torch.float64)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            w_correct, w_sum, w_loss = self._eval_sums.tolist()
        finally:
            self._eval_sums = None
        if w_sum > 0:
            output.metrics[f"{metric_key_prefix}_weighted_accuracy"] = w_correct / w_sum
            output.metrics[f"{metric_key_prefix}_weighted_loss"] = w_loss / w_sum
        return output
