"""Exact Recall@K evaluation time and memory (:func:`distill.core.metrics.retrieval_metrics`).

Synthetic L2-normalised embeddings (each caption = its image's embedding + noise, 5 captions per
image) of ``--images`` x ``--captions`` are ranked exactly; timed side by side with the bare tiled
matrix product of the same sizes (the unavoidable part). Peak extra RSS of one evaluation is
compared with the size of a full score matrix. Then the same exact, tiled evaluation (memory
bounded by one ``--chunk-size`` tile) runs at ``--scale`` sizes to check linearity in N*M and to
extrapolate to 100K x 500K (``--full`` measures that size too). Target: the 5K x 25K evaluation
in < 2 s on CPU.

    python benchmarks/eval_speed.py                            # 5Kx25K, then 10Kx50K and 20Kx100K
    python benchmarks/eval_speed.py --device cuda --full
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from distill.core.metrics import CPU_TILE, CUDA_TILE, retrieval_metrics  # noqa: E402

NAME = "eval_speed"
TARGET_S = 2.0
FULL = (100_000, 500_000)


def size(text: str) -> tuple[int, int]:
    """``"10000x50000"`` -> (images, captions)."""
    n, _, m = text.lower().partition("x")
    return int(n), int(m)


def label(n: int, m: int) -> str:
    """``5000, 25000`` -> ``"5Kx25K"``."""
    return f"{n / 1000:g}Kx{m / 1000:g}K"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    C.add_clock_args(p)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions", type=int, default=25000)
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--chunk-size", type=int, default=None, help="tile edge (default: 1024 on CPU, 4096 on CUDA)")
    p.add_argument("--noise", type=float, default=1.0, help="caption = image embedding + noise * N(0, 1/dim)")
    p.add_argument("--scale", type=size, nargs="*", default=[(10_000, 50_000), (20_000, 100_000)],
                   metavar="NxM", help="larger sizes timed once each for the linearity check")
    p.add_argument("--full", action="store_true", help="also measure 100000x500000")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    return p


def embeddings(n: int, m: int, dim: int, noise: float, seed: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image [n, dim], text [m, dim], caption_image [m]); captions spread evenly over images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    cap_img = torch.arange(m) * n // m
    txt = torch.nn.functional.normalize(img[cap_img] + noise * torch.randn(m, dim, generator=g) / dim ** 0.5, dim=1)
    return img.to(device), txt.to(device), cap_img.to(device)


def tiled_product(img: torch.Tensor, txt: torch.Tensor, tile: int) -> None:
    """The bare score computation: every ``tile`` x ``tile`` block of ``img @ txt.T``, discarded."""
    for r0 in range(0, img.shape[0], tile):
        for c0 in range(0, txt.shape[0], tile):
            img[r0:r0 + tile] @ txt[c0:c0 + tile].T


def timed_eval(n: int, m: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One evaluation at n x m: seconds, seconds per 1e9 pairs, extra peak RSS."""
    img, txt, cap = embeddings(n, m, args.dim, args.noise, args.seed, device)
    C.sync(device)
    with C.PeakRSS() as mem:
        t0 = C.now(args.clock)
        metrics = retrieval_metrics(img, txt, cap, chunk_size=args.chunk_size)
        C.sync(device)
        seconds = C.now(args.clock) - t0
    return {"images": n, "captions": m, "seconds": seconds, "seconds_per_gpair": seconds / (n * m / 1e9),
            "extra_rss_mb": mem.delta_mb, "rsum": metrics["rsum"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    tile = args.chunk_size or (CUDA_TILE if device.type == "cuda" else CPU_TILE)
    n, m = args.images, args.captions
    img, txt, cap = embeddings(n, m, args.dim, args.noise, args.seed, device)
    timings = C.time_interleaved({"eval": lambda: retrieval_metrics(img, txt, cap, chunk_size=args.chunk_size),
                                  "matmul": lambda: tiled_product(img, txt, tile)}, args.warmup, args.repeats, device, args.clock)
    with C.PeakRSS() as mem:
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        metrics = retrieval_metrics(img, txt, cap, chunk_size=args.chunk_size)
    score_matrix_mb = n * m * 4 / 2**20
    t_eval = timings["eval"].median
    base = {"images": n, "captions": m, "seconds": t_eval, "seconds_per_gpair": t_eval / (n * m / 1e9)}
    del img, txt, cap

    sizes = list(args.scale) + ([FULL] if args.full and FULL not in args.scale else [])
    scaling = []
    for sn, sm in sizes:
        r = timed_eval(sn, sm, args, device)
        r["per_pair_time_vs_base"] = r["seconds_per_gpair"] / base["seconds_per_gpair"]
        scaling.append(r)
    largest = scaling[-1] if scaling else base
    extrapolated = largest["seconds_per_gpair"] * FULL[0] * FULL[1] / 1e9
    results = {
        "base": {**base, "timings": {k: t.to_json() for k, t in timings.items()},
                 "eval_vs_bare_matmul": t_eval / timings["matmul"].median,
                 "extra_rss_mb": mem.delta_mb, "full_score_matrix_mb": score_matrix_mb,
                 "extra_rss_vs_score_matrix": mem.delta_mb / score_matrix_mb,
                 "cuda_peak_mb": C.cuda_peak_mb(device), "metrics": metrics},
        "target_s": TARGET_S, "pass": t_eval < TARGET_S if device.type == "cpu" else None, "tile": tile,
        "scaling": scaling, "extrapolated_100k_x_500k_s": extrapolated,
        "max_per_pair_time_vs_base": max((r["per_pair_time_vs_base"] for r in scaling), default=None),
    }
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    notes = ["exact ranks (no approximation) at every size; memory is bounded by one tile",
             "per_pair_time_vs_base = (seconds / (N*M)) relative to the base size: 1.0 means linear in N*M",
             "extrapolation uses the per-pair time of the largest measured size"]
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    verdict = {True: "PASS", False: "FAIL", None: "(CPU target)"}[results["pass"]]
    lin = ", ".join(f"{label(r['images'], r['captions'])} {r['seconds']:.1f} s "
                    f"({r['per_pair_time_vs_base']:.2f}x per pair)" for r in scaling)
    C.print_summary(NAME, f"{label(n, m)} exact {t_eval:.2f} s (target < {TARGET_S:g} s on CPU) {verdict}, "
                          f"{results['base']['eval_vs_bare_matmul']:.2f}x the bare matmul, +{mem.delta_mb:.0f} MiB RSS "
                          f"({100 * results['base']['extra_rss_vs_score_matrix']:.0f}% of a full score matrix); {lin}; "
                          f"100Kx500K {'measured' if args.full else 'extrapolated'} ~{extrapolated:.0f} s ({C.clock_label(args)})",
                    out)
    return results


if __name__ == "__main__":
    C.script_main(main)
