# The command run on the lent GPU machine (one NVIDIA H100, 16 CPU cores, torch 2.11.0+cu130) on 2026-11-26,
# from the repository root, with .whl (the timm wheel) and .data (the CIFAR-10 archive) carried. Its outputs
# are the other files here; cpu.json and gpu.json were merged into ../benchmark.json with
#   python bench/run_benchmark.py --merge bench/results/h100/cpu.json bench/results/h100/gpu.json
exec > $OUT/device.log 2>&1; set -x; T0=$(date +%s)
pip install --no-deps -q .whl/timm-*.whl; python3 -c "import torch,timm;print(torch.__version__,timm.__version__)"; nproc
mkdir -p ../shared/data/cifar10 && cp .data/train.tar.gz ../shared/data/cifar10/
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
python3 -c "from adfq_lightning.data import decode_image_folder as d, DEFAULT_ARCHIVE as a; d(a)"
mkdir -p /tmp/cpu /tmp/gpu; cd bench
save() { cp /tmp/cpu/benchmark.json $OUT/cpu.json; cp /tmp/gpu/benchmark.json $OUT/gpu.json; cp /tmp/gpu/speed.json /tmp/gpu/speed.md $OUT/; }
(while sleep 20; do save; done) 2>/dev/null & LOOP=$!
python3 run_benchmark.py --groups budget ablation --budget-iters 100 --jobs 12 --time-budget $((530-$(date +%s)+T0)) --out /tmp/cpu > $OUT/cpu.log 2>&1 & CPU=$!
timeout 150 python3 speed.py --device cuda --models deit_small_patch16_224 vit_base_patch16_224 swin_tiny_patch4_window7_224 --num-calib 64 --batch-size 32 --iters 20 --out /tmp/gpu
python3 run_benchmark.py --groups budget --budget-iters 1000 --models deit_cifar swin_cifar --device cuda --jobs 3 --time-budget $((540-$(date +%s)+T0)) --out /tmp/gpu
wait $CPU; kill $LOOP; save; nvidia-smi; date
