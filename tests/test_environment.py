"""The pinned environment: uv.lock is what `make prepare` installs, and the conda file follows it."""
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def uv(*arguments: str, environment: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(environment or Path(sys.prefix))}
    return subprocess.run([sys.executable, "-m", "uv", *arguments, "--offline"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_this_environment_is_exactly_the_lock():
    checked = uv("sync", "--frozen", "--extra", "dev", "--check", "--python", sys.executable)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    locked = {package["name"]: package.get("version") for package in
              tomllib.loads((REPO / "uv.lock").read_text())["package"]}
    for name in ("torch", "torchaudio", "hear21passt", "lightning", "transformers", "sacred"):
        assert metadata.version(name).split("+")[0] == locked[name]
    assert locked["torch"] == "2.11.0" and locked["torchaudio"] == "2.11.0" and locked["torchvision"] == "0.26.0"


def test_the_check_notices_an_environment_that_drifted(tmp_path):
    drifted = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(drifted)], check=True)
    checked = uv("sync", "--frozen", "--extra", "dev", "--check", "--python", str(drifted / "bin" / "python"),
                 environment=drifted)
    assert checked.returncode != 0 and "torch" in checked.stdout + checked.stderr


def test_conda_requirements_are_exported_from_the_lock():
    exported = uv("export", "--frozen", "--extra", "dev", "--no-hashes", "--no-emit-project", "--no-header")
    assert exported.returncode == 0, exported.stderr
    assert (REPO / "requirements.lock.txt").read_text() == exported.stdout, "run `make lock`"
    environment = (REPO / "environment.yaml").read_text()
    assert "- -r requirements.lock.txt" in environment and "- -e ." in environment
