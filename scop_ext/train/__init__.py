"""What training a baseline shares with pruning one: :func:`fit` / :func:`evaluate` /
:func:`recalibrate_bn` (:mod:`.training`), the resumable epoch loop and its NaN checks
(:mod:`.epochs`), checkpoint files (:mod:`.checkpoint`), torchrun (:mod:`.distributed`), memory
checks (:mod:`.resources`) and interleaved timing (:mod:`.timing`)."""

from .training import (
                       FitResult,
                       amp_dtype,
                       batchnorms,
                       default_amp,
                       evaluate,
                       fit,
                       make_loader,
                       model_signature,
                       recalibrate_bn,
)

__all__ = ["FitResult", "amp_dtype", "batchnorms", "default_amp", "evaluate", "fit", "make_loader", "model_signature",
           "recalibrate_bn"]
