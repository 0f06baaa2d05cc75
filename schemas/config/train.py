"""``[train]``: the reward model's backbone, loss and optimisation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.config.base import Section


class TrainConfig(Section):
    loss: Literal["naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr", "bt"] = "ips"
    baselines: list[Literal["naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr", "bt"]] = Field(
        default_factory=lambda: ["naive"], description="losses trained beside the main one, for comparison "
        "(causalrm_*: the noise-corrected loss with the fit stage's flip rates; bt: weighted Bradley-Terry on the "
        "pairwise dataset)")
    backbone: str = Field(
        "hashed", description="'hashed': obsfeed's bag of hashed n-grams (fast, learns little from real text); or "
        "a local Hugging Face model folder (config.json, safetensors weights, tokenizer; encoder or decoder), "
        "fine-tuned as AutoModelForSequenceClassification with one output; relative to the config file; never "
        "downloaded")
    max_length: int = Field(
        512, ge=2, description="transformer backbones: tokens per (prompt, response) pair; a longer pair loses "
        "prompt tokens from the left (only a response longer than this is cut), and is counted, never dropped")
    lora_rank: int = Field(0, ge=0, description="transformer backbones: > 0 trains LoRA adapters of this rank "
                           "on every linear layer (needs peft: pip install 'obsfeed[lora]') and the head")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling alpha; None: 2 x lora_rank")
    trainable_layers: int | None = Field(
        None, ge=0, description="transformer backbones: train only the top k layers and the head (0: the head "
        "only), the rest stays as pretrained; None: every layer. Makes CPU fine-tuning affordable")
    gradient_checkpointing: bool = Field(False, description="transformer backbones: recompute activations in "
                                         "the backward pass (less memory, about a third more time)")
    hash_features: int = Field(2**18, ge=16, le=2**24, description="hashed n-gram buckets of prompt + response")
    ngram_max: int = Field(1, ge=1, le=3, description="word n-grams up to this length (bigrams overfit small logs)")
    numeric: list[str] = Field(
        default_factory=list, description="pointwise numeric columns added as standardised features "
        "(response_length = log words of the response, derived). None by default: a reward model fed a "
        "confounder such as length can learn the bias it carries")
    embedding_model: str | None = Field(
        None, description="a local sentence-embedding model added as features: a sentence-transformers folder "
        "(needs that package) or a word-vector text file (GloVe/word2vec/fastText .vec); relative to the "
        "config file; never downloaded")
    hidden: int = Field(0, ge=0, description="0 = linear reward model over hashed n-grams")
    factors: int = Field(0, ge=0, description="k > 0 adds factorisation-machine pairwise interactions with k "
                         "factors; over user and item id tokens, matrix factorisation with biases")
    epochs: int | None = Field(None, ge=1, description="at most: early stopping on the validation loss usually ends "
                               "sooner; None: 30 for the hashed backbone, 3 for a transformer (the learning-rate "
                               "schedule spans these epochs)")
    batch_size: int = Field(256, ge=1, description="rows per process per micro-batch; an optimiser step takes "
                            "batch_size x grad_accumulation x processes rows")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches whose gradients add up to one step")
    lr: float | None = Field(None, gt=0, description="AdamW's peak learning rate; None: 0.05 for the hashed "
                             "backbone, 5e-5 for a transformer")
    lr_schedule: Literal["auto", "constant", "linear", "cosine"] = Field(
        "auto", description="after the warmup, the learning rate stays (constant) or decays to 0 over the "
        "epochs (linear, cosine); auto: constant for the hashed backbone, linear for a transformer")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="share of the steps with a linear warmup "
                                       "from 0; None: 0 for the hashed backbone, 0.1 for a transformer")
    max_grad_norm: float | None = Field(None, ge=0, description="clip the gradient's norm to this (0: no "
                                        "clipping); None: 0 for the hashed backbone, 1.0 for a transformer")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA (where the card supports it), fp32 on CPU")
    weight_decay: float = Field(1e-6, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    val_by: Literal["prompt", "unit"] = Field(
        "prompt", description="held-out split by prompt (a prompt's responses stay together: no leak through the "
        "prompt) or by unit (id data such as user x item ratings, where holding out whole users would make "
        "them cold-start)")
    patience: int = Field(2, ge=1)
    calibrate: Literal["none", "gold"] = Field(
        "none", description="'gold': after training, fit s' = a*s + b (a > 0, so rankings stay) on the units with "
        "an audited label (label_gold) by log-loss. Selection on the true label itself cannot be seen from x, so "
        "no weight from p(x) undoes it; a random audit can, and this puts P(r*=1|x) on its level. Every loss")
    allow_unidentified_noise: bool = Field(
        False, description="train the noise-aware losses (causalrm_*) with flip rates the fit stage marked as not "
        "identified (models/noise.json); false: train fails (exit 2) naming their intervals")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _backbone_settings(self) -> TrainConfig:
        if self.backbone != "hashed":
            used = [k for k in ("numeric", "embedding_model", "hidden", "factors") if getattr(self, k)]
            if used:
                raise ValueError(f"train.{used[0]} is a setting of the hashed backbone; a transformer backbone reads "
                                 "the (prompt, response) text only")
        else:
            used = [k for k in ("lora_rank", "trainable_layers", "gradient_checkpointing")
                    if getattr(self, k) not in (0, None, False)]
            if used:
                raise ValueError(f"train.{used[0]} is a setting of a transformer backbone; train.backbone is "
                                 "'hashed'")
        if self.lora_rank and self.trainable_layers is not None:
            raise ValueError("train.lora_rank and train.trainable_layers: choose one (LoRA already freezes the "
                             "backbone)")
        return self
