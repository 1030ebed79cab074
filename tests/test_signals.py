"""StopOnSignal on a plain Lightning fit with gradient accumulation (in-process, seconds).

A stop must land on an optimizer-step boundary whenever the signal arrives: inside an accumulation
group, before the first batch (while Lightning sets up the data), or during a validation that falls
inside a group; a validation inside fit is finished, not cut short. The checkpoint written on the
stop holds exactly the completed steps. (The subprocess tests in test_resume.py / test_ddp.py check
the whole ``dapt train`` path with accumulation 1.)
"""

from __future__ import annotations

import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from dapt.pipeline.stop_signal import StopOnSignal

ACCUMULATE = 4


class Tiny(pl.LightningModule):
    def __init__(self, when: str | None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.when = when
        self.validation_batches = 0

    def _kill(self, when: str) -> None:
        if self.when == when:
            self.when = None
            os.kill(os.getpid(), signal.SIGTERM)

    def train_dataloader(self) -> DataLoader:
        self._kill("train_dataloader")  # Lightning builds the loader after its handler would be installed
        return DataLoader(TensorDataset(torch.randn(256, 4)), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=2)

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            self._kill("mid_group")  # the second batch of the first accumulation group
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self._kill("validation")  # val_check_interval=6 batches: inside the second group
        self.validation_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.done = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.done += 1


@pytest.mark.parametrize("when,steps", [("mid_group", 1), ("train_dataloader", 1), ("validation", 2)])
def test_a_stop_lands_on_an_optimizer_step_boundary(tmp_path, when, steps):
    module = Tiny(when)
    counter = CountBatches()
    ckpt = tmp_path / "last.ckpt"
    stopper = StopOnSignal(ckpt).install()
    trainer = pl.Trainer(max_steps=10, accumulate_grad_batches=ACCUMULATE, val_check_interval=6, num_sanity_val_steps=0,
                         callbacks=[stopper, counter], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
    try:
        with pytest.raises(SIGTERMException):
            trainer.fit(module)
    finally:
        stopper.uninstall()
    assert stopper.signum == signal.SIGTERM
    assert trainer.global_step == steps and counter.done == steps * ACCUMULATE, (trainer.global_step, counter.done)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == steps
    if when == "validation":
        assert module.validation_batches == 3, "the validation inside fit was cut short"


def test_periodic_checkpoints_overwrite_a_last_ckpt_written_by_an_earlier_stop(tmp_path):
    """A resumed attempt whose folder holds the stop's last.ckpt keeps writing last.ckpt (the file
    resume reads), not last-v1.ckpt beside it (Lightning's version counter)."""
    from dapt.pipeline.resume import CheckpointConfig, checkpoint_callback

    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 0}, tmp_path / "checkpoints" / "last.ckpt")
    trainer = pl.Trainer(max_steps=3, callbacks=[checkpoint_callback(CheckpointConfig(every_n_steps=1), tmp_path)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu",
                         limit_val_batches=0)
    trainer.fit(Tiny(None))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
