# The command run on a lent GPU machine (an NVIDIA H200 with 16 CPU cores, torch 2.11; timm 1.0.29 there, the
# carried 1.0.31 wheel did not replace it), from the repository root, with .whl and .data (the CIFAR-10 archive)
# carried (issue 10 §4): ADFQ without reconstruction under four variants and the two baselines under two, at
# W6A6-W8A8 on DeiT, eight seeds at a time on the GPU, resuming from the runs_*.jsonl in this folder.
# First call as written (device.log); second `BUDGET=150 SEEDS="$(seq 8 23)" VARIANTS='default={}'
# BASELINE_VARIANTS='default={}' bash bench/results/calibration_variants/command.sh` (device2.log).
# report.md is rendered from the runs by
#   python bench/calibration_variants.py --report-only
exec > $OUT/device${LOG:-}.log 2>&1; set -x; T0=$(date +%s)
pip install --no-deps -q .whl/timm-*.whl; python3 -c "import torch,timm;print(torch.__version__,timm.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv; nproc
mkdir -p ../shared/data/cifar10 && cp .data/train.tar.gz ../shared/data/cifar10/
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
python3 -c "from adfq_lightning.data import decode_image_folder as d, DEFAULT_ARCHIVE as a; d(a)"
RUNS=bench/results/calibration_variants
save() { tar czf $OUT/runs.tgz -C $RUNS . 2>/dev/null; }
(while sleep 20; do save; done) & LOOP=$!
python3 bench/calibration_variants.py --models deit_cifar --bits 6 7 8 --seeds ${SEEDS:-$(seq 0 23)} --device cuda \
    --jobs 8 --variants ${VARIANTS:-'default={}' 'init1024={"init_samples":1024}' 'weight_reference={"weight_grid":"reference"}' 'qkv_mse={"qkv_error_p":2.0}'} \
    --baseline-variants ${BASELINE_VARIANTS:-'default={}' 'init1024={"init_samples":1024}'} \
    --time-budget $((${BUDGET:-470}-$(date +%s)+T0)) --out $RUNS --resamples 200
kill $LOOP; save; nvidia-smi --query-gpu=name,memory.used --format=csv; date
