"""How far Top-1 moves when a grid moves by an amount no calibration method is accurate to: ADFQ without
reconstruction with the step size of one kind of activation quantizer scaled by 1 ± ``--epsilon`` (a random sign per
quantizer, per draw), scored on the ~35,000 training-part images no calibration seed 0-9 draws (as
``tensor_swap.py``). ``tensor_swap.py`` found ADFQ's and Percentile's fc2-input grids within half a percent of each
other, yet swapping one for the other moved Top-1 by a tenth of a point: this measures that sensitivity directly.

    python bench/grid_jitter.py --model deit_cifar --bits 6 --role fc2_input --seeds 0 1 --draws 3

Resumable: a (seed, draw) already in the results file is not run again. A draw is one pass over the images (about
three minutes on one core for DeiT).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys

from harness import REPO, logits_on, quantized_copy, reference_model_and_images, save_results
from image_bootstrap import CALIBRATION_SEEDS, NUM_CALIB, pack, unpack, unseen_training_images
from tensor_swap import METHOD, quantizers_by_kind

from adfq_lightning.io import atomic_write


def jittered_steps(model, names: list, epsilon: float, draw: int) -> None:
    """Scale the step sizes of the quantizers at ``names`` by 1 ± ``epsilon``, one random sign per quantizer (the
    signs depend on ``draw`` alone, so a draw jitters every seed's model the same way)."""
    import torch

    signs = torch.randint(0, 2, (len(names),), generator=torch.Generator().manual_seed(draw)) * 2 - 1
    with torch.no_grad():
        for name, sign in zip(names, signs.tolist()):
            for step in model.get_submodule(name).step_sizes():
                step.mul_(1 + sign * epsilon)


def run_seed(record: dict, path, seed: int, draws: int, scored: dict) -> None:
    """Add ``seed``'s unperturbed run and its missing draws to ``record``, saving it to ``path`` after each."""
    float_model, images, _, _ = reference_model_and_images(record["model"], NUM_CALIB, 0, seed)
    if not scored:
        scored["images"], scored["labels"] = unseen_training_images(float_model)
    x, y = scored["images"], scored["labels"]
    runs = record["runs"].setdefault(str(seed), {})
    model = quantized_copy(float_model, METHOD, record["bits"], seed, images)
    kinds = quantizers_by_kind(model)
    if record["role"] not in set(kinds) - {"weights"}:
        raise SystemExit(f"--role {record['role']}: {record['model']} has no such activation quantizers; pass one of "
                         f"{sorted(set(kinds) - {'weights'})}.")
    names = kinds[record["role"]]
    if "unperturbed" not in runs:
        runs["unperturbed"] = pack(logits_on(model, x).argmax(1) == y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for draw in range(draws):
        if str(draw) not in runs:
            jittered_steps(model, names, record["epsilon"], draw)
            runs[str(draw)] = pack(logits_on(model, x).argmax(1) == y)
            model.load_state_dict(state)
            save_results(path, record)
            print(f"seed {seed} draw {draw} done", flush=True)


def report(record: dict) -> list[str]:
    changes, lines = [], []
    for seed, runs in sorted(record["runs"].items(), key=lambda kv: int(kv[0])):
        base = unpack(runs["unperturbed"]).double()
        for draw, hits in sorted(((k, v) for k, v in runs.items() if k != "unperturbed"), key=lambda kv: int(kv[0])):
            jittered = unpack(hits).double()
            change = float((jittered - base).mean()) * 100
            changes.append(change)
            lines.append(f"| {seed} | {draw} | {base.mean() * 100:.2f} | {jittered.mean() * 100:.2f} | {change:+.2f} | "
                         f"{int((jittered > base).sum())} | {int((base > jittered).sum())} |")
    eps, n = record["epsilon"], len(changes)
    spread = statistics.stdev(changes) if n > 1 else float("nan")
    return [f"# Top-1 against a {eps * 100:g} % jitter of the {record['role']} step sizes: {record['model']} "
            f"W{record['bits']}A{record['bits']}, ADFQ without reconstruction", "", "Produced by:", ""] + [
            f"- `{c}`" for c in record["commands"]] + [
            "", f"Top-1 % on the {len(base)} training-part images that no calibration seed 0-9 draws. Each draw scales "
            f"every {record['role']} step size by 1 ± {eps:g} (a random sign per quantizer).", "",
            "| seed | draw | Top-1 | jittered | change | right only jittered | right only unperturbed |",
            "|---:|---:|---:|---:|---:|---:|---:|"] + lines + [
            "", f"- {n} draws: mean change {statistics.mean(changes):+.2f}, standard deviation {spread:.2f}, "
            f"largest {max(changes, key=abs):+.2f} Top-1."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_cifar")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--role", default="fc2_input")
    p.add_argument("--epsilon", type=float, default=0.003)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--report-only", action="store_true", help="render the draws already run, run nothing")
    args = p.parse_args(argv)
    if not set(args.seeds) <= set(CALIBRATION_SEEDS):
        seeds = f"{CALIBRATION_SEEDS.start}-{CALIBRATION_SEEDS.stop - 1}"
        p.error(f"the scored images are those no seed in {seeds} calibrates on: pass seeds from that range.")
    out = REPO / "bench" / "results" / f"grid_jitter_{args.model}_w{args.bits}_{args.role}"
    path = out.with_suffix(".json")
    record = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "commands": []}
    fixed = {"model": args.model, "bits": args.bits, "role": args.role, "epsilon": args.epsilon}
    for key, value in fixed.items():
        if record.setdefault(key, value) != value:
            raise SystemExit(f"{path} holds draws with {key}={record[key]}: pass that, or move "
                             "the file away to start over.")
    if not args.report_only:
        command = shlex.join(["python", "bench/grid_jitter.py", *(argv if argv is not None else sys.argv[1:])])
        if command not in record["commands"]:
            record["commands"].append(command)
        scored: dict = {}
        for seed in args.seeds:
            run_seed(record, path, seed, args.draws, scored)
    if not record["runs"]:
        raise SystemExit(f"{path} holds no draws: run without --report-only first.")
    lines = report(record)
    atomic_write(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
