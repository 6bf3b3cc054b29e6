#!/usr/bin/env bash
# GPU smoke test: every benchmark at small sizes plus a short training run of each student (vit,
# pruned, pmf, mwa) in each precision, every stage under `timeout`, on one device. Offline: the
# teacher is a random-projection `lit:` teacher (offline MobileNetV2 + MiniLM weights from the venv)
# cached on the bundled examples/sample_flickr8k; the benchmarks use a tiny random-init open_clip
# teacher. Writes OUT/logs/<stage>.log, OUT/bench/<benchmark>.json, OUT/train/<run>/ and
# OUT/summary.json ({stage: {status: ok|fail|timeout, seconds, ...}}); exits 1 if a stage failed.
#
#   benchmarks/gpu_smoke.sh --out /tmp/smoke                      # CUDA, < 4 min on one H100/H200
#   benchmarks/gpu_smoke.sh --device cpu --tiny --out /tmp/smoke  # the CPU twin the tests run
#
# Options: --device D (cuda) --out DIR (required) --steps N (50) --precisions "fp32 bf16 fp16"
# (fp16 is CUDA-only) --students "vit pruned pmf mwa" --images N (images of the sample, 300)
# --image-size PX (128) --batch-size N (32) --timeout S (per stage, 90) --skip-bench --skip-train
# --tiny (CPU sizes: small models, 16 images, 64 px, no loader workers) --jobs N (2 on CUDA: the
# benchmarks run beside the training stages; 1 on CPU) --python PY.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda OUT="" STEPS=50 PRECISIONS="fp32 bf16 fp16" STUDENTS="vit pruned pmf mwa" IMAGES=300
IMAGE_SIZE=128 BATCH=32 TIMEOUT=90 SKIP_BENCH=0 SKIP_TRAIN=0 TINY=0 WORKERS=4 JOBS="" PY="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --precisions) PRECISIONS="$2"; shift 2 ;;
    --students) STUDENTS="$2"; shift 2 ;;
    --images) IMAGES="$2"; shift 2 ;;
    --image-size) IMAGE_SIZE="$2"; shift 2 ;;
    --batch-size) BATCH="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --skip-bench) SKIP_BENCH=1; shift ;;
    --skip-train) SKIP_TRAIN=1; shift ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --tiny) TINY=1; IMAGES=16; IMAGE_SIZE=64; BATCH=4; WORKERS=0; shift ;;
    --python) PY="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_smoke: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_smoke: --out DIR is required" >&2; exit 2; }
[ -n "$JOBS" ] || { [[ "$DEVICE" == cuda* ]] && JOBS=2 || JOBS=1; }
case " $PRECISIONS " in *" fp16 "*) [[ "$DEVICE" == cuda* ]] || { echo "gpu_smoke: fp16 needs --device cuda" >&2; exit 2; } ;; esac
mkdir -p "$OUT/logs" "$OUT/bench" "$OUT/train"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" FLICKR8K_DIR="$REPO/examples/sample_flickr8k"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
STAGES="$OUT/stages.tsv"
: > "$STAGES"
cd "$REPO"

stage() {  # stage NAME CMD...: run under timeout, log to OUT/logs/NAME.log, record rc and seconds
  local name="$1"; shift
  local t0 ms rc
  t0=$(date +%s%N)
  timeout --kill-after=10 "$TIMEOUT" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%s\t%s.%03d\n' "$name" "$rc" $(( ms / 1000 )) $(( ms % 1000 )) >> "$STAGES"
  printf 'gpu_smoke: %-30s rc=%-3s %4d.%01d s\n' "$name" "$rc" $(( ms / 1000 )) $(( ms % 1000 / 100 ))
}

# ---------------------------------------------------------------- setup: teachers, data subset, cache
stage setup "$PY" - "$OUT" "$IMAGES" "$IMAGE_SIZE" <<'EOF'
import json, sys
from pathlib import Path
from teachers.lit import LiTConfig, LiTTeacher
out, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
LiTTeacher(LiTConfig(image_size=size, embed_dim=64, seed=0)).save(out / "lit")
tiny = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
(out / "bench_teacher.json").write_text(json.dumps(tiny))
sample = Path("examples/sample_flickr8k")
names = (sample / "splits" / "train.txt").read_text().split()[:n]
wanted, rows = set(names), ["image\tcaption"]
for line in (sample / "captions.tsv").read_text(encoding="utf-8").splitlines()[1:]:
    image, _, caption = line.split("\t", 2)
    if image in wanted:
        rows.append(f"images/{image}\t{caption}")
(out / "data").mkdir(exist_ok=True)
(out / "data" / "captions.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
print(f"{len(names)} images, {len(rows) - 1} captions")
EOF
DATA=(--data "$OUT/data/captions.tsv" --images-root "$REPO/examples/sample_flickr8k")

# ---------------------------------------------------------------- benchmarks
BT="openclip:$OUT/bench_teacher.json"
SCFG='{"embed_dim": 32, "vision_width": 32, "vision_layers": 1, "vision_heads": 2, "image_size": 32, "patch_size": 8, "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 16}'
if [ "$TINY" = 1 ]; then EVAL=(--images 300 --captions 1500 --dim 32 --chunk-size 128 --scale 600x3000)
else EVAL=(--images 5000 --captions 25000 --dim 256 --scale 10000x50000); fi
AMP=(); [[ "$DEVICE" == cuda* ]] && AMP=(--amp)
bench() { local name="$1"; shift; stage "bench_$name" "$PY" "benchmarks/$name.py" --device "$DEVICE" --out "$OUT/bench/$name.json" "$@"; }
run_benchmarks() {
  [ "$SKIP_BENCH" = 1 ] && return
  bench eval_speed "${EVAL[@]}" --repeats 1
  bench inference_speed --teacher "$BT" --student-cfg "$SCFG" --image-batch 8 --text-batch 16 --repeats 1 "${AMP[@]}"
  bench train_step_speed --teacher "$BT" --student-cfg "$SCFG" --data synthetic --images 16 --batch-size 8 --repeats 1
  bench cache_loader_speed --teacher "$BT" --data synthetic --images 32 --batch-size 8 --repeats 1
  bench token_storage_bytes --teacher "$BT" --data synthetic --images 6 --grid 2
  bench peak_memory --teacher "$BT" --student-cfg "$SCFG" --data synthetic --images 8 --batch-size 4 --steps 2 "${AMP[@]}"
  bench tuning_memory --image-size 64 --batch-size 4 --repeats 1 --recall-steps 2 --recall-train-images 8 --recall-eval-images 4
  if [ "$TINY" = 1 ]; then
    TIN=(--sizes 48,32 --batch-size 8 --train-teacher "$BT" --train-steps 2 --pruned-text-layers 1 --train-batch-size 4
         --train-workers 0 --train-precision fp32 --student-cfg "$SCFG")
  else
    TIN=(--sizes 160,224 --batch-size 32 --train-teacher "lit:$OUT/lit" --train-steps 20 --train-batch-size 128
         --train-workers 8 --train-precision bf16)
  fi
  bench train_input_speed --teacher "$BT" --data synthetic --images 16 --views 2 --warmup 0 --repeats 1 \
    --train-students vit-gpu,pruned "${TIN[@]}"
}

# ---------------------------------------------------------------- training: each student x precision
if [ "$TINY" = 1 ]; then
  VIT=(--set student.embed_dim=32 --set student.vision_width=32 --set student.vision_layers=1 --set student.vision_heads=2
       --set student.patch_size=16 --set student.text_width=32 --set student.text_layers=1 --set student.text_heads=2
       --set student.context_length=16 --set "student.image_size=$IMAGE_SIZE")
  PRUNED=(--set student.image_layers=6 --set student.text_layers=1 --set student.frozen_image_layers=3)
else
  VIT=(--set student.preset=vit-ti16 --set "student.image_size=$IMAGE_SIZE")
  PRUNED=(--set student.image_layers=11 --set student.text_layers=2 --set student.frozen_image_layers=5)
fi
train() {  # train NAME STUDENT PRECISION EXTRA...
  local name="$1" student="$2" prec="$3"; shift 3
  local sets=()
  case "$student" in
    vit) sets=("${VIT[@]}") ;;
    pruned) sets=(--set "student.teacher=lit:$OUT/lit" "${PRUNED[@]}") ;;
    *) sets=(--set "student.teacher=lit:$OUT/lit") ;;
  esac
  rm -rf "$OUT/train/$name"
  stage "train_$name" "$PY" -m distill.train_student --cache "$OUT/cache" "${DATA[@]}" --out "$OUT/train/$name" \
    --student "$student" --steps "$STEPS" --batch-size "$BATCH" --precision "$prec" --device "$DEVICE" \
    --num-workers "$WORKERS" --seed 0 --set train.warmup_steps=5 --set train.checkpoint_every=100000 \
    --set "train.log_every=$(( STEPS < 10 ? 1 : 10 ))" "${sets[@]}" "$@"
}
run_training() {
  [ "$SKIP_TRAIN" = 1 ] && return
  stage cache "$PY" -m distill.cache_teacher --teacher "lit:$OUT/lit" "${DATA[@]}" --out "$OUT/cache" \
    --image-tokens full --batch-size 32 --num-workers "$WORKERS" --device "$DEVICE"
  for student in $STUDENTS; do
    for prec in $PRECISIONS; do train "$student-$prec" "$student" "$prec"; done
  done
  # the CUDA-specific switches, once each
  case " $STUDENTS " in *" vit "*) train vit-fp32-deterministic vit fp32 --set train.deterministic=true ;; esac
  case " $STUDENTS " in *" pruned "*)
    train pruned-gradnorm-"${PRECISIONS##* }" pruned "${PRECISIONS##* }" --set balancer.name=gradnorm
    train pruned-channels_last pruned fp32 --set train.channels_last=true ;;
  esac
}

if [ "$JOBS" -gt 1 ]; then  # benchmarks and training side by side (smoke, not timing: the figures overlap)
  run_benchmarks & bench_pid=$!
  run_training
  wait "$bench_pid"
else
  run_benchmarks
  run_training
fi

# ---------------------------------------------------------------- summary
"$PY" - "$OUT" "$DEVICE" <<'EOF'
import json, math, sys
from pathlib import Path
from distill.pipeline.train.log import read_log
out, device = Path(sys.argv[1]), sys.argv[2]
stages = {}
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    rc = int(rc)
    entry = {"status": "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "fail"), "rc": rc,
             "seconds": round(float(seconds), 2)}
    if name.startswith("train_"):
        log = read_log(out / "train" / name[len("train_"):])
        last = log[-1] if log else {}
        entry.update(steps=last.get("step"), final_total=last.get("total"), skipped_nonfinite=last.get("skipped_nonfinite"),
                     samples_per_s=last.get("samples_per_s"))
        if entry["status"] == "ok" and not (last.get("total") is not None and math.isfinite(last["total"])
                                            and last.get("skipped_nonfinite", 0) < last.get("step", 0)):
            entry["status"] = "fail"  # ran, but no finite loss or every step skipped
    stages[name] = entry
summary = {"device": device, "ok": all(s["status"] == "ok" for s in stages.values()),
           "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1), "stages": stages}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
bad = [k for k, s in stages.items() if s["status"] != "ok"]
print(f"gpu_smoke: {len(stages) - len(bad)}/{len(stages)} stages ok in {summary['total_seconds']} s on {device}"
      + (f"; failed: {', '.join(bad)}" if bad else "") + f" [{out / 'summary.json'}]")
sys.exit(0 if summary["ok"] else 1)
EOF
