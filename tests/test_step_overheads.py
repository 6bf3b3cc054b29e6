"""Per-step overheads of the trainer: only the buffers a skipped step must undo are snapshotted, and
the log values stay on the device until a log step converts them in one copy."""
from __future__ import annotations

import torch
from torch import nn

from distill.pipeline.train import loop as tl
from distill.balance import create_balancer
from distill.distiller import Distiller, Stage
from tests.helpers.training import bn_net, first_step


class QueueLoss(nn.Module):
    rollback_exempt = ("applied_only",)
    queue_size = 0

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("applied_only", torch.zeros(3))


def test_snapshot_holds_only_what_a_rollback_needs():
    student = bn_net()
    student.register_buffer("constant", torch.arange(4.0))
    d = Distiller(student, [Stage({"q": QueueLoss()}, create_balancer("gradnorm", ["q"]))])
    got = set(tl._rollback_buffers(d))
    bn_stats = ("running_mean", "running_var", "num_batches_tracked")
    # 2.1 and 3 are trainable, 4 has frozen parameters but runs in training mode: its statistics move
    expect = {f"student.{m}.{b}" for m in ("2.1", "4") for b in bn_stats}
    expect |= {"student.3.running_mean", "student.3.running_var", "student.3.num_batches_tracked",
               "stages.0.losses.q.count"}
    assert got == expect
    snap = tl._state_snapshot(d)
    student[2][1].running_mean.add_(1.0)
    d.stages[0].losses["q"].count.add_(5)
    tl._restore_snapshot(d, snap)
    assert torch.equal(student[2][1].running_mean, torch.zeros(4)) and d.stages[0].losses["q"].count.item() == 0


def test_host_fields_converts_tensors_once():
    fields = {"step": 3, "stage": 2, "lr": 0.1, "total": torch.tensor(1.5), "grad_norm": torch.tensor(2.0, dtype=torch.float64),
              "loss/a": torch.tensor([0.25])}
    out = tl.host_fields(fields)
    assert out == {"step": 3, "stage": 2, "lr": 0.1, "total": 1.5, "grad_norm": 2.0, "loss/a": 0.25}
    assert all(type(v) in (int, float) for v in out.values())
    assert tl.host_fields({"a": 1}) == {"a": 1}


def test_train_step_leaves_log_values_on_the_device(tiny, tmp_path):
    run, fields = first_step(tiny, tmp_path)
    assert isinstance(fields["total"], torch.Tensor) and isinstance(fields["grad_norm"], torch.Tensor)
    assert all(isinstance(v, torch.Tensor) for k, v in fields.items() if k.startswith("loss/"))
    host = tl.host_fields(fields)
    assert host["total"] == fields["total"].item() and host["total"] > 0
