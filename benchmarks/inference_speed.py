"""Student vs teacher inference throughput: images/s and texts/s (default ViT-S/16 vs ViT-L/14).

Both models encode the same batch of random 224 px images and the same tokenized captions
(tokenization excluded), in interleaved rounds, under ``torch.inference_mode``. Also reported:
parameter counts and forward GFLOPs per image (:mod:`distill.core.profile`), so the measured speedup
can be read against the compute ratio. Target: student >= 10x the teacher's images/s and texts/s.

    python benchmarks/inference_speed.py                       # CPU defaults
    python benchmarks/inference_speed.py --device cuda --image-batch 256 --text-batch 1024 --repeats 10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from distill.core.profile import count_params, image_gflops  # noqa: E402

NAME = "inference_speed"
TARGET = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    C.add_clock_args(p)
    C.add_student_args(p)
    p.add_argument("--teacher", default="openclip:ViT-L-14", help="teacher spec (random init unless a tag/path is given)")
    p.add_argument("--image-batch", type=int, default=4)
    p.add_argument("--text-batch", type=int, default=16)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for both models (CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    return p


def captions(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(C.WORDS[int(i)] for i in torch.randint(len(C.WORDS), (int(torch.randint(6, 16, (1,), generator=g)),),
                                                           generator=g)) for _ in range(n)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    from students import create_student
    from teachers import create_teacher

    teacher = create_teacher(args.teacher, str(device))
    student = create_student("vit", **C.student_config(args)).to(device).eval()
    texts = captions(args.text_batch, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    pixels = {name: torch.randn(args.image_batch, 3, m.image_size, m.image_size, generator=g).to(device)
              for name, m in (("teacher", teacher), ("student", student))}
    tokens = {name: {k: v.to(device) for k, v in m.tokenize(texts).items()}
              for name, m in (("teacher", teacher), ("student", student))}
    models = {"teacher": teacher, "student": student}

    def run(name: str, kind: str) -> Any:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            m = models[name]
            return m.encode_image(pixels[name]) if kind == "image" else m.encode_text(tokens[name])

    fns = {f"{n}_{k}": (lambda n=n, k=k: run(n, k)) for k in ("image", "text") for n in ("teacher", "student")}
    timings = C.time_interleaved(fns, args.warmup, args.repeats, device, args.clock)
    rate = {k: (args.image_batch if k.endswith("image") else args.text_batch) / t.median for k, t in timings.items()}
    gflops = {n: image_gflops(m, m.image_size, str(device)) for n, m in models.items()}
    params = {n: count_params(m) for n, m in models.items()}
    img_x = rate["student_image"] / rate["teacher_image"]
    txt_x = rate["student_text"] / rate["teacher_text"]
    results = {
        "seconds_per_batch": {k: t.to_json() for k, t in timings.items()},
        "images_per_s": {"teacher": rate["teacher_image"], "student": rate["student_image"]},
        "texts_per_s": {"teacher": rate["teacher_text"], "student": rate["student_text"]},
        "image_speedup": img_x, "text_speedup": txt_x, "target_speedup": TARGET,
        "pass": img_x >= TARGET and txt_x >= TARGET,
        "params": params, "param_ratio": params["teacher"] / params["student"],
        "image_gflops": gflops, "image_gflops_ratio": gflops["teacher"] / gflops["student"],
        "image_size": {n: m.image_size for n, m in models.items()},
        "peak_rss_mb": C.peak_rss_mb(), "cuda_peak_mb": C.cuda_peak_mb(device),
    }
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "student_config": student.config()}
    notes = ["texts: both models encode the same captions, tokenized by their own tokenizer beforehand",
             "GFLOPs: one image's encode_image forward as counted by torch.utils.flop_counter"]
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    C.print_summary(NAME, f"images/s student {rate['student_image']:.3g} vs teacher {rate['teacher_image']:.3g} "
                          f"= {img_x:.1f}x, texts/s {rate['student_text']:.3g} vs {rate['teacher_text']:.3g} = {txt_x:.1f}x "
                          f"(target >= {TARGET:g}x) {'PASS' if results['pass'] else 'FAIL'}; image GFLOPs ratio "
                          f"{results['image_gflops_ratio']:.1f}x, params ratio {results['param_ratio']:.1f}x "
                          f"({C.clock_label(args)})", out)
    return results


if __name__ == "__main__":
    C.script_main(main)
