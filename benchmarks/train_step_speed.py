"""Training step time from the teacher cache vs online distillation (teacher in the loop).

Both modes run the real training step (:func:`distill.pipeline.train.loop.train_step`: student forward,
every configured loss, balancer, backward, AdamW) on the same student. ``cache`` reads the
teacher outputs through the real DataLoader (:class:`DistillTrainSet` + :class:`TeacherCollate`);
``online`` loads the same images and captions, runs the teacher (default: a random-init
ViT-L/14 open_clip model) on them and feeds its outputs to the same step. Also timed, in the
same interleaved rounds: the teacher forward alone (``teacher``), the student step on a batch
already in memory (``student``) and the cache loader alone (``loader``).

Figure of merit: ``speedup = T_online / T_cache`` against the ideal
``(T_teacher + T_student) / T_student``; target ``speedup >= 0.9 x ideal``. The cache is written
by a 1-block copy of the teacher (identical output shapes, so identical bytes to read).

    python benchmarks/train_step_speed.py                      # CPU defaults (~3 min on 2 cores)
    python benchmarks/train_step_speed.py --device cuda --batch-size 128 --images 1024 --repeats 10
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from distill.pipeline.train import loop as tl  # noqa: E402
from distill.pipeline.train import main as ts  # noqa: E402
from distill.core.data.augment import apply_view  # noqa: E402
from distill.pipeline.train.config import TrainRunConfig, parse_override  # noqa: E402
from distill.core.dist import DistInfo  # noqa: E402
from distill.core.features import ImageFeatures, TeacherTargets, TextFeatures  # noqa: E402
from distill.pipeline.train.data import DistillTrainSet, TrainBatch  # noqa: E402

NAME = "train_step_speed"
TARGET = 0.9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    C.add_clock_args(p)
    C.add_student_args(p)
    p.add_argument("--teacher", default="openclip:ViT-L-14", help="teacher spec (random init unless a tag/path is given)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch per step")
    p.add_argument("--images", type=int, default=8, help="images in the benchmark dataset/cache")
    p.add_argument("--data", default="auto", choices=("auto", "flickr8k", "synthetic"))
    p.add_argument("--image-tokens", default="full", help="cache --image-tokens (full | grid:<g> | topk:<k> | none)")
    p.add_argument("--losses", default=None, help="override the loss list, e.g. '[cosine, token]' (default: the config default)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of both modes")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds")
    return p


class OnlineSet(DistillTrainSet):
    """The training set plus the teacher's own pixels of the same (viewed) image."""

    def __init__(self, base: DistillTrainSet, teacher_transform: Callable[[Any], torch.Tensor]) -> None:
        super().__init__(base.dataset, base.cache, base.transform, base.seed, base.num_views > 1)
        self.teacher_transform = teacher_transform

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        caption, view = self.choose(index, epoch)
        img = self.dataset.load_image(index)
        if view:
            img = apply_view(img, self.cache.view_params([index], view)[0])
        return {"pixels": self.transform(img), "teacher_pixels": self.teacher_transform(img),
                "text": self.dataset.captions[caption], "image_index": index, "caption_index": caption, "view": view}


def collate_online(items: list[dict[str, Any]],
                   tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stacked student and teacher pixels, the captions and their student tokens (as the cache loader)."""
    texts = [it["text"] for it in items]
    return {"pixels": torch.stack([it["pixels"] for it in items]),
            "teacher_pixels": torch.stack([it["teacher_pixels"] for it in items]),
            "texts": texts, "text": dict(tokenize(texts)),
            **{k: torch.tensor([it[k] for it in items]) for k in ("image_index", "caption_index", "view")}}


def teacher_outputs(teacher: Any, pixels: torch.Tensor, texts: Sequence[str], device: torch.device) -> TeacherTargets:
    """Teacher features of one batch (the teacher is frozen: no graph)."""
    with torch.no_grad():
        img = teacher.encode_image(pixels.to(device))
        txt = teacher.encode_text({k: v.to(device) for k, v in teacher.tokenize(texts).items()})
    to_float = lambda x: x.float() if x.is_floating_point() else x  # noqa: E731
    return TeacherTargets(ImageFeatures(img.embed, img.tokens, img.grid).map(to_float),
                          TextFeatures(txt.embed, txt.tokens, txt.mask).map(to_float), teacher.logit_scale)


def online_batches(run: tl.Run, teacher: Any, device: torch.device) -> Iterator[tuple[int, int, TrainBatch]]:
    """Endless (epoch, position, batch) like :func:`distill.pipeline.train.loop.epoch_batches`, with
    the teacher features computed on the fly."""
    base = run.loader.dataset
    loader = DataLoader(OnlineSet(base, teacher.image_transform()), batch_sampler=run.sampler,
                        num_workers=run.loader.num_workers,
                        collate_fn=functools.partial(collate_online, tokenize=run.student.tokenize))
    for epoch in itertools.count():
        run.sampler.set_epoch(epoch)
        for position, b in enumerate(loader, 1):
            t = teacher_outputs(teacher, b["teacher_pixels"], b["texts"], device)
            yield epoch, position, TrainBatch(b["pixels"], b["texts"], b["image_index"], b["caption_index"], b["view"], t,
                                              text=b["text"])


def train_config(args: argparse.Namespace, cache: Path, tsv: Path, out: Path) -> TrainRunConfig:
    """A training config for the benchmark student (steps only set the LR schedule)."""
    layers = [{"data": {"cache": str(cache), "path": str(tsv), "num_workers": args.num_workers},
               "student": {"name": "vit", **C.student_config(args)}, "out": str(out), "device": args.device,
               "seed": args.seed, "train": {"steps": 10_000, "batch_size": args.batch_size, "precision": args.precision}}]
    if args.losses:
        layers.append(parse_override(f"losses={args.losses}"))
    return TrainRunConfig.resolve(layers=layers)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    C.require_wall_clock_for_workers(args)
    from teachers import create_teacher

    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp_dir:
        tmp = Path(tmp_dir)
        tsv, data_desc = C.benchmark_dataset(tmp / "data", args.images, args.data, args.seed)
        cache_teacher = C.shallow_teacher_spec(args.teacher, 1, tmp / "teacher_cfg") or args.teacher
        cache = C.build_cache(cache_teacher, tsv, tmp / "cache", args.batch_size, device, args.plugin,
                              ["--image-tokens", args.image_tokens])
        run = ts.setup(train_config(args, cache, tsv, tmp / "run"), DistInfo(0, 1, 0, device))
        run.distiller.train()
        teacher = create_teacher(args.teacher, str(device))

        cached = tl.epoch_batches(run, 0, 0)
        online = online_batches(run, teacher, device)
        _, _, fixed = next(tl.epoch_batches(run, 0, 0))
        fixed = fixed.to(device)
        teacher_pixels = torch.stack([teacher.image_transform()(run.loader.dataset.dataset.load_image(int(i)))
                                      for i in fixed.image_index])
        step = itertools.count()
        fns = {"teacher": lambda: teacher_outputs(teacher, teacher_pixels, fixed.texts, device),
               "student": lambda: tl.train_step(run, itertools.repeat((0, 0, fixed)), next(step)),
               "loader": lambda: next(cached),
               "cache": lambda: tl.train_step(run, cached, next(step)),
               "online": lambda: tl.train_step(run, online, next(step))}
        timings = C.time_interleaved(fns, args.warmup, args.repeats, device, args.clock)
        med = {k: t.median for k, t in timings.items()}
        ideal = (med["teacher"] + med["student"]) / med["student"]
        speedup = med["online"] / med["cache"]
        fraction = speedup / ideal
        results = {
            "seconds_per_step": {k: t.to_json() for k, t in timings.items()},
            "speedup_cache_vs_online": speedup, "ideal_speedup": ideal, "fraction_of_ideal": fraction,
            "target_fraction": TARGET, "pass": fraction >= TARGET,
            "loader_fraction_of_cache_step": med["loader"] / med["cache"],
            "cache_overhead_vs_student_step": med["cache"] / med["student"],
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in run.student.parameters()),
            "losses": [x.name for x in run.config.losses],
            "peak_rss_mb": C.peak_rss_mb(), "cuda_peak_mb": C.cuda_peak_mb(device),
        }
        settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "dataset": data_desc,
                    "cache_teacher": Path(cache_teacher).name, "cache_dims": run.loader.collate_fn.cache.dims}
    notes = ["each round runs teacher, student, loader, cache and online once, in that order",
             "ideal = (T_teacher + T_student) / T_student; speedup = T_online / T_cache",
             "the cache was written by a 1-block copy of the teacher (same shapes, same bytes to read)"]
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    verdict = "PASS" if results["pass"] else "FAIL"
    C.print_summary(NAME, f"cache {C.fmt(med['cache'])} s/step, online {C.fmt(med['online'])} s/step, speedup "
                          f"{speedup:.2f}x = {fraction:.2f} of ideal {ideal:.2f}x (target >= {TARGET}) {verdict}; "
                          f"loader {100 * results['loader_fraction_of_cache_step']:.1f}% of the cache step ({C.clock_label(args)})", out)
    return results


if __name__ == "__main__":
    C.script_main(main)
