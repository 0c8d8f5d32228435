# The second command run on the lent GPU machine (same machine kind, 2026-11-26): the quick runs of the stress
# group for DeiT (16 CPUs) and Swin (the H100), within the device time left (183 s). Merged into
# ../benchmark.json with
#   python bench/run_benchmark.py --merge bench/results/h100/stress_cpu.json bench/results/h100/stress_gpu.json
exec > $OUT/device2.log 2>&1; set -x; T0=$(date +%s)
pip install --no-deps -q .whl/timm-*.whl
mkdir -p ../shared/data/cifar10 && cp .data/train.tar.gz ../shared/data/cifar10/
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
python3 -c "from adfq_lightning.data import decode_image_folder as d, DEFAULT_ARCHIVE as a; d(a)"
mkdir -p /tmp/cpu /tmp/gpu; cd bench
python3 run_benchmark.py --groups stress --models deit_cifar --jobs 10 --time-budget $((183-$(date +%s)+T0)) --out /tmp/cpu > $OUT/cpu2.log 2>&1 & CPU=$!
python3 run_benchmark.py --groups stress --models swin_cifar --device cuda --jobs 5 --time-budget $((183-$(date +%s)+T0)) --out /tmp/gpu > $OUT/gpu2.log 2>&1
wait $CPU; cp /tmp/cpu/benchmark.json $OUT/cpu2.json; cp /tmp/gpu/benchmark.json $OUT/gpu2.json; date
