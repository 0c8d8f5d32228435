# The command run on a lent GPU machine on 2026-11-27 (an NVIDIA H200 with 16 CPU cores: the call asked for no
# kind and got this one), from the repository root with .whl (the timm wheel) carried: CUDA graphs checked against
# eager reconstruction (bench/cuda_graphs_check.py), their speed against eager launching, and DeiT-S calibrated at
# the paper's 1,024 images and batch 32 (3,000 iterations per module when the measured speed lets it finish in the
# device time left, else 1,000: it chose 1,000). Its outputs are the other files here (it ran as
# bench/results/h100/graphs_command.sh, which named them graphs_*).
exec > $OUT/device.log 2>&1; set -x; T0=$(date +%s)
pip install --no-deps -q .whl/timm-*.whl; python3 -c "import torch,timm;print(torch.__version__,timm.__version__)"
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE; mkdir -p /tmp/gpu; cd bench
save() { cp /tmp/gpu/speed.json $OUT/speed.json; cp /tmp/gpu/speed.md $OUT/speed.md; }
timeout 200 python3 cuda_graphs_check.py --out $OUT
Q="--device cuda --models deit_small_patch16_224 --num-calib 64 --batch-size 32 --iters 20 --out /tmp/gpu"
python3 speed.py $Q; python3 speed.py $Q --no-cuda-graphs; save
LEFT=$((${BUDGET:-545}-$(date +%s)+T0))
ITERS=$(python3 -c "
import json; from speed import projection
r = [r for r in json.load(open('/tmp/gpu/speed.json'))['runs'] if r['cuda_graphs']][0]
print(3000 if projection(r)['hours'] * 3600 < $LEFT - 20 else 1000)")
timeout $LEFT python3 speed.py --device cuda --models deit_small_patch16_224 --num-calib 1024 --batch-size 32 --iters $ITERS --out /tmp/gpu; save
nvidia-smi --query-gpu=name,memory.used --format=csv; date
