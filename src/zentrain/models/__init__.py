"""Plain ``nn.Module`` models; parallelism and gradient sync are applied from outside.

Every model's ``forward`` takes the keys of its data batches as arguments and returns
``(logits, loss)``, so a training loop can call ``model(**batch)`` for any of them.
"""

from __future__ import annotations

from torch import nn

from zentrain.config import ModelConfig
from zentrain.models.deepfm import DeepFM
from zentrain.models.gpt import GPT

__all__ = ["GPT", "DeepFM", "build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.name``, freshly initialized (seed torch first for
    reproducible weights). For the GPT, ``cfg.vocab_size`` must already be the tokenizer's
    real vocabulary size: ``zentrain.data.build_data`` sets it."""
    if cfg.name == "gpt":
        return GPT(cfg)
    if cfg.name == "deepfm":
        return DeepFM(cfg)
    raise ValueError(f"unknown model.name {cfg.name!r} (allowed: 'gpt', 'deepfm')")
