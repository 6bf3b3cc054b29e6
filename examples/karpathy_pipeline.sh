# Shared body of examples/flickr30k.sh and examples/coco.sh (sourced, not run directly).
#
# karpathy_pipeline NAME DEFAULT_STEPS DATASET_JSON IMAGES_ROOT OUT_DIR
#   cache the teacher on the train split -> train a student (validating on val) -> evaluate teacher
#   and student on the test split -> export the student to an open_clip folder -> compare.
# Environment: PYTHON, TEACHER, PRESET, STEPS, EVAL_EVERY, CACHE_ARGS, EXTRA_TRAIN_ARGS, EVAL_ARGS
# (see examples/README.md).

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$EXAMPLES_DIR")"

die() {
    echo "error: $*" >&2
    exit 2
}

# split_args VAR STRING: shell-style split of STRING (quotes respected) into the array VAR.
split_args() {
    local -n _out="$1"
    local lines
    lines="$("$PY" -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' "$2")" \
        || die "cannot parse arguments: $2"
    _out=()
    if [[ -n "$lines" ]]; then mapfile -t _out <<< "$lines"; fi
}

default_preset() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi
}

# preflight JSON ROOT: every train/val/test image exists; prints the split sizes.
preflight() {
    "$PY" - "$1" "$2" <<'EOF' || exit 2
import sys
from distill.core.data.factory import load_dataset
from distill.core.errors import BadSampleError

sizes = []
for split in ("train", "val", "test"):
    try:
        ds = load_dataset(sys.argv[1], split, sys.argv[2])
    except (BadSampleError, ValueError, KeyError, OSError) as e:
        sys.exit(f"error: {sys.argv[1]} (split {split}, images root {sys.argv[2]}): {e}")
    sizes.append(f"{split} {ds.num_images} images / {ds.num_captions} captions")
print("data: " + ", ".join(sizes))
EOF
}

karpathy_pipeline() {
    local name="$1" default_steps="$2"
    shift 2
    if [[ $# -ne 3 ]]; then
        echo "usage: $(basename "$0") DATASET_JSON IMAGES_ROOT OUT_DIR   (Karpathy dataset_$name.json)" >&2
        exit 2
    fi
    local data="$1" root="$2" out="$3"
    [[ -f "$data" ]] || die "Karpathy JSON not found: $data"
    [[ -d "$root" ]] || die "image folder not found: $root"

    PY="${PYTHON:-python}"
    command -v "$PY" >/dev/null 2>&1 || die "python interpreter not found: $PY (set PYTHON=...)"
    export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
    local teacher="${TEACHER:-openclip:ViT-B-32:laion2b_s34b_b79k}"
    local preset="${PRESET:-$(default_preset)}"
    local steps="${STEPS:-$default_steps}"
    local eval_every="${EVAL_EVERY:-500}"
    local -a cache_args train_args eval_args validation=()
    split_args cache_args "${CACHE_ARGS-"--dtype int8"}"
    split_args train_args "${EXTRA_TRAIN_ARGS:-}"
    split_args eval_args "${EVAL_ARGS:-}"
    if [[ "$eval_every" != 0 ]]; then
        validation=(--set "eval.data=$data" --set "eval.images_root=$root" --set eval.split=val
                    --set "eval.every=$eval_every")
    fi

    echo "== $name: teacher $teacher, preset $preset, $steps steps -> $out"
    preflight "$data" "$root"
    mkdir -p "$out/results"

    echo "== [1/5] caching the teacher on the train split -> $out/cache_train"
    "$PY" -m distill.cache_teacher --teacher "$teacher" --data "$data" --images-root "$root" --split train \
        --out "$out/cache_train" "${cache_args[@]}"

    echo "== [2/5] training the student -> $out/train"
    "$PY" -m distill.train_student --preset "$preset" --cache "$out/cache_train" --data "$data" \
        --images-root "$root" --split train --out "$out/train" --steps "$steps" --resume auto \
        "${validation[@]}" "${train_args[@]}"

    echo "== [3/5] exporting the student to open_clip -> $out/open_clip"
    "$PY" -m distill.export --checkpoint "$out/train/student" --out "$out/open_clip"

    echo "== [4/5] evaluating on the test split -> $out/results"
    local -a test_split=(--data "$data" --images-root "$root" --split test "${eval_args[@]}")
    "$PY" -m distill.evaluate --model "$teacher" "${test_split[@]}" --out "$out/results/teacher.json"
    "$PY" -m distill.evaluate --model "$out/train/student" "${test_split[@]}" --out "$out/results/student.json"
    "$PY" -m distill.evaluate --model "openclip:local-dir:$out/open_clip" "${test_split[@]}" \
        --out "$out/results/student_open_clip.json"

    echo "== [5/5] teacher vs student ($name test split)"
    "$PY" "$EXAMPLES_DIR/compare.py" "$out/results/teacher.json" "$out/results/student.json" \
        "$out/results/student_open_clip.json" | tee "$out/results/comparison.txt"
}
