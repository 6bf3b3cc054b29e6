"""The shared FIFO of past teacher embeddings (image, caption and image id per slot), owned by the
Distiller and read by every loss that uses extra negatives/columns (``contrastive_distill``,
``relation_kl``). Its size is the largest ``queue_size`` the configured losses request.

Enqueue point: the Distiller :meth:`~TeacherQueue.push`\\ es the (all-rank) teacher rows of every
forward as *pending*; the trainer calls :meth:`~TeacherQueue.commit` after the optimizer step, or
:meth:`~TeacherQueue.discard` when the step is skipped. The forward pass therefore reads the buffers
directly (no per-step clone: nothing modifies them before backward), and a skipped step needs no
snapshot of the queue. Everything stays on the device: the write position and fill level are device
tensors (no host sync), empty slots carry image id -1 and are masked out by :attr:`QueueView.valid`.
A row with a non-finite value is never written: its slot keeps its previous content and the row is
counted in the ``nonfinite`` buffer. The buffers are saved in checkpoints (exact resume); all ranks
push the same gathered rows, so every rank keeps the same queue.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from distill.core.errors import ConfigError


class QueueView(NamedTuple):
    """The queue as loss inputs: [K, Dt] teacher image / caption embeddings, [K] image ids, [K] bool
    valid slots (filled and finite)."""
    img: Tensor
    txt: Tensor
    ids: Tensor
    valid: Tensor


class TeacherQueue(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"teacher queue: size must be >= 1, got {size}")
        self.register_buffer("img", torch.zeros(size, dim))
        self.register_buffer("txt", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.long))
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    def view(self) -> QueueView:
        return QueueView(self.img, self.txt, self.ids, self.ids >= 0)

    @torch.no_grad()
    def push(self, img: Tensor, txt: Tensor, ids: Tensor) -> None:
        """Record rows to enqueue at the next :meth:`commit` (only the newest ``size`` rows are kept)."""
        self._pending.append((img.detach().float(), txt.detach().float(), ids.detach().to(self.ids.device, torch.long)))
        while len(self._pending) > 1 and sum(p[0].shape[0] for p in self._pending[1:]) >= self.size:
            self._pending.pop(0)

    def pending_rows(self) -> int:
        return sum(p[0].shape[0] for p in self._pending)

    def discard(self) -> None:
        self._pending.clear()

    @torch.no_grad()
    def commit(self) -> None:
        """Write the pending rows FIFO at ``ptr`` (wrapping around), in push order."""
        for img, txt, ids in self._pending:
            self._write(img, txt, ids)
        self._pending.clear()

    def _write(self, img: Tensor, txt: Tensor, ids: Tensor) -> None:
        n, size = img.shape[0], self.size
        skip = max(0, n - size)
        img, txt, ids = img[skip:], txt[skip:], ids[skip:]
        idx = (self.ptr + skip + torch.arange(n - skip, device=self.ids.device)) % size
        finite = (torch.isfinite(img).all(dim=1) & torch.isfinite(txt).all(dim=1)).to(self.ids.device)
        keep = finite.unsqueeze(1)
        self.img[idx] = torch.where(keep, img.to(self.img), self.img[idx])
        self.txt[idx] = torch.where(keep, txt.to(self.txt), self.txt[idx])
        self.ids[idx] = torch.where(finite, ids, self.ids[idx])
        self.nonfinite += (~finite).sum()
        self.ptr.copy_((self.ptr + n) % size)
        self.filled.copy_((self.filled + n).clamp(max=size))
