#!/usr/bin/env bash
# Train the three reference models side by side on one GPU (each is far too small to fill it).
#   recipes/train_all_on_one_gpu.sh [TIME_BUDGET_S] [LOG_DIR]
# Each run fixes its epoch count after its first epoch to what fits in TIME_BUDGET_S (default 330 s);
# logs go to LOG_DIR (default recipes/results). Archive: $ADFQ_ARCHIVE or the default CIFAR-10 tarball.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-330}
logs=${2:-recipes/results}
mkdir -p "$logs"
archive=(); [[ -n "${ADFQ_ARCHIVE:-}" ]] && archive=(--archive "$ADFQ_ARCHIVE")
# decode the JPEG archive into the tensor cache once, before three processes race for it
python -c "import sys; from adfq_lightning.data import decode_image_folder, DEFAULT_ARCHIVE; \
decode_image_folder(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_ARCHIVE)" "${archive[@]:1}"
for model in vit_cifar deit_cifar swin_cifar; do
  OMP_WAIT_POLICY=PASSIVE python recipes/train_reference.py --model "$model" --epochs 300 \
    --time-budget "$budget" --num-workers 4 --threads 1 "${archive[@]}" "${@:3}" >"$logs/$model.log" 2>&1 &
done
wait
