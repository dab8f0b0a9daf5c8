"""The training loop both backends run: data order, rates, decays, logging, checkpoints and resume.

A backend trainer supplies the framework work (see :class:`BackendTrainer`); everything that decides
*what* a step sees lives here, so the Flax and PyTorch runs consume identical batches. In a data-parallel
run every process runs this loop over the same global batches; only the main process writes files
(checkpoints, ``loss.csv``, sample grids, the pipeline folder), and the others wait for it at the end.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Protocol

from diffusion_core.configuration import make_temp_dir_beside, remove_stale_temporaries
from diffusion_core.pipelines.unconditional import ClassInfo, write_class_info
from diffusion_core.training import checkpoint as ckpt
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.data import ImageDataset, StepBatch, num_class_embeds, step_batch, unconditional_label
from diffusion_core.training.plots import write_loss_curve
from diffusion_core.training.samples import check_sample_every, write_sample_grid
from diffusion_core.training.schedules import ema_decay, learning_rate

LOSS_FILE = "loss.csv"


class BackendTrainer(Protocol):
    config: TrainConfig
    noise_scheduler: Any
    unet: Any  # the trained network (its ``config`` is the diffusers config)
    is_main_process: bool  # the process that writes files (always, for one process)

    def wait_for_everyone(self) -> None: ...

    def train_step(self, batch: StepBatch, lr: float, decay: float) -> float: ...

    def write_state(self, folder: Path) -> None: ...

    def read_state(self, folder: Path) -> None: ...

    def export_pipeline(self, folder: Path) -> None: ...

    def sample_images(self, num_images: int, class_labels: Any, num_inference_steps: int, seed: int) -> Any: ...


def _check_fit_args(steps: int, checkpoint_every: int | None) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")


def _check_class_dropout(trainer: BackendTrainer, dataset: ImageDataset) -> None:
    """Class dropout needs class labels and one extra class embedding: the "no class" label."""
    if trainer.config.class_dropout <= 0:
        return
    if dataset.labels is None:
        raise ValueError("class_dropout: the data has no classes (one sub-folder per class); set it to 0")
    expected = num_class_embeds(dataset, trainer.config.class_dropout)
    got = trainer.unet.config.get("num_class_embeds")
    if got != expected:
        raise ValueError(
            f"class_dropout: the UNet needs num_class_embeds={expected} ({len(dataset.class_names)} classes + the "
            f"'no class' label {unconditional_label(dataset)}), got {got}"
        )


def _resume(trainer: BackendTrainer, output_dir: Path) -> int:
    """Restore the newest checkpoint; the step it holds (0 when there is none)."""
    latest = ckpt.latest_checkpoint(output_dir)
    if latest is None:
        return 0
    state = ckpt.read_state(latest)
    if TrainConfig.from_dict(state["config"]).to_dict() != trainer.config.to_dict():  # (fields added since: defaults)
        raise ValueError(f"resume: {latest} was written with a different training config")
    trainer.read_state(latest)
    return int(state["step"])


def _loss_log(output_dir: Path, start: int) -> Any:
    """``loss.csv`` opened for appending, with rows past ``start`` (written after the last checkpoint) dropped."""
    path = output_dir / LOSS_FILE
    rows = []
    if path.exists() and start > 0:
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0] != "step" and int(r[0]) <= start]
    f = path.open("w", newline="")
    writer = csv.writer(f)
    writer.writerow(["step", "loss", "lr"])
    writer.writerows(rows)
    return f, writer


def _state(trainer: BackendTrainer, step: int, dataset: ImageDataset) -> dict[str, Any]:
    batch = trainer.config.batch_size
    return {
        "config": trainer.config.to_dict(),
        "seed": trainer.config.seed,
        "examples_seen": step * batch,
        "epoch": step * batch // len(dataset.images),
        "class_names": list(dataset.class_names),
    }


def fit(
    trainer: BackendTrainer,
    dataset: ImageDataset,
    steps: int,
    output_dir: str | os.PathLike,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    sample_every: int | None = None,
) -> list[float]:
    """Train to ``steps`` optimisation steps; write checkpoints and, at the end, the pipeline folder.

    With ``resume`` the newest checkpoint under ``output_dir`` is restored first and the run continues
    exactly as if it had never stopped. ``sample_every`` writes ``samples/step-<step>.png`` (a grid from
    the EMA weights) every that many steps. Returns the losses of the steps run by this call.
    """
    from tqdm.auto import tqdm

    _check_fit_args(steps, checkpoint_every)
    check_sample_every(sample_every)
    _check_class_dropout(trainer, dataset)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = _resume(trainer, out) if resume else 0
    cfg, num_t = trainer.config, int(trainer.noise_scheduler.config["num_train_timesteps"])
    main = trainer.is_main_process
    log_file, log = _loss_log(out, start) if main else (None, None)
    losses: list[float] = []
    bar = tqdm(total=steps, initial=start, disable=not (progress and main), desc="train", unit="step")
    try:
        for step in range(start, steps):
            # the global batch, every process
            batch = step_batch(dataset, step, cfg.batch_size, cfg.seed, num_t, cfg.class_dropout)
            lr = learning_rate(step, cfg.learning_rate, cfg.lr_schedule, cfg.lr_warmup_steps, steps)
            decay = ema_decay(step + 1, cfg.ema) if cfg.ema is not None else 0.0
            loss = trainer.train_step(batch, lr, decay)
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if main:
                log.writerow([step + 1, f"{loss:.6g}", f"{lr:.6g}"])
                _write_step(trainer, dataset, out, step + 1, steps, (checkpoint_every, sample_every), log_file)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if main:
        export_pipeline(trainer, out, dataset)
        write_loss_curve(out, log=progress)
    trainer.wait_for_everyone()  # every process returns once the files are there
    return losses


def _write_step(
    trainer: BackendTrainer, dataset: ImageDataset, out: Path, done: int, steps: int, every: tuple, log_file: Any
) -> None:
    """The main process's files after step ``done``: a checkpoint and a sample grid when they are due."""
    checkpoint_every, sample_every = every
    if (checkpoint_every and done % checkpoint_every == 0) or done == steps:
        log_file.flush()
        ckpt.write_checkpoint(out, done, _state(trainer, done, dataset), trainer.write_state)
    if sample_every and done % sample_every == 0:
        write_sample_grid(trainer, dataset, out, done, trainer.config.seed)


def export_pipeline(trainer: BackendTrainer, output_dir: Path, dataset: ImageDataset | None = None) -> None:
    """Write the pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) into ``output_dir``; with
    class-labelled ``dataset``, also ``classes.json`` (class names and the "no class" label of class dropout)."""
    stage = Path(output_dir) / "pipeline"  # never created: only its temporary sibling is
    remove_stale_temporaries(stage)
    staged = make_temp_dir_beside(stage)
    trainer.export_pipeline(staged / "pipeline")
    if dataset is not None and dataset.labels is not None:
        null = unconditional_label(dataset) if trainer.config.class_dropout > 0 else None
        write_class_info(staged / "pipeline", ClassInfo(dataset.class_names, null))
    ckpt.install_pipeline_folder(staged / "pipeline", output_dir)
    staged.rmdir()


class FitMixin:
    """``trainer.fit(dataset, steps=..., output_dir=...)`` for the backends' trainers: the one training loop.

    One process by default; a data-parallel trainer overrides ``is_main_process`` and ``wait_for_everyone``."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        """Wait until every process of the run gets here (nothing to wait for in one process)."""

    def fit(
        self,
        dataset: ImageDataset,
        steps: int,
        output_dir: str | os.PathLike,
        checkpoint_every: int | None = None,
        resume: bool = False,
        progress: bool = True,
        sample_every: int | None = None,
    ) -> list[float]:
        """Train (see :func:`fit`); returns this call's per-step losses."""
        return fit(self, dataset, steps, output_dir, checkpoint_every, resume, progress, sample_every)
