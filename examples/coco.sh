#!/usr/bin/env bash
# Distil an open_clip teacher into a small student on MS-COCO and compare them.
#
#   examples/coco.sh dataset_coco.json coco-images runs/coco                    # Karpathy split (2014 images)
#   examples/coco.sh annotations/captions_train2017.json coco-images runs/coco  # COCO-2017
#
# Karpathy: IMAGES_ROOT holds train2014/ and val2014/ (the folders named by each image's "filepath").
# Caches the teacher on the 113K train+restval images, trains a student (validating on the 5K val
# images), exports it to an open_clip folder and evaluates teacher and student on the 5K test images
# with the first 5 captions of each (25,000; the standard protocol; EVAL_ARGS replaces this default).
# COCO-2017: pass captions_train2017.json (captions_val2017.json must sit beside it); IMAGES_ROOT
# holds train2017/ and val2017/. examples/coco2017_to_karpathy.py writes OUT_DIR/dataset_coco2017.json:
# test = val2017 (5K), val = the last COCO2017_VAL_IMAGES (default 1000) train2017 images, train = the rest.
# Environment (all optional): TEACHER, PRESET, STEPS, EVAL_EVERY, CACHE_ARGS, EXTRA_TRAIN_ARGS,
# EVAL_ARGS, COCO2017_VAL_IMAGES, PYTHON; see examples/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/karpathy_pipeline.sh"
subfolders=(train2014 val2014)
if [[ $# -eq 3 && "$(basename "$1")" == captions_train*.json ]]; then
    val_json="$(dirname "$1")/$(basename "$1" | sed 's/captions_train/captions_val/')"
    [[ -f "$1" ]] || die "COCO captions JSON not found: $1"
    [[ -f "$val_json" ]] || die "COCO-2017: $val_json not found beside $1 (the test split)"
    subfolders=(train2017 val2017)
fi
if [[ $# -ge 2 && -d "$2" ]]; then
    for sub in "${subfolders[@]}"; do
        [[ -d "$2/$sub" ]] || die "$2 has no $sub/ folder; IMAGES_ROOT must hold the COCO ${subfolders[0]}/ and ${subfolders[1]}/ folders"
    done
fi
if [[ "${subfolders[0]}" == train2017 ]]; then
    [[ -d "$2" ]] || die "image folder not found: $2"
    converted="$3/dataset_coco2017.json"
    "${PYTHON:-python}" "$EXAMPLES_DIR/coco2017_to_karpathy.py" "$1" "$val_json" "$converted" \
        --val-images "${COCO2017_VAL_IMAGES:-1000}" || exit 2
    set -- "$converted" "$2" "$3"
fi
EVAL_ARGS="${EVAL_ARGS---max-captions 5}" karpathy_pipeline coco 5000 "$@"
