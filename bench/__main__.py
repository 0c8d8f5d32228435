"""The benchmark: ``python -m bench accuracy|speed|export|report [options]`` (``--help`` on each).

* ``accuracy``: Top-1 of MinMax, Percentile and ADFQ on the reference CIFAR-10 models over calibration seeds;
* ``speed``: calibration time and memory of the eight paper models at 224 px (CPU or GPU);
* ``export``: file sizes, parity and inference time of every export format of the shipped W4A4 ViT;
* ``report``: the tables of ``bench/results/*.md``, ``docs/results.md`` and the README from the results files
  (``--check``: exit 1 if any of them differs from what the results files give).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the commands import each other as top-level modules

COMMANDS = {"accuracy": "accuracy", "speed": "speed", "export": "deploy", "report": "report"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = __import__(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
