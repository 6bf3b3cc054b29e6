"""CUDA code paths checked on CPU: benchmark device selection (torch.cuda mocked), the deterministic
adaptive pooling of the token loss, and the deterministic-mode setup."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch
import torch.nn.functional as F

from benchmarks import common as C
from distill.core import determinism
from distill.losses.pooling import adaptive_avg_pool2d, pooling_matrix


# ------------------------------------------------------------------------------------ device selection
@pytest.fixture
def fake_cuda(monkeypatch):
    calls: dict[str, list] = {"set_device": [], "reset_peak_memory_stats": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)

    def set_device(d):
        if isinstance(d, torch.device) and d.index is None:  # what the real one does
            raise ValueError("Expected a torch.device with a specified index or an integer")
        calls["set_device"].append(d)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls["reset_peak_memory_stats"].append(d))
    return calls


def _args(device: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    C.add_common_args(p, "x")
    C.add_clock_args(p)
    return p.parse_args(["--device", device])


def test_setup_gives_cuda_an_index(fake_cuda):
    args = _args("cuda")
    device = C.setup(args)
    assert device == torch.device("cuda", 1)  # the current device
    assert fake_cuda["set_device"] == [torch.device("cuda", 1)]
    assert fake_cuda["reset_peak_memory_stats"] == [torch.device("cuda", 1)]
    assert args.clock == "wall"


def test_setup_keeps_an_explicit_index_and_checks_it(fake_cuda):
    assert C.setup(_args("cuda:0")) == torch.device("cuda", 0)
    with pytest.raises(SystemExit, match="only 2 CUDA device"):
        C.resolve_device("cuda:5")


def test_setup_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        C.resolve_device("cuda")
    with pytest.raises(SystemExit, match="not a device"):
        C.resolve_device("gpu")
    assert C.setup(_args("cpu")) == torch.device("cpu")


def test_init_distributed_single_process_keeps_the_index(fake_cuda, monkeypatch):
    from distill.core import dist as D

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert D.init_distributed("cuda:1").device == torch.device("cuda", 1)
    assert D.init_distributed("cuda").device == torch.device("cuda", 0)
    assert fake_cuda["set_device"] == [torch.device("cuda", 1), torch.device("cuda", 0)]


# ------------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("shape,size", [((2, 3, 8, 8), (4, 4)), ((2, 3, 14, 14), (7, 7)), ((2, 3, 7, 5), (3, 2)),
                                         ((1, 4, 14, 14), (16, 16)), ((2, 3, 10, 6), (4, 6)), ((1, 2, 5, 5), (1, 1))])
def test_pooling_matches_adaptive_avg_pool2d_with_gradients(shape, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    ours, ref = adaptive_avg_pool2d(x, size), F.adaptive_avg_pool2d(y, size)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)


def test_pooling_matrix_rows_are_the_adaptive_bins():
    m = pooling_matrix(7, 3)  # bins [0,3), [2,5), [4,7)
    expect = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]]) / 3
    torch.testing.assert_close(m, expect.float())
    with pytest.raises(ValueError):
        pooling_matrix(0, 3)


def test_token_loss_pools_deterministically():
    from distill.losses.base import Dims
    from distill.losses.token import TokenLoss

    loss = TokenLoss(Dims(8, 8, 6, 6, 5, 5))
    s = torch.randn(2, 49, 6, requires_grad=True)
    t = torch.randn(2, 9, 5)
    with torch.no_grad():
        ref_pooled = F.adaptive_avg_pool2d(s.transpose(1, 2).reshape(2, 6, 7, 7), (3, 3)).flatten(2).transpose(1, 2)
        ref = (1 - F.cosine_similarity(loss.img_proj(ref_pooled), t, dim=-1)).mean()
    torch.testing.assert_close(loss.image_term(s, (7, 7), t, (3, 3)), ref)


# ------------------------------------------------------------------------------------ deterministic mode
@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


def test_enable_determinism_sets_cublas_workspace(monkeypatch, restore_determinism):
    monkeypatch.delenv(determinism.CUBLAS_KEY, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        determinism.enable_determinism()
    import os

    assert os.environ[determinism.CUBLAS_KEY] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is False


def test_enable_determinism_warns_when_cuda_is_already_up(monkeypatch, restore_determinism):
    monkeypatch.setenv(determinism.CUBLAS_KEY, ":0:0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="CUBLAS_WORKSPACE_CONFIG"):
        determinism.enable_determinism()
    monkeypatch.setenv(determinism.CUBLAS_KEY, ":16:8")  # already deterministic: kept, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        determinism.enable_determinism()
    import os

    assert os.environ[determinism.CUBLAS_KEY] == ":16:8"
