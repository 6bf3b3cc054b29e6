"""A ``--plugin`` for training subprocesses (``--plugin tests.helpers.train_hooks``), driven by the
environment:

    MMDISTILL_TEST_STEP_SLEEP=<s>  every training step sleeps ``s`` seconds first (so a run can be
                                   killed between two checkpoints)
    MMDISTILL_TEST_POISON=1        the teacher targets of ``training.BAD_IMAGES`` are NaN

Without either variable, importing it changes nothing.
"""
from __future__ import annotations

import os
import time

if os.environ.get("MMDISTILL_TEST_STEP_SLEEP"):
    from distill.pipeline.train import loop as _tl

    _real_step, _delay = _tl.train_step, float(os.environ["MMDISTILL_TEST_STEP_SLEEP"])

    def _slow_step(run, batches, step):
        time.sleep(_delay)
        return _real_step(run, batches, step)

    _tl.train_step = _slow_step

if os.environ.get("MMDISTILL_TEST_POISON"):
    import distill.pipeline.train.data as _td

    from tests.helpers.training import poisoned_fetch

    _td.fetch_teacher = poisoned_fetch(_td.fetch_teacher)
