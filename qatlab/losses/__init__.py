"""Losses in one place.

    divergences  pure functions of logits: chunked fp32 forward/reverse KL, CAKLD, JSD, hidden-state MSE
    topk         the same divergences on the teacher cache's top-k log-probabilities
    objectives   the training objectives a stage calls (conf/loss/*.yaml): ForwardKL, CAKLD, CrossEntropy, ...
The block-wise stage's MSE between block outputs lives with that stage (qatlab.stages.blockwise).
"""

from qatlab.losses.divergences import cakld, forward_kl, jsd, normalized_hidden_mse, reverse_kl, top1_probability_sum
from qatlab.losses.objectives import (CAKLD, JSD, BlockMSE, CrossEntropy, ForwardKL, HiddenMSE, Loss, ReverseKL)

__all__ = ["Loss", "ForwardKL", "ReverseKL", "CAKLD", "JSD", "CrossEntropy", "HiddenMSE", "BlockMSE", "forward_kl",
           "reverse_kl", "cakld", "jsd", "normalized_hidden_mse", "top1_probability_sum"]
