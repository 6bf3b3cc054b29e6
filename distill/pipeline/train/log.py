"""Training logs: one JSON object per line (``OUT/train_log.jsonl``), TensorBoard scalars
(``OUT/tb``) and final PNGs: the raw losses, the total loss, the validation RSUM and the balancer
weights (``OUT/plots/losses.png``), and the per-term balancer weights alone (``OUT/plots/weights.png``).

Records have ``kind`` ``"train"`` (step, epoch, lr, ``loss/<name>``, ``weight/<name>``, total,
samples_per_s, skipped_nonfinite) or ``"eval"`` (step + ``eval/<metric>``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOG_NAME = "train_log.jsonl"


def read_log(out: str | Path, kind: str | None = "train") -> list[dict[str, Any]]:
    """All records of ``kind`` (or every record for ``None``) from ``OUT/train_log.jsonl``. A last
    line that is not valid JSON (a write torn by a kill) is ignored."""
    path = Path(out) / LOG_NAME
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    recs = []
    for i, line in enumerate(lines):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
    return [r for r in recs if kind is None or r.get("kind") == kind]


class TrainLogger:
    """Rank-0 logger. On resume from ``resume_step`` records after that step (written by the run
    that was interrupted) are dropped so the log reads as one uninterrupted run."""

    def __init__(self, out: str | Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / LOG_NAME
        if self.path.is_file():
            keep = [r for r in read_log(self.out, None) if r.get("step", 0) <= resume_step] if resume_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``kind`` and ``step``) and mirror its numbers to TensorBoard."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = "train/" if record["kind"] == "train" else ""
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path, name: str) -> Path:
    path = Path(out) / "plots" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_weights(out: str | Path) -> Path | None:
    """``OUT/plots/weights.png``: every term's balancer weight (``weight/<name>``) vs step, with the
    mean weight 1 dashed; ``None`` when no weight was logged."""
    recs = read_log(out)
    keys = sorted({k for r in recs for k in r if k.startswith("weight/")})
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in recs]
    for key in keys:
        ax.plot(steps, [r.get(key, math.nan) for r in recs], label=key[len("weight/"):], linewidth=1.2)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("balancer weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out, "weights.png")


def plot_losses(out: str | Path) -> Path | None:
    """``OUT/plots/losses.png`` with raw losses (log scale) and balancer weights vs step, plus
    :func:`plot_weights`; returns the losses PNG, ``None`` when nothing was logged."""
    recs = read_log(out)
    if not recs:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in recs]
    fig, (ax_l, ax_w) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for prefix, ax in (("loss/", ax_l), ("weight/", ax_w)):
        for key in sorted({k for r in recs for k in r if k.startswith(prefix)}):
            ys = [r.get(key, math.nan) for r in recs]
            if prefix == "loss/":
                ys = [y if y is not None and y > 0 else math.nan for y in ys]
            ax.plot(steps, ys, label=key[len(prefix):], linewidth=1)
    ax_l.plot(steps, [r.get("total", math.nan) for r in recs], label="total (weighted)", color="black", linewidth=1.5)
    evals = [r for r in read_log(out, "eval") if "eval/rsum" in r]
    if evals:  # validation RSUM on a second axis of the loss panel
        ax_v = ax_l.twinx()
        ax_v.plot([r["step"] for r in evals], [r["eval/rsum"] for r in evals], "o-", color="tab:red",
                  label="validation RSUM")
        ax_v.set_ylabel("validation RSUM", color="tab:red")
        ax_v.legend(fontsize=7, loc="upper right")
    ax_l.set_yscale("log")
    ax_l.set_ylabel("raw loss")
    ax_w.set_ylabel("balancer weight")
    ax_w.set_xlabel("step")
    for ax in (ax_l, ax_w):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    path = _save(fig, out, "losses.png")
    plot_weights(out)
    return path
