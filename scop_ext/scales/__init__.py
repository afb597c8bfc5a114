"""Stage 2, learning the scales: every wrapped filter's β is trained with the weights frozen, on
batches that pair each image with its knockoff.

- :mod:`.learn`: :func:`learn_scales` (the stage as a resumable loop; ``bn`` batch, batch_detached
  or frozen) and :func:`fit_knockoff_biases` (the Lemma 2 bias of every layer, from the knockoff
  diagonal measured at its input);
- :mod:`.learner`: :class:`ScaleLearner`, the same stage inside your own training loop;
- :mod:`.pairs`: the paired data;
- :mod:`.split` and :mod:`.batch_bn`: the two faster steps (the knockoff stream run apart with BN
  frozen; the batch statistics held constant in the backward).
"""

from .batch_bn import batch_detached
from .learn import BN_MODES, ScaleHistory, fit_knockoff_biases, layer_seed, learn_scales
from .learner import ScaleLearner
from .pairs import PairedDataset, pair_dataset
from .split import split_forward

__all__ = ["BN_MODES", "PairedDataset", "ScaleHistory", "ScaleLearner", "batch_detached", "fit_knockoff_biases",
           "layer_seed", "learn_scales", "pair_dataset", "split_forward"]
