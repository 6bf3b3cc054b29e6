"""``train.deterministic``: bitwise-reproducible training, on CUDA too.

cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` (``:4096:8`` or ``:16:8``) in the environment before it
creates its first handle, so :func:`enable_determinism` must run before anything touches CUDA (it is
the first thing ``train_student`` does); it warns when CUDA was already initialised, since the
setting may then come too late. Operations without a deterministic CUDA kernel raise under
``torch.use_deterministic_algorithms(True)``; the token loss pools with
:func:`distill.losses.pooling.adaptive_avg_pool2d` for that reason.
"""
from __future__ import annotations

import os
import warnings

import torch

CUBLAS_KEY = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def enable_determinism() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless a deterministic value is already set), turn
    on ``torch.use_deterministic_algorithms`` and turn off cuDNN autotuning."""
    if os.environ.get(CUBLAS_KEY) not in CUBLAS_DETERMINISTIC:
        if torch.cuda.is_initialized():
            warnings.warn(f"train.deterministic: CUDA was initialised before {CUBLAS_KEY} could be set; cuBLAS may "
                          f"already use a non-deterministic workspace (export {CUBLAS_KEY}=:4096:8 before starting)",
                          RuntimeWarning, stacklevel=2)
        os.environ[CUBLAS_KEY] = CUBLAS_DETERMINISTIC[0]
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
