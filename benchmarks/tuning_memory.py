"""Parameter-efficient tuning vs full fine-tuning of the same pretrained towers.

``python -m benchmarks.tuning_memory`` builds a ``lit:`` folder from the real offline MobileNetV2 +
all-MiniLM-L6-v2 weights (seeded random projections) and, side by side in one run, compares three
students on it: ``full`` (the ``pruned`` student keeping every block/layer, i.e. the same towers
with everything trainable, started from the same projections), ``mwa`` and ``pmf``
(``students/mwa.py``, ``students/pmf.py``). For each it reports

* the trainable-parameter share;
* training memory of one CLIP-loss AdamW step, as bytes of parameters + gradients + optimizer
  state + activations saved for backward (unique storages recorded with
  ``torch.autograd.graph.saved_tensors_hooks``, parameters and buffers excluded) — exact and
  independent of allocator noise, a lower bound of the peak (temporary buffers are not counted);
  on CUDA also ``torch.cuda.max_memory_allocated`` over the step;
* the median step time (modes interleaved round by round);
* Flickr8k recall (R@1/5/10, rsum on the first ``--recall-eval-images`` test images) after
  ``--recall-steps`` CLIP-loss steps on the first ``--recall-train-images`` train images (one random
  caption per image per step); ``--recall-steps 0`` skips it. The untrained start is reported as
  ``start`` (all modes but ``pmf``'s text side start at exactly the LiT model).

Results go to ``benchmarks/results/tuning_memory.json``; one summary line is printed.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (FLICKR8K, WORDS, add_common_args, cuda_peak_mb, fmt, print_summary, ratio, script_main,
                               setup, sync, time_interleaved, write_result)
from students import Student, create_student
from teachers.lit import LiTConfig, LiTTeacher

NAME = "tuning_memory"
MODES = ("full", "mwa", "pmf")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.splitlines()[0])
    add_common_args(p, NAME)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--image-size", type=int, default=160, help="LiT/student input size (Flickr8k images are 160 px)")
    p.add_argument("--batch-size", type=int, default=16, help="images (and captions) per training step")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds")
    p.add_argument("--mwa-cfg", type=json.loads, default={}, metavar="JSON", help="extra mwa options")
    p.add_argument("--pmf-cfg", type=json.loads, default={}, metavar="JSON", help="extra pmf options")
    p.add_argument("--recall-steps", type=int, default=20, help="training steps per mode before recall (0: skip)")
    p.add_argument("--recall-train-images", type=int, default=320)
    p.add_argument("--recall-eval-images", type=int, default=100, help="first N Flickr8k test images (5 captions each)")
    p.add_argument("--lr-tuned", type=float, default=1e-3, help="lr of new modules, projections and logit scale")
    p.add_argument("--lr-full", type=float, default=3e-5, help="lr of the pretrained towers in the full mode")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ students
def build_mode(mode: str, spec: str, teacher: LiTTeacher, args: argparse.Namespace) -> Student:
    """The student of one mode, on the CPU; ``full`` gets the teacher's projections and scale."""
    if mode == "mwa":
        return create_student("mwa", teacher=spec, **args.mwa_cfg)
    if mode == "pmf":
        return create_student("pmf", teacher=spec, **args.pmf_cfg)
    s = create_student("pruned", teacher=spec, image_layers=len(teacher.backbone),
                      text_layers=len(teacher.text_model.encoder.layer), embed_dim=teacher.embed_dim)
    state = teacher.projection_state()
    with torch.no_grad():
        s.image_proj.weight.copy_(state["image_proj.weight"])
        s.text_proj.weight.copy_(state["text_proj.weight"])
        s.logit_scale.copy_(state["log_logit_scale"])
    return s


def make_optimizer(student: Student, mode: str, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; in ``full`` the towers get ``--lr-full``."""
    head, towers = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (towers if mode == "full" and name.startswith(("image_tower.", "text_tower.")) else head).append(p)
    groups = [{"params": head, "lr": args.lr_tuned}] + ([{"params": towers, "lr": args.lr_full}] if towers else [])
    return torch.optim.AdamW(groups, weight_decay=0.0)


def clip_loss(student: Student, pixels: Tensor, text: dict[str, Tensor]) -> Tensor:
    img, txt = student.encode_image(pixels).embed, student.encode_text(text).embed
    logits = student.logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_step(student: Student, opt: torch.optim.Optimizer, pixels: Tensor, text: dict[str, Tensor]) -> float:
    opt.zero_grad(set_to_none=True)
    loss = clip_loss(student, pixels, text)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------ memory
def _storage_key(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_memory(student: Student, opt: torch.optim.Optimizer, pixels: Tensor, text: dict[str, Tensor],
                device: torch.device) -> dict[str, Any]:
    """Bytes held by one training step (optimizer state must already exist: run a step first)."""
    fixed = {_storage_key(t)[0] for t in [*student.parameters(), *student.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr, size = _storage_key(t)
        if ptr not in fixed and size:
            saved[ptr] = size
        return t

    opt.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = clip_loss(student, pixels, text)
    loss.backward()
    grads = _nbytes(p.grad for p in student.parameters() if p.grad is not None)
    opt.step()
    sync(device)
    state = _nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
    params = _nbytes(student.parameters())
    activations = sum(saved.values())
    mb = 2 ** 20
    return {"params_mb": params / mb, "grads_mb": grads / mb, "optimizer_state_mb": state / mb,
            "activations_mb": activations / mb, "total_mb": (params + grads + state + activations) / mb,
            "cuda_max_allocated_mb": cuda_peak_mb(device)}


# ------------------------------------------------------------------------------------ data
def load_split(split: str, n: int):
    """First ``n`` images of a Flickr8k split (None when the data set is absent)."""
    if not (FLICKR8K / "captions.tsv").is_file():
        return None
    from distill.core.data.factory import load_dataset

    data = load_dataset(FLICKR8K, split)
    return data.subset(range(min(n, data.num_images)))


def bench_batch(teacher: LiTTeacher, n: int, seed: int) -> tuple[Tensor, list[str], str]:
    """(pixels, captions, description): the first ``n`` Flickr8k train images and their first captions,
    or random pixels and word-salad captions when Flickr8k is absent."""
    data = load_split("train", n)
    if data is None:
        rng = np.random.default_rng(seed)
        caps = [" ".join(rng.choice(WORDS, size=12)) for _ in range(n)]
        size = teacher.image_size
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)), caps, "random pixels"
    tf = teacher.image_transform()
    pixels = torch.stack([tf(data.load_image(i)) for i in range(n)])
    return pixels, [data.captions_of(i)[0] for i in range(n)], f"first {n} Flickr8k train images"


def recall_run(mode: str, spec: str, teacher: LiTTeacher, train_px: Tensor, train_caps: list[list[str]], eval_data,
               args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train a fresh student of ``mode`` for ``--recall-steps`` steps, then evaluate retrieval."""
    from distill.pipeline.evaluate import evaluate_model

    torch.manual_seed(args.seed)
    student = build_mode(mode, spec, teacher, args).to(device).train()
    opt = make_optimizer(student, mode, args)
    rng = np.random.default_rng(args.seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(args.recall_steps):
        idx = rng.choice(len(train_px), size=args.batch_size, replace=False)
        caps = [train_caps[i][rng.integers(len(train_caps[i]))] for i in idx]
        text = {k: v.to(device) for k, v in student.tokenize(caps).items()}
        losses.append(train_step(student, opt, train_px[idx].to(device), text))
    seconds = time.perf_counter() - t0
    student.eval()
    with torch.no_grad():
        metrics = evaluate_model(student, eval_data, batch_size=64, device=device, progress=False)
    return {"loss_first": losses[0], "loss_last": losses[-1], "train_seconds": seconds, **metrics}


# ------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise SystemExit(f"error: --modes must be a subset of {','.join(MODES)}, got {args.modes!r}")
    device = setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = LiTTeacher(LiTConfig(image_size=args.image_size, seed=args.seed)).save(Path(tmp) / "lit")
        spec = f"lit:{folder}"
        teacher = LiTTeacher.from_folder(folder)
        pixels, caps, batch_source = bench_batch(teacher, args.batch_size, args.seed)
        results: dict[str, Any] = {m: {} for m in modes}
        students, optims = {}, {}
        for m in modes:
            torch.manual_seed(args.seed)
            students[m] = build_mode(m, spec, teacher, args).to(device).train()
            optims[m] = make_optimizer(students[m], m, args)
        px = pixels.to(device)
        text = {k: v.to(device) for k, v in students[modes[0]].tokenize(caps).items()}
        for m in modes:
            s = students[m]
            trainable = sum(p.numel() for p in s.parameters() if p.requires_grad)
            train_step(s, optims[m], px, text)  # creates the optimizer state
            results[m].update({"params": s.num_params(), "trainable_params": trainable,
                               "trainable_share": trainable / s.num_params(),
                               "memory": step_memory(s, optims[m], px, text, device)})
        timings = time_interleaved({m: (lambda m=m: train_step(students[m], optims[m], px, text)) for m in modes},
                                   args.warmup, args.repeats, device)
        for m in modes:
            results[m]["step"] = timings[m].to_json()
        del students, optims
        recall = run_recall(modes, spec, teacher, args, device) if args.recall_steps > 0 else None
    if recall is not None:
        results["start"] = recall.pop("start")
        for m in modes:
            results[m]["recall"] = recall[m]
    base = results.get("full")
    for m in modes:
        r = results[m]
        r["vs_full"] = None if base is None else {
            "trainable_share": ratio(r["trainable_params"], base["trainable_params"]),
            "memory_total": ratio(r["memory"]["total_mb"], base["memory"]["total_mb"]),
            "cuda_max_allocated": ratio(r["memory"]["cuda_max_allocated_mb"], base["memory"]["cuda_max_allocated_mb"]),
            "step_time": ratio(r["step"]["median_s"], base["step"]["median_s"])}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update({"modes": modes, "batch_source": batch_source, "lit": "offline MobileNetV2 + all-MiniLM-L6-v2, "
                     "seeded random projections"})
    notes = ["memory = parameters + gradients + AdamW state + unique activation storages saved for backward "
             "(a lower bound of the peak; temporaries not counted); on CUDA also max_memory_allocated",
             "full = the pruned student keeping every block/layer (all trainable), started from the LiT projections",
             f"recall: {args.recall_steps} CLIP-loss steps of batch {args.batch_size} on the first "
             f"{args.recall_train_images} Flickr8k train images, evaluated on the first {args.recall_eval_images} "
             "test images; a tiny budget meant to compare modes, not final accuracy"]
    out = write_result(NAME, args.out, device, settings, results, notes)
    print_summary(NAME, summary_text(results, modes), out)
    return results


def run_recall(modes: list[str], spec: str, teacher: LiTTeacher, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any] | None:
    """Recall of the untrained LiT model and of every mode after a short training (None without Flickr8k)."""
    from distill.pipeline.evaluate import evaluate_model

    train, evald = load_split("train", args.recall_train_images), load_split("test", args.recall_eval_images)
    if train is None or evald is None:
        return None
    tf = teacher.image_transform()
    train_px = torch.stack([tf(train.load_image(i)) for i in range(train.num_images)])
    train_caps = [train.captions_of(i) for i in range(train.num_images)]
    start = create_student("mwa", teacher=spec).to(device).eval()  # an untrained mwa is exactly the LiT model
    with torch.no_grad():
        out: dict[str, Any] = {"start": evaluate_model(start, evald, 64, device, progress=False)}
    del start
    for m in modes:
        out[m] = recall_run(m, spec, teacher, train_px, train_caps, evald, args, device)
    return out


def summary_text(results: dict[str, Any], modes: list[str]) -> str:
    parts = []
    for m in modes:
        r = results[m]
        rec = r.get("recall")
        parts.append(f"{m} trainable {100 * r['trainable_share']:.1f}% mem {r['memory']['total_mb']:.0f} MB "
                     f"(act {r['memory']['activations_mb']:.0f}) step {fmt(r['step']['median_s'])} s"
                     + (f" rsum {rec['rsum']:.1f}" if rec else ""))
    if "start" in results:
        parts.append(f"start rsum {results['start']['rsum']:.1f}")
    return "; ".join(parts)


if __name__ == "__main__":
    script_main(main)
