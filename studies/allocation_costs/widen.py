"""Study, part 4: the widths the allocation gives the qkv/fc1 weights (which read the outlier channels) on the
reference models and their outlier variants at BitBudget(4, 4), from the measured costs."""
from pathlib import Path
import json, sys
sys.path.insert(0, '/work/main')
from adfq_lightning.allocation import choose_widths
def solve(layers, bits, widths=(3,4,6,8)):
    groups=[0 if u['kind']=='weights' else 1 for u in layers]
    totals=[sum(u['size'] for u,g in zip(layers,groups) if g==k) for k in (0,1)]
    ch=choose_widths([[u['kl'][str(b)] for b in widths] for u in layers],[[u['size']*b for b in widths] for u in layers],groups,[bits*t for t in totals])
    return [(u, widths[k]) for u,k in zip(layers,ch)]
reads = lambda u: u['name'].endswith(('qkv','fc1'))
for base in ('vit_cifar','deit_cifar','swin_cifar'):
    for m in (base, base+'_outliers'):
        L=json.load(open(Path(__file__).with_name(f'alloc_{m}.json'))['layers']
        for b in (4.0,):
            ch=solve(L,b)
            def avg(pred):
                sel=[(u,w) for u,w in ch if pred(u)]
                return sum(u['size']*w for u,w in sel)/sum(u['size'] for u,_ in sel)
            W = lambda u: u['kind']=='weights'
            print(f"{m:22s} budget {b}: qkv/fc1 weights {avg(lambda u: W(u) and reads(u)):.2f} bits, other weights {avg(lambda u: W(u) and not reads(u)):.2f};"
                  f" kl@3 qkv/fc1 w {sum(u['kl']['3'] for u in L if W(u) and reads(u)):.3f} other w {sum(u['kl']['3'] for u in L if W(u) and not reads(u)):.3f}")
