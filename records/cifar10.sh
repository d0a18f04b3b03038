#!/usr/bin/env bash
# The CIFAR-10 comparison under README "Results", with the settings of every run kept in records/:
# DiT-S/2 in pixel space at 32x32, batch 256, 3000 steps, FID of 2500 EMA samples every 1000 steps.
#
#   bash records/cifar10.sh TRAIN_ZIP INCEPTION_WEIGHTS OUT SCHEDULE SEED METHOD [METHOD ...]
#   e.g. bash records/cifar10.sh cifar10-train-jpeg.zip fid_inception_v3_nofc.pth runs cosine 0 vanilla dtr
#
# The statistics of the training images are taken once, into OUT/ref.npz. METHOD trains into
# OUT/SCHEDULE-seedSEED/METHOD. After a stop, the same command resumes each run where it stopped
# (--resume auto); a finished run starts, finds its last step done and ends.
set -euo pipefail
if [ $# -lt 6 ]; then
    sed -n "5,6s/^#   //p" "$0" >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
zip=$1 inception=$2 out=$3 schedule=$4 seed=$5
shift 5
mkdir -p "$out"
if [ ! -e "$out/ref.npz" ]; then
    python "$repo/fid.py" "$zip" --save-stats "$out/ref.npz" --inception "$inception" --batch-size 500
fi
for method in "$@"; do
    pacing=()
    if [[ $method == *curriculum* ]]; then
        # The paper's plateau rule is meant for 400K-step runs: in 3000 steps it would still be on the easiest
        # stages at the end. Fixed stages of 60 steps start the last of the 20 stages at step 1140.
        pacing=(--curriculum-pacing fixed --curriculum-stage-steps 60)
    fi
    python "$repo/train.py" --data "$zip" --image-size 32 --model DiT-S/2 --method "$method" --schedule "$schedule" \
        --global-batch-size 256 --lr 1e-4 --ema-decay 0.999 --max-steps 3000 --global-seed "$seed" --compile \
        --fid-every 1000 --fid-samples 2500 --fid-steps ddim50 --fid-cfg 1.0 --fid-ref "$out/ref.npz" \
        --inception "$inception" --sample-every 3000 --ckpt-every 500 --keep-last 1 --log-every 100 \
        --data-on-device --num-workers 4 --resume auto --out "$out/$schedule-seed$seed/$method" ${pacing[@]+"${pacing[@]}"}  # bash < 4.4 calls an empty "${pacing[@]}" unbound under set -u
done
