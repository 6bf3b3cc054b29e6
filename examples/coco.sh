#!/usr/bin/env bash
# Distil an open_clip teacher into a small student on MS-COCO (Karpathy split) and compare them.
#
#   examples/coco.sh dataset_coco.json coco-images runs/coco
#
# IMAGES_ROOT holds train2014/ and val2014/ (the folders named by each image's "filepath").
# Caches the teacher on the 113K train+restval images, trains a student (validating on the 5K val
# images), exports it to an open_clip folder and evaluates teacher and student on the 5K test images
# with the first 5 captions of each (25,000; the standard protocol; EVAL_ARGS replaces this default). Environment (all optional): TEACHER, PRESET,
# STEPS, EVAL_EVERY, CACHE_ARGS, EXTRA_TRAIN_ARGS, EVAL_ARGS, PYTHON; see examples/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/karpathy_pipeline.sh"
if [[ $# -ge 2 && -d "$2" ]]; then
    for sub in train2014 val2014; do
        [[ -d "$2/$sub" ]] || die "$2 has no $sub/ folder; IMAGES_ROOT must hold the COCO train2014/ and val2014/ folders"
    done
fi
EVAL_ARGS="${EVAL_ARGS---max-captions 5}" karpathy_pipeline coco 5000 "$@"
