#!/usr/bin/env bash
# Distil an open_clip teacher into a small student on Flickr30K (Karpathy split) and compare them.
#
#   examples/flickr30k.sh dataset_flickr30k.json flickr30k-images runs/flickr30k
#
# Caches the teacher on the 29K train images, trains a student (validating on the 1,014 val images),
# exports it to an open_clip folder and evaluates teacher and student on the 1K test images
# (5 captions each). Environment (all optional): TEACHER, PRESET, STEPS, EVAL_EVERY, CACHE_ARGS,
# EXTRA_TRAIN_ARGS, EVAL_ARGS, PYTHON; see examples/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/karpathy_pipeline.sh"
karpathy_pipeline flickr30k 2000 "$@"
