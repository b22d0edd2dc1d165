"""Stage 2 (salsa): stored stage-1 embeddings, the distillation loss, and the stage-1 -> embeddings -> stage-2 recipe."""
import ast
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_loaders.audio_cache import decode_audio
from data_loaders.clotho_v2 import read_captions
from data_loaders.stored_embeddings import embedding_files
from experiments.ex_dcase24 import ex
from models.losses import distillation_loss
from tests.conftest import RESULT_KEYS
from tests.test_experiment import run_demo
from tests.test_speed_options import HostTensors
from utils.checkpoints import resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]


def direct_distillation(scores, teachers, temperature):
    """The loss written out element by element, from salsa's description."""
    captions, clips = scores.shape
    target = [[sum(teacher[i][j] for teacher in teachers) / len(teachers) / temperature for j in range(clips)]
              for i in range(captions)]

    def cross_entropy(logits, targets):  # rows of logits against softmax(rows of targets), averaged over rows
        total = 0.0
        for logit_row, target_row in zip(logits, targets):
            target_norm = sum(math.exp(t) for t in target_row)
            logit_norm = math.log(sum(math.exp(v) for v in logit_row))
            total -= sum(math.exp(t) / target_norm * (v - logit_norm) for t, v in zip(target_row, logit_row))
        return total / len(logits)

    transpose = lambda rows: [list(column) for column in zip(*rows)]  # noqa: E731
    logits = scores.tolist()
    return 0.5 * (cross_entropy(logits, target) + cross_entropy(transpose(logits), transpose(target)))


def test_distillation_loss_equals_a_direct_computation_with_an_ensemble_and_repeated_clips():
    torch.manual_seed(0)
    clip_ids = torch.tensor([0, 1, 1, 2])  # clip 1 drawn twice: its two columns carry the same teacher estimates
    scores = torch.randn(4, 4) * 3
    teachers = torch.rand(3, 4, 4) * 2 - 1
    teachers = teachers[:, :, clip_ids]  # columns follow the clips
    expected = direct_distillation(scores, teachers.tolist(), 0.05)
    assert distillation_loss(scores, teachers, 0.05).item() == pytest.approx(expected, rel=1e-5)
    single = direct_distillation(scores, teachers[:1].tolist(), 0.05)
    assert distillation_loss(scores, teachers[:1], 0.05).item() == pytest.approx(single, rel=1e-5)
    assert single != pytest.approx(expected, rel=1e-3)  # the ensemble's mean, not its first member
    with pytest.raises(ValueError, match=r"teacher similarities \(3, 4, 3\) must be \(teachers, 4, 4\)"):
        distillation_loss(scores, teachers[:, :, :3], 0.05)


def test_a_run_is_found_by_checkpoint_folder_or_name(tmp_path):
    runs = tmp_path / "runs"
    checkpoints = runs / "20261126-run-7" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "best-epoch=03.ckpt").write_bytes(b"x")
    (checkpoints / "last.ckpt").write_bytes(b"x")
    assert resolve_checkpoint("20261126-run-7", "best", runs) == checkpoints / "best-epoch=03.ckpt"
    assert resolve_checkpoint(str(runs / "20261126-run-7"), "last", runs) == checkpoints / "last.ckpt"
    assert resolve_checkpoint(str(checkpoints / "last.ckpt"), "best", runs) == checkpoints / "last.ckpt"
    (checkpoints / "best-epoch=03.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="holds no best-.*ckpt checkpoint.*load_last='best'"):
        resolve_checkpoint("20261126-run-7", "best", runs)


@pytest.fixture(scope="module")
def stage1_template(tmp_path_factory, tiny_dataset_template):
    """A one-epoch stage-1 run of the demo on the tiny data set, with its embeddings generated (made once)."""
    data_dir = tmp_path_factory.mktemp("stage1")
    shutil.copytree(tiny_dataset_template, data_dir / "clotho_demo")
    name = Path(run_demo(data_dir).info["run_folder"]).name
    generated = run_demo(data_dir, "cmd_generate_embeddings", load_parameters=name).result
    return data_dir, name, generated


@pytest.fixture
def stage1_run(stage1_template, tmp_path):
    """A copy of the template per test (copy2 keeps modification times, so the embeddings stay current)."""
    template, name, generated = stage1_template
    data_dir = tmp_path / "data"
    shutil.copytree(template, data_dir)
    return data_dir, name, {key: value.replace(str(template), str(data_dir)) if isinstance(value, str) else value
                            for key, value in generated.items()}


def test_embeddings_are_keyed_by_clip_path_and_caption_and_cover_the_training_set(stage1_run):
    data_dir, name, generated = stage1_run
    checkpoints = data_dir / "runs" / name / "checkpoints"
    audio_file, caption_file = embedding_files(checkpoints, "clothov2")
    assert (generated["audio_file"], generated["caption_file"]) == (str(audio_file), str(caption_file))
    clips = read_captions(data_dir / "clotho_demo" / "clotho_captions_development.csv")
    audio, text = torch.load(audio_file, weights_only=False), torch.load(caption_file, weights_only=False)
    assert sorted(audio["windows"]) == sorted(f"development/{clip.file_name}" for clip in clips)
    assert set(text["captions"]) == {caption for clip in clips for caption in clip.captions}
    assert audio["checkpoint"] == text["checkpoint"] == next(checkpoints.glob("best-*.ckpt")).name  # load_last=best
    windows, mask = audio["windows"][f"development/{clips[0].file_name}"], audio["masks"][f"development/{clips[0].file_name}"]
    assert windows.shape == (mask.shape[0], 128) and mask.dtype == torch.bool and mask[0]
    assert generated["clips"] == len(clips) and generated["captions"] == len(text["captions"])
    assert not list(checkpoints.glob("*.partial*"))


def test_teacher_scores_are_the_stage1_models_own_scores_with_tap(data_dir):
    from experiments.ex_dcase24 import build_model, build_teachers
    from utils.checkpoints import load_model_weights

    name = Path(run_demo(data_dir, audio_features__aggregate="TAP").info["run_folder"]).name
    run_demo(data_dir, "cmd_generate_embeddings", load_parameters=name, audio_features__aggregate="TAP")

    @ex.command(unobserved=True)
    def teacher_and_model():
        model = build_model()
        load_model_weights(model, resolve_checkpoint(name, "best", data_dir / "runs"))
        return build_teachers()[0], model.eval()

    teacher, model = run_demo(data_dir, "teacher_and_model", audio_features__aggregate="TAP", distill_from=name,
                         distill_weight=1.0, loss_weight=0.0).result
    clips = read_captions(data_dir / "clotho_demo" / "clotho_captions_development.csv")
    captions = [clips[2].captions[0], clips[0].captions[3], clips[5].captions[1]]
    clip_index = torch.tensor([2, 0, 5])
    folder = data_dir / "clotho_demo" / "development"
    decoded = [torch.from_numpy(decode_audio(folder / clips[index].file_name, 32000)) for index in clip_index.tolist()]
    padded = torch.zeros(3, 30 * 32000)
    for row, samples in enumerate(decoded):
        padded[row, :len(samples)] = samples[:30 * 32000]
    lengths = torch.tensor([min(len(samples), 30 * 32000) for samples in decoded])
    with torch.no_grad():
        windows, mask = model.encode_audio(padded, lengths)
        direct = model.pooling.score(model.encode_text(captions), windows, mask)
    torch.testing.assert_close(teacher.similarities(captions, clip_index), direct, atol=1e-5, rtol=1e-4)
    with HostTensors() as host:  # on `meta` (shapes, no values), a read-back would raise
        teacher.similarities(captions, clip_index.to("meta"))
    assert host.operations == ["aten.lift_fresh.default"]  # the caption rows, copied over; the clips' are on the device


@pytest.mark.parametrize("damage, message", [
    ("delete", "clothov2_audio_embeddings_train.pt not found; make them with `cmd_generate_embeddings with "
               "load_parameters={name}`"),
    ("retrain", "was made from .*best-epoch=00.ckpt, which has changed or gone since"),
    ("other data", "was made on the data set 'clotho_demo', this run trains on 'clotho_other'"),
    ("drop clip", "clothov2_audio_embeddings_train.pt: 1 clips of the current training set missing"),
    ("drop caption", "clothov2_sentence_embeddings_train.pt: 1 captions of the current training set missing"),
    ("truncate", "clothov2_sentence_embeddings_train.pt cannot be read"),
])
def test_missing_or_stale_embeddings_stop_stage2_before_training(stage1_run, damage, message):
    data_dir, name, _ = stage1_run
    checkpoints = data_dir / "runs" / name / "checkpoints"
    audio_file, caption_file = embedding_files(checkpoints, "clothov2")
    updates = {}
    if damage == "delete":
        audio_file.unlink()
    elif damage == "retrain":
        best = next(checkpoints.glob("best-*.ckpt"))
        os.utime(best, ns=(best.stat().st_atime_ns, best.stat().st_mtime_ns + 10**9))
    elif damage == "other data":
        shutil.copytree(data_dir / "clotho_demo", data_dir / "clotho_other")  # same clips, another data set
        updates["clotho_v2__folder_name"] = "clotho_other"
    elif damage in ("drop clip", "drop caption"):
        path, field = (audio_file, "windows") if damage == "drop clip" else (caption_file, "captions")
        content = torch.load(path, weights_only=False)
        content[field].pop(sorted(content[field])[0])
        torch.save(content, path)
    elif damage == "truncate":
        caption_file.write_bytes(caption_file.read_bytes()[:100])
    runs_before = sorted((data_dir / "runs").iterdir())
    with pytest.raises((FileNotFoundError, ValueError), match=f"distill_from='{name}': .*" + message.format(name=name)):
        run_demo(data_dir, load_parameters=name, loss_weight=0.0, distill_weight=1.0, distill_from=name, **updates)
    assert sorted((data_dir / "runs").iterdir()) == runs_before  # stopped before any run folder


def test_stage1_embeddings_stage2_through_the_command_line_with_salsas_keys(stage1_run):
    data_dir, name, _ = stage1_run
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.ex_dcase24", "with", "demo", f"directories.data_dir={data_dir}",
         "max_epochs=1", "data_loader.n_workers=0", "log_every_n_steps=1", f"load_parameters={name}", "load_last=best",
         "loss_weight=0.0", "distill_weight=1.0", f"distill_from={name};{name}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = ast.literal_eval([line for line in completed.stderr.splitlines() if "Result: {" in line][-1]
                              .split("Result: ", 1)[1])
    assert set(result) == RESULT_KEYS
    stage2 = max((data_dir / "runs").iterdir(), key=lambda folder: folder.stat().st_mtime)
    assert stage2.name != name
    metrics = next(stage2.glob("logs/*/metrics.csv")).read_text()
    assert "train/distill_loss" in metrics
