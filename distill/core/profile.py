"""Model size and speed measurements shared by the quickstart and the benchmarks."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(fn: Callable[[torch.Tensor], Any], pixels: torch.Tensor) -> int:
    """Forward FLOPs of ``fn(pixels)`` (matmuls/convs, as counted by ``torch.utils.flop_counter``)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(pixels)
    return counter.get_total_flops()


def image_gflops(model: Any, image_size: int, device: str = "cpu") -> float:
    """Forward GFLOPs of ``model.encode_image`` for one image."""
    return count_flops(model.encode_image, torch.randn(1, 3, image_size, image_size, device=device)) / 1e9


def images_per_second(model: Any, image_size: int, batch_size: int = 32, iters: int = 3, device: str = "cpu") -> float:
    """Throughput of ``model.encode_image`` on random pixels after one warm-up batch."""
    pixels = torch.randn(batch_size, 3, image_size, image_size, device=device)
    with torch.inference_mode():
        model.encode_image(pixels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model.encode_image(pixels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - start)
