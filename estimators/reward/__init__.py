"""Reward models trained on obsfeed's datasets with any of its losses (``estimators.losses``).

Modules, by concept: ``hashed`` (the hashed n-gram backbone) and ``backbones`` (local Hugging Face transformers);
``features`` (the hashed model's n-gram and dense features); ``cache`` (datasets → an encoded cache) and
``data`` (the cache, streamed in shuffled, length-grouped batches); ``trainer`` (the one training loop);
``distributed`` (torchrun / DistributedDataParallel); ``calibrate`` (post-hoc s' = a·s + b); ``model`` (build,
score, save, load either kind); ``trl`` (a weighted TRL RewardTrainer, optional extra). No Beam.
"""

from estimators.reward.model import load_reward_model, predict_reward, save_reward_model, score
from estimators.reward.trainer import fit_pairwise_reward_model, fit_reward_model

__all__ = ["fit_pairwise_reward_model", "fit_reward_model", "load_reward_model", "predict_reward",
           "save_reward_model", "score"]
