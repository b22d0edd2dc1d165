"""pyflakes' checks over the whole tree (ruff, configured in pyproject.toml): an undefined name is a crash waiting
for the one path that reaches it, an unused import a dependency nothing needs."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_undefined_or_unused_names():
    checked = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
