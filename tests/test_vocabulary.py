"""Vocabulary adaptation (dapt.modeling.vocabulary, dapt.pipeline.vocabulary) on the real MiniLM
(bert-base-uncased WordPiece) tokenizer and a tiny random BertForMaskedLM.

The synthetic corpora fix every count, so each criterion's order is known exactly:
cardiomyopathy 4 pieces x 30, quarterbacks 2 x 40, hepatocytes 4 x 10, nephrotoxicity 6 x 8,
echocardiography 3 x 3 (below min_count), patients 1 piece x 50 (already a token); zq (too short)
and 938172 (no letter) are split but filtered, 10 each.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dapt.errors import ConfigError
from dapt.modeling.vocabulary import CandidateWord, extend_vocabulary, fertilities, fertility, mine_domain_words
from dapt.pipeline.vocabulary import MARKER, VocabularyConfig, VocabularyResult, prepare_vocabulary
from tests.helpers import minilm_tokenizer

DOMAIN_COUNTS = {"cardiomyopathy": 30, "quarterbacks": 40, "hepatocytes": 10, "nephrotoxicity": 8, "echocardiography": 3, "patients": 50}
NEW_WORDS = ["cardiomyopathy", "hepatocytes", "nephrotoxicity"]


def domain_docs() -> list[str]:
    """Ten documents holding exactly DOMAIN_COUNTS occurrences (mixed case: the tokenizer is uncased)."""
    words = [w.capitalize() if i % 3 == 0 else w for w, n in DOMAIN_COUNTS.items() for i in range(n)]
    return [" ".join(["In", *words[i::10], "the", "zq", "938172", "."]) for i in range(10)]


def general_docs() -> list[str]:
    return ["The quarterbacks and the patients were " + " ".join(["quarterbacks"] * 20) + "." for _ in range(10)]


def stream(docs: list[str]):
    """A one-pass generator: mining must work on streamed documents."""
    return (d for d in docs)


def fresh_tokenizer():
    """A private copy of the cached MiniLM tokenizer (tests mutate it)."""
    return copy.deepcopy(minilm_tokenizer())


def tiny_model(vocab_size: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=64, tie_word_embeddings=True)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # a random, non-zero decoder bias so the bias initialisation is observable
        model.cls.predictions.bias.normal_()
    return model


@pytest.fixture()
def pair():
    tok = fresh_tokenizer()
    return tiny_model(len(tok)), tok


# (1) mining ---------------------------------------------------------------------------------------

def test_mining_filters_and_orders_by_each_criterion():
    tok = fresh_tokenizer()

    def mine(criterion: str, **kw):
        args = {"min_pieces": 2, "top_n": 10, "min_count": 5, **kw}
        return mine_domain_words(stream(domain_docs()), tok, criterion=criterion, **args)

    freq = mine("frequency")
    assert [c.word for c in freq] == ["quarterbacks", "cardiomyopathy", "hepatocytes", "nephrotoxicity"]
    assert freq[1] == CandidateWord("cardiomyopathy", 30, 4, 30.0)  # counted case-insensitively
    # tokens saved, count x (pieces - 1): 90, then a 40/40 tie broken by the word, then 30
    saved = mine("pieces_x_frequency")
    assert [(c.word, c.score) for c in saved] == [("cardiomyopathy", 90.0), ("nephrotoxicity", 40.0), ("quarterbacks", 40.0), ("hepatocytes", 30.0)]
    assert [c.word for c in mine("frequency", min_pieces=4)] == ["cardiomyopathy", "hepatocytes", "nephrotoxicity"]
    assert [c.word for c in mine("frequency", min_count=20)] == ["quarterbacks", "cardiomyopathy"]
    assert [c.word for c in mine("frequency", min_count=3)][-1] == "echocardiography"
    assert [c.word for c in mine("frequency", top_n=2)] == ["quarterbacks", "cardiomyopathy"]
    # domain_ratio: quarterbacks is the most frequent domain word but common in general text too
    ratio = mine("domain_ratio", general_documents=stream(general_docs()))
    assert ratio[-1].word == "quarterbacks" and ratio[-1].score < 0 < ratio[0].score
    assert ratio[0].word == "cardiomyopathy"
    with pytest.raises(ConfigError, match="general"):
        mine("domain_ratio")
    with pytest.raises(ConfigError, match="criterion"):
        mine("bogus")


# (2) tokenization after extension -----------------------------------------------------------------

def test_added_words_are_one_token_in_any_case_and_only_as_whole_words(pair):
    model, tok = pair
    before = {w: tok.tokenize(w) for w in ("noncardiomyopathy", "cardiomyopathys", "hepatocytes2")}
    added = extend_vocabulary(model, tok, ["Cardiomyopathy", "hepatocytes", "cardiomyopathy"])
    assert added == ["cardiomyopathy", "hepatocytes"]  # normalized, duplicate added once
    assert tok.tokenize("CARDIOMYOPATHY in Hepatocytes, cardiomyopathy.") == ["cardiomyopathy", "in", "hepatocytes", ",", "cardiomyopathy", "."]
    ids = tok("Cardiomyopathy", add_special_tokens=False)["input_ids"]
    assert ids == [len(tok) - 2]
    for word, pieces in before.items():  # never matched inside a longer word
        assert tok.tokenize(word) == pieces
    with pytest.raises(ConfigError, match="already a single token"):
        extend_vocabulary(model, tok, ["patients"])
    with pytest.raises(ConfigError, match="already a single token"):
        extend_vocabulary(model, tok, ["cardiomyopathy"])
    with pytest.raises(ConfigError, match="empty"):
        extend_vocabulary(model, tok, [" "])


# (3) + (4) initialisation ------------------------------------------------------------------------

def test_new_rows_are_sub_token_means_and_old_rows_are_untouched(pair):
    model, tok = pair
    pieces = {w: tok(w, add_special_tokens=False)["input_ids"] for w in NEW_WORDS}
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_bias = model.cls.predictions.bias.detach().clone()
    n_old = old_emb.shape[0]
    extend_vocabulary(model, tok, NEW_WORDS)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    assert emb.shape[0] == len(tok) == n_old + 3 == model.config.vocab_size
    assert out.weight is emb  # BERT's decoder stays tied after resizing
    assert model.cls.predictions.bias is out.bias and out.bias.shape[0] == len(tok)
    for word in NEW_WORDS:
        new_id = tok.convert_tokens_to_ids(word)
        assert new_id >= n_old
        torch.testing.assert_close(emb[new_id], old_emb[pieces[word]].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(out.weight[new_id], old_emb[pieces[word]].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(out.bias[new_id], old_bias[pieces[word]].mean(), rtol=0, atol=1e-7)
    assert torch.equal(emb[:n_old], old_emb)
    assert torch.equal(out.bias[:n_old], old_bias)


def test_untied_output_embedding_gets_its_own_sub_token_mean():
    tok = fresh_tokenizer()
    model = tiny_model(len(tok))
    decoder = model.get_output_embeddings()
    decoder.weight = torch.nn.Parameter(decoder.weight.detach().clone() * 3 + 1)  # untie
    model.config.tie_word_embeddings = False
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    pieces = tok("nephrotoxicity", add_special_tokens=False)["input_ids"]
    old_out = model.get_output_embeddings().weight.detach().clone()
    extend_vocabulary(model, tok, ["nephrotoxicity"])
    new_id = tok.convert_tokens_to_ids("nephrotoxicity")
    out = model.get_output_embeddings().weight
    assert out is not model.get_input_embeddings().weight
    torch.testing.assert_close(out[new_id], old_out[pieces].mean(0), rtol=0, atol=1e-6)
    assert torch.equal(out[: old_out.shape[0]], old_out)


# (5) save and reload ------------------------------------------------------------------------------

def test_save_and_reload_keeps_tokenization_and_logits(pair, tmp_path: Path):
    from dapt.modeling.loading import load_mlm_model, load_tokenizer

    model, tok = pair
    extend_vocabulary(model, tok, NEW_WORDS)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = load_tokenizer(str(tmp_path))
    model2 = load_mlm_model(str(tmp_path), attn_implementation="eager").model.eval()
    model.config._attn_implementation = "eager"
    text = "Severe Cardiomyopathy damages hepatocytes; noncardiomyopathy does not."
    enc, enc2 = tok(text, return_tensors="pt"), tok2(text, return_tensors="pt")
    assert tok2.tokenize(text) == tok.tokenize(text) and "cardiomyopathy" in tok2.tokenize(text)
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    with torch.no_grad():
        logits, logits2 = model(**enc).logits, model2(**enc2).logits
    assert logits.shape[-1] == len(tok)
    torch.testing.assert_close(logits, logits2, rtol=0, atol=1e-5)


# (6) fertility ------------------------------------------------------------------------------------

def test_fertility_falls_on_domain_text_after_extension(pair):
    model, tok = pair
    before = fertility(stream(domain_docs()), tok)
    extend_vocabulary(model, tok, NEW_WORDS)
    after = fertility(stream(domain_docs()), tok)
    assert after["words"] == before["words"] > 0
    saved = 30 * 3 + 10 * 3 + 8 * 5  # occurrences x (pieces - 1) of the three added words
    assert before["pieces"] - after["pieces"] == saved
    assert after["pieces_per_word"] < before["pieces_per_word"]


def test_fertilities_read_the_text_once_for_several_tokenizers(pair):
    model, tok = pair
    alone = fertility(stream(domain_docs()), tok)
    extended = copy.deepcopy(tok)
    extend_vocabulary(copy.deepcopy(model), extended, NEW_WORDS)
    reads = []

    def counted():
        reads.append(1)
        yield from stream(domain_docs())

    both = fertilities(counted(), [tok, extended])
    assert len(reads) == 1 and both[0] == alone and both[1] == fertility(stream(domain_docs()), extended)
    assert both[0]["pieces"] - both[1]["pieces"] == 30 * 3 + 10 * 3 + 8 * 5


# (7) the cached pipeline step ---------------------------------------------------------------------

def test_prepare_vocabulary_caches_and_never_mutates_the_callers_pair(tmp_path: Path):
    tok = fresh_tokenizer()
    model = tiny_model(len(tok))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = VocabularyConfig(name="extend", top_n=3, min_count=5, max_documents=8)
    reads = {"domain": 0, "general": 0}

    def read(name: str, docs: list[str]):
        reads[name] += 1
        return stream(docs)

    kwargs = dict(model=model, tokenizer=tok, start_fingerprint={"weights": "tiny"}, domain_documents=lambda: read("domain", domain_docs()),
                  general_documents=lambda: read("general", general_docs()), domain_description={"corpus": "synthetic"}, cache_dir=str(tmp_path))
    first = prepare_vocabulary(cfg, **kwargs)
    assert isinstance(first, VocabularyResult) and not first.cached and first.added == 3
    assert reads == {"domain": 2, "general": 1}  # mining, then one fertility pass for both tokenizers
    assert first.examples == ["cardiomyopathy", "nephrotoxicity", "quarterbacks"]
    assert Path(first.path) == tmp_path / "vocabulary" / first.cache_key and (Path(first.path) / MARKER).exists()
    assert first.fertility["domain"]["after"] < first.fertility["domain"]["before"]
    assert first.tokenizer.tokenize("Cardiomyopathy") == ["cardiomyopathy"]
    # the caller's model and tokenizer are untouched
    assert len(tok) == len(minilm_tokenizer()) and tok.tokenize("cardiomyopathy") == ["card", "##iom", "##yo", "##pathy"]
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    second = prepare_vocabulary(cfg, **kwargs)
    assert second.cached and second.path == first.path and second.cache_key == first.cache_key
    assert second.as_results() == {**first.as_results(), "cached": True}
    assert second.tokenizer.tokenize("Cardiomyopathy quarterbacks") == ["cardiomyopathy", "quarterbacks"]
    assert torch.equal(second.model.get_input_embeddings().weight, first.model.get_input_embeddings().weight)

    other = prepare_vocabulary(VocabularyConfig(name="extend", top_n=2, min_count=5, max_documents=8), **kwargs)
    assert other.cache_key != first.cache_key and not other.cached and other.added == 2
    with pytest.raises(ConfigError, match="lower vocabulary.min_count"):
        prepare_vocabulary(VocabularyConfig(name="extend", min_count=1000), **kwargs)


# (8) config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [("name", "grow"), ("top_n", 0), ("min_pieces", 1), ("min_count", 0),
                                            ("criterion", "tfidf"), ("max_documents", 0)])
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"vocabulary.{key}=") as err:
        VocabularyConfig(**{key: value})
    assert "\n" not in str(err.value)
    VocabularyConfig(name="extend", max_documents=None)  # the valid extremes pass


# --- the run: the extended pair is used by DAPT, its control and every held-out set ----------------------

def test_vocabulary_extend_run_trains_and_saves_the_extended_pair(compose, one_thread, tmp_path):
    from dapt.modeling.loading import load_tokenizer as load_saved_tokenizer
    from dapt.pipeline.run import train
    from tests.conftest import TINY_OVERRIDES

    common = [*TINY_OVERRIDES, f"paths.cache_dir={tmp_path / 'cache'}"]
    _, plain = train(compose(common))
    _, extended = train(compose([*common, "vocabulary=extend", "vocabulary.max_documents=300", "vocabulary.min_count=5",
                                 "vocabulary.top_n=40"]))
    block = extended["results"]["vocabulary"]
    assert block["added"] == 40 and not block["cached"]
    assert block["fertility"]["domain"]["after"] < block["fertility"]["domain"]["before"]
    saved = load_saved_tokenizer(extended["results"]["model_dir"])
    word = block["examples"][0]
    assert len(saved.tokenize(word)) == 1 and len(saved) == len(minilm_tokenizer()) + 40
    # the held-out sets were tokenized with the extended tokenizer: other blocks, other masked tokens,
    # and the control arm is a different one (its start model is the extended base)
    assert extended["results"]["control"]["cache_key"] != plain["results"]["control"]["cache_key"]
    assert extended["datamodule"].tokenizer is extended["tokenizer"] and len(extended["tokenizer"]) == len(saved)
    assert extended["datamodule"].heldout_fingerprint()["tokenizer"] != plain["datamodule"].heldout_fingerprint()["tokenizer"]
