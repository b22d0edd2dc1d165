"""What a new user sees without data or weights: cmd_check_setup and one-line errors for missing weights."""
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from experiments.ex_dcase24 import ex
from models.audio.passt import PasstEncoder, pretrained_weights_path

REPO = Path(__file__).resolve().parents[1]


def test_check_setup_reports_data_cache_and_weights(data_dir, capsys):
    folder = data_dir / "clotho_demo"
    missing = sorted((folder / "evaluation").iterdir())[0]
    missing.unlink()
    run = ex.run("cmd_check_setup", named_configs=["demo"], options={"--loglevel": "ERROR"},
                 config_updates={"directories": {"data_dir": str(data_dir)}})
    report = run.result
    assert report["train"] == "(development) 6 clips, 30 captions, 0 audio files missing; cache absent"
    assert report["test"].startswith("(evaluation) 4 clips, 20 captions, 1 audio files missing e.g. "
                                     f"'{missing.name}'")
    assert report["audio weights"] == "passt_small: random init, nothing to fetch"
    assert report["text weights"].endswith("roberta-tiny: available")
    assert report["observers"] == "none"
    assert "cache absent" in capsys.readouterr().out


def test_check_setup_names_missing_dataset_and_passt_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    run = ex.run("cmd_check_setup", options={"--loglevel": "ERROR"},
                 config_updates={"directories": {"data_dir": str(tmp_path)}})
    assert "captions CSV not found" in run.result["val"] and "make download-dataset" in run.result["val"]
    assert run.result["audio weights"] == f"passt: MISSING at {pretrained_weights_path('passt')}"
    assert str(pretrained_weights_path("passt")).startswith(str(tmp_path / "torch"))


def test_passt_weights_without_network_is_one_clear_error(monkeypatch, tmp_path):
    from hear21passt.models.helpers import vit_helpers

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(vit_helpers, "download_cached_file", offline)
    with pytest.raises(RuntimeError, match=r"PaSST weights 'passt_s_p16_s16_128_ap468' could not be downloaded .*"
                                           r"TORCH_HOME.*pretrained=False"):
        PasstEncoder("passt", pretrained=True)


def test_text_weights_offline_is_one_clear_error(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run([sys.executable, "-c", "from models.text.transformer import TextEncoder; "
                                "TextEncoder('roberta-large')"], env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: text model 'roberta-large' could not be loaded")
    assert "HF_HUB_OFFLINE=1" in last_line
