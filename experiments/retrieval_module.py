"""Lightning wrapper: training and evaluation loops around RetrievalModel, no maths of its own."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import lightning as L
import torch

from experiments.tracking import TRAIN_LOSS
from models.distributed_loss import global_contrastive_loss
from models.losses import distillation_loss, multi_positive_contrastive_loss
from models.retrieval_model import RetrievalModel
from models.teacher import Teacher
from utils.distributed import gather_evaluation
from utils.devices import SideStreamCopy, to_device
from utils.metrics import AUDIO_TO_TEXT, MultiMatch, audio_to_text_metrics, retrieval_metrics
from utils.schedule import learning_rate_factor
from utils.step_graph import RecordedStep

AUDIO_INPUTS = ("audio", "audio_length", "clip_index")  # a recorded step's inputs besides the caption tokens


def recorded_step_inputs(model: RetrievalModel, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """What a recorded training step reads of a batch, all of it tensors on `device`: the captions tokenised here,
    on the host, since the graph only reads tensors it owns, refilled every step."""
    tokens = model.text_encoder.tokenize(batch["caption"])
    return {**{key: batch[key] for key in AUDIO_INPUTS},
            **{key: to_device(value, device) for key, value in tokens.items()}}


def recorded_step_loss(model: RetrievalModel, inputs: dict[str, torch.Tensor],
                       positive_weighting: str = "pair") -> torch.Tensor:
    """The training step's contrastive loss from `recorded_step_inputs`: device work only."""
    windows, mask = model.encode_audio(inputs["audio"], inputs["audio_length"])
    text = model.encode_tokens({key: value for key, value in inputs.items() if key not in AUDIO_INPUTS})
    return multi_positive_contrastive_loss(model.score(text, windows, mask), inputs["clip_index"], positive_weighting)


@dataclass(frozen=True)
class OptimisationSettings:
    """Peak learning rate per parameter group, plus what the groups share."""
    lr_audio_encoder: float
    lr_audio_project: float
    lr_sentence_encoder: float
    lr_sentence_project: float
    lr_tap: float
    min_lr: float
    weight_decay: float
    warmup_length: float
    rampdown_start: float
    rampdown_stop: float
    rampdown_type: str


def adamw_implementation(on_gpu: bool, clips_gradients: bool) -> dict[str, bool]:
    """Fused AdamW on GPUs: one kernel for all parameters instead of a loop of per-tensor ones, the same update. Not
    where gradients are clipped: Lightning refuses to clip for an optimiser that unscales inside its step, as fused
    ones do (under mixed precision it raises at the first step), so there the multi-tensor one. On CPUs, torch's."""
    if not on_gpu:
        return {}
    return {"foreach": True} if clips_gradients else {"fused": True}


class RetrievalModule(L.LightningModule):
    """`teachers` (stage 2): stage-1 models whose estimated correspondences the training loss also fits, weighted
    `distill_weight` against `loss_weight` for the contrastive loss (salsa's keys). `multi_match`: additional
    correspondences of the test split, scored as mAP@16 and mAP@10 next to the usual metrics. `cuda_graph_step`:
    each training step's forward and backward pass replayed as one recorded CUDA graph (`RecordedStep`), the
    optimiser and the schedule stepped by this module (Lightning's manual optimisation); stage 1 on one process,
    fixed shapes, no clipping or accumulation (the config checks say so). `overlap_batch_copy`: batches copied onto a
    GPU on a side stream (`SideStreamCopy`), overlapping the step before; on a CPU there is nothing to copy."""

    def __init__(self, model: RetrievalModel, optimisation: OptimisationSettings, positive_weighting: str = "pair",
                 teachers: Sequence[Teacher] = (), loss_weight: float = 1.0, distill_weight: float = 0.0,
                 multi_match: MultiMatch | None = None, cuda_graph_step: bool = False,
                 overlap_batch_copy: bool = False):
        super().__init__()
        self.automatic_optimization = not cuda_graph_step
        self.recorded_step = None
        if cuda_graph_step:
            self.recorded_step = RecordedStep(partial(recorded_step_loss, model, positive_weighting=positive_weighting))
        self.model = model
        self.optimisation = optimisation
        self.positive_weighting = positive_weighting
        self.teachers, self.loss_weight, self.distill_weight = list(teachers), loss_weight, distill_weight
        self.multi_match = multi_match  # the test split's DCASE 2025 annotations: test also logs <prefix>_multi/*
        self.test_prefix = "test"  # the metrics' prefix of the next test run (e.g. test_best for a second one)
        self._evaluation: list[dict[str, torch.Tensor]] = []
        self._evaluation_shape = (0, 0)  # the most clips and captions an evaluation batch has held
        self._side_stream_copy = SideStreamCopy() if overlap_batch_copy else None

    def parameter_groups(self) -> list[dict]:
        """One AdamW group per component, each with its own peak learning rate; frozen parts left out."""
        settings = self.optimisation
        components = [
            ("audio_encoder", self.model.audio_encoder, settings.lr_audio_encoder),
            ("audio_project", [self.model.audio_projection, self.model.tau], settings.lr_audio_project),
            ("sentence_encoder", self.model.text_encoder, settings.lr_sentence_encoder),
            ("sentence_project", self.model.text_projection, settings.lr_sentence_project),
            ("tap", self.model.pooling, settings.lr_tap),
        ]
        groups = []
        for name, parts, lr in components:
            parts = parts if isinstance(parts, list) else [parts]
            parameters = [p for part in parts
                          for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())
                          if p.requires_grad]
            if parameters:
                groups.append({"name": name, "params": parameters, "lr": lr})
        return groups

    def configure_optimizers(self):
        settings = self.optimisation
        groups = self.parameter_groups()
        on_gpu = all(parameter.is_cuda for group in groups for parameter in group["params"])
        optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay,
                                      **adamw_implementation(on_gpu, bool(self.trainer.gradient_clip_val)))
        steps_per_epoch = max(1.0, self.trainer.estimated_stepping_batches / self.trainer.max_epochs)
        factors = [partial(learning_rate_factor, steps_per_epoch=steps_per_epoch, peak_lr=group["lr"],
                           min_lr=min(settings.min_lr, group["lr"]), warmup_length=settings.warmup_length,
                           rampdown_start=settings.rampdown_start, rampdown_stop=settings.rampdown_stop,
                           rampdown_type=settings.rampdown_type) for group in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_batch_transfer(self, batch: dict, dataloader_index: int) -> dict:
        # Counted while the lengths are on the host: the encoder then picks the real windows without a read-back.
        batch["real_windows"] = self.model.audio_encoder.real_window_count(batch["audio"].shape[1],
                                                                            batch["audio_length"])
        return batch

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        if self._side_stream_copy is not None:
            return self._side_stream_copy(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        if self.recorded_step is not None:
            return self._replayed_training_step(batch)
        windows, mask = self.model.encode_audio(batch["audio"], batch["audio_length"], batch["real_windows"])
        text = self.model.encode_text(batch["caption"])
        distributed = self.trainer.world_size > 1
        if distributed:  # negatives from every rank; the mean of the logged values over ranks is the global loss
            loss = global_contrastive_loss(self.model, text, windows, mask, batch["clip_index"],
                                           self.positive_weighting)
        else:
            scores = self.model.score(text, windows, mask)
            loss = multi_positive_contrastive_loss(scores, batch["clip_index"], self.positive_weighting)
        self._log_training(loss, len(batch["caption"]), distributed)
        loss = self.loss_weight * loss
        if self.teachers:  # stage 2 trains on one device (the config check says so)
            estimates = torch.stack([teacher.similarities(batch["caption"], batch["clip_index"])
                                     for teacher in self.teachers]).to(scores.dtype)
            distillation = distillation_loss(scores, estimates, self.model.temperature())
            self.log("train/distill_loss", distillation, batch_size=len(batch["caption"]))
            loss = loss + self.distill_weight * distillation
        return loss

    def _replayed_training_step(self, batch: dict) -> torch.Tensor:
        loss = self.recorded_step(recorded_step_inputs(self.model, batch, self.device), self.optimizers())
        self.lr_schedulers().step()
        loss = loss.clone()  # the next replay overwrites the recorded loss; Lightning reads the logged one later
        self._log_training(loss, len(batch["caption"]))
        return loss

    def _log_training(self, loss: torch.Tensor, captions: int, distributed: bool = False) -> None:
        # Not prog_bar=True: Lightning would read it back after every step (TrainingProgressBar shows it).
        self.log(TRAIN_LOSS, loss, batch_size=captions, sync_dist=distributed)
        self.log("train/tau", self.model.tau.detach(), batch_size=captions)

    def _evaluation_step(self, batch: dict) -> None:
        captions = [caption for captions in batch["captions"] for caption in captions]
        self._evaluation_shape = (max(self._evaluation_shape[0], len(batch["clip_index"])),
                                  max(self._evaluation_shape[1], len(captions)))
        # Compiled encoders see every batch at the largest shape: a split's last, smaller batch would compile
        # both of them again, and record new CUDA graphs, in the run's first evaluation.
        clips_to, captions_to = self._evaluation_shape if self.model.compiled else (None, None)
        windows, mask = self.model.encode_audio(batch["audio"], batch["audio_length"], batch["real_windows"],
                                                pad_to=clips_to)
        first_row = sum(len(step["clip_index"]) for step in self._evaluation)
        self._evaluation.append({"windows": windows.float(), "mask": mask, "clip_index": batch["clip_index"],
                                 "text": self.model.encode_text(captions, pad_to=captions_to).float(),
                                 "caption_row": batch["caption_clip"] + first_row})

    def _evaluation_end(self, prefix: str) -> dict[str, float]:
        """Ranks every caption of the split against every clip of the split (gathered from every rank, each once)."""
        collected = {key: torch.cat([step[key] for step in self._evaluation]) for key in self._evaluation[0]}
        self._evaluation.clear()
        distributed = self.trainer.world_size > 1
        if distributed:
            collected = gather_evaluation(collected)
        scores = self.model.pooling.rank_split(collected["text"], collected["windows"], collected["mask"],
                                               collected["caption_row"])
        metrics = retrieval_metrics(scores, collected["caption_row"])
        metrics.update({f"{AUDIO_TO_TEXT}{name}": value
                        for name, value in audio_to_text_metrics(scores, collected["caption_row"]).items()})
        for name, value in metrics.items():  # every rank holds the same value; syncing keeps Lightning's books
            self.log(f"{prefix}/{name}", value, prog_bar=name == "mAP@10", sync_dist=distributed)
        if self.multi_match is not None and prefix.startswith("test"):
            for name, value in self.multi_match.metrics(scores).items():
                self.log(f"{prefix}_multi/{name}", value, sync_dist=distributed)
        return metrics

    def validation_step(self, batch: dict, batch_index: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def test_step(self, batch: dict, batch_index: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end(self.test_prefix)
