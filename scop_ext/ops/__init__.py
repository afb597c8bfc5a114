"""The compiled operators, ``torch.ops.scop.*``, one module per operator.

Each module holds the operator's documented wrapper, its fake kernel (for ``torch.compile`` and
``torch.export``), its autocast rule and its autograd formula; :mod:`.checks` words every
argument error, :mod:`.reference` is the plain-PyTorch twin the tests hold the kernels to, and
:mod:`.loader` loads the compiled library (``build_info`` says what it carries).
"""

from . import reference
from .dual_scaled_conv2d import conv_input_grad, dual_scaled_conv2d
from .lemma2_sample import draw_seed, lemma2_sample
from .loader import build_info

__all__ = ["build_info", "conv_input_grad", "draw_seed", "dual_scaled_conv2d", "lemma2_sample", "reference"]
