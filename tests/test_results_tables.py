"""README's and docs/results.md's tables are what bench/results holds: one generator renders them, and this
check fails when a table was edited by hand or the results changed without re-rendering."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_result_tables_match_the_results_files():
    done = subprocess.run([sys.executable, "-m", "bench", "report", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_table_edited_by_hand_is_caught(tmp_path):
    """The check is real: a README whose table differs from the results is reported."""
    shutil.copytree(ROOT / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    readme = (ROOT / "README.md").read_text()
    assert "77.13 ± 0.07" in readme
    (tmp_path / "README.md").write_text(readme.replace("77.13 ± 0.07", "79.13 ± 0.07", 1))
    done = subprocess.run([sys.executable, "-m", "bench", "report", "--check"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "README.md" in done.stdout + done.stderr
