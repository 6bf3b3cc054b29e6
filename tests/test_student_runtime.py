"""train.sync_bn / train.channels_last / train.compile (distill/student_runtime.py) on CPU.

torch's SyncBatchNorm raises for CPU tensors under an initialised process group, so a 2-process
gloo run cannot exercise it; the conversion (which layers, shared parameters/statistics, unchanged
single-process outputs) and the auto/true/false resolution are tested here instead."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.pipeline.train import student_runtime as SR
from distill.pipeline.train.config import resolve_config
from distill.core.errors import ConfigError
from tests.helpers.training import bn_net, first_step


def test_convert_sync_bn_keeps_frozen_layers():
    net = bn_net()
    weight, mean = net[2][1].weight, net[2][1].running_mean
    x = torch.randn(2, 3, 9, 9)
    ref = bn_net()(x)
    assert SR.trainable_batchnorms(net) == ["2.1", "3"]
    assert SR.convert_sync_bn(net) == 2
    assert type(net[1]) is nn.BatchNorm2d and not net[1].training and type(net[4]) is nn.BatchNorm2d
    assert isinstance(net[2][1], nn.SyncBatchNorm) and isinstance(net[3], nn.SyncBatchNorm)
    assert net[2][1].weight is weight and net[2][1].running_mean is mean  # the optimizer's parameters
    torch.testing.assert_close(net(x), ref)  # no process group: plain batch norm, same numbers
    assert SR.convert_sync_bn(net) == 0  # idempotent


def test_wants_sync_bn_resolution():
    net, cpu, cuda = bn_net(), torch.device("cpu"), torch.device("cuda", 0)
    assert SR.wants_sync_bn("auto", 2, cuda, net) is True
    assert SR.wants_sync_bn("auto", 1, cuda, net) is False  # single process: nothing to synchronise
    assert SR.wants_sync_bn("auto", 2, cpu, net) is False  # torch's SyncBatchNorm is GPU-only
    assert SR.wants_sync_bn(False, 2, cuda, net) is False
    assert SR.wants_sync_bn(True, 2, cuda, nn.Linear(2, 2)) is False  # no BatchNorm: nothing to do
    assert SR.wants_sync_bn("auto", 2, cuda, nn.Sequential(nn.BatchNorm1d(2).eval())) is False  # frozen only
    with pytest.raises(ConfigError, match="sync_bn=true needs CUDA"):
        SR.wants_sync_bn(True, 2, cpu, net)


def test_new_train_keys_are_validated():
    cfg = resolve_config(None, [], {}, [])
    assert (cfg["train"]["sync_bn"], cfg["train"]["compile"], cfg["train"]["channels_last"]) == ("auto", False, False)
    assert resolve_config(None, [], {}, ["train.sync_bn=true"])["train"]["sync_bn"] is True
    with pytest.raises(ConfigError, match="train.sync_bn"):
        resolve_config(None, [], {}, ["train.sync_bn=sometimes"])
    with pytest.raises(ConfigError, match="train.compile"):
        resolve_config(None, [], {}, ["train.compile=1"])


def test_channels_last_trains_like_the_default(tiny, tmp_path):
    ref_run, ref = first_step(tiny, tmp_path / "a")
    run, got = first_step(tiny, tmp_path / "b", "train.channels_last=true")
    conv = [m for m in run.student.modules() if isinstance(m, nn.Conv2d)]
    assert conv and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in conv)
    assert float(got["total"]) == pytest.approx(float(ref["total"]), rel=1e-5)
    for (n, p), q in zip(run.student.named_parameters(), ref_run.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_compile_trains_like_eager(tiny, tmp_path):
    ref_run, ref = first_step(tiny, tmp_path / "a")
    run, got = first_step(tiny, tmp_path / "b", "train.compile=true")
    assert hasattr(run.student.encode_image, "_torchdynamo_orig_callable") or "compile" in repr(run.student.encode_image).lower()
    assert float(got["total"]) == pytest.approx(float(ref["total"]), rel=1e-4)
    assert set(run.student.state_dict()) == set(ref_run.student.state_dict())
    for (n, p), q in zip(run.student.named_parameters(), ref_run.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)
