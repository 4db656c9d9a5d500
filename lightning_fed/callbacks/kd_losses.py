"""Distillation losses as pure functions (no Lightning, no hooks): the math the callbacks and strategies use.

* :func:`kd_loss` — Hinton et al. 2015: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.
* :func:`attention_map` / :func:`attention_loss` — Zagoruyko & Komodakis 2017, as used by Neural Attention
  Distillation (Li et al. 2021): ``A = sum_c |a_c|^p`` over channels, flattened and L2-normalised per
  sample; the loss is the mean squared difference of the normalised maps.
* :func:`hint_loss` — FitNets-style feature hints: mean squared error between two feature maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(p_teacher^T || p_student^T)`` averaged over the batch (``[B, C]`` logits).

    The ``T^2`` factor keeps the soft-target gradients on the scale of the hard-label loss (Hinton 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """``sum_c |a_c|^p`` over the channel dim of ``[B, C, *spatial]`` features, flattened and L2-normalised."""
    if features.ndim < 3:
        raise ValueError(f"attention_map: features must be [B, C, *spatial], got shape {tuple(features.shape)}")
    a = features.float().abs().pow(p).sum(1).flatten(1)
    return F.normalize(a, dim=1)


def _match_spatial(a: Tensor, size: int) -> Tensor:
    if a.shape[1] == size:
        return a
    return F.adaptive_avg_pool1d(a.unsqueeze(1), size).squeeze(1)


def attention_loss(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    """Mean squared difference of the normalised attention maps (channel counts may differ; spatial sizes
    are pooled to the smaller one)."""
    a_s = attention_map(student_features, p)
    a_t = attention_map(teacher_features, p)
    n = min(a_s.shape[1], a_t.shape[1])
    a_s, a_t = F.normalize(_match_spatial(a_s, n), dim=1), F.normalize(_match_spatial(a_t, n), dim=1)
    return (a_s - a_t).pow(2).mean()


def hint_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error of two feature maps of the same shape (FitNets hints without a regressor)."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"hint_loss: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} differ in shape; hints need layers of equal width "
            "(attention transfer works across widths)"
        )
    return F.mse_loss(student_features.float(), teacher_features.float())


def soft_targets(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(logits / T)``."""
    return torch.softmax(logits.float() / float(temperature), dim=-1)


__all__ = ["attention_loss", "attention_map", "hint_loss", "kd_loss", "soft_targets"]
