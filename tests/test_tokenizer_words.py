"""Pre-split words (NER) through a RoBERTa-style byte-level BPE tokenizer keep their word boundaries.

With ``is_split_into_words=True`` and no ``add_prefix_space`` a byte-level BPE tokenizer encodes every
word as if it started a text: ``patients`` -> ``p atients`` instead of ``Ġpatients``. transformers no
longer raises for this, so dapt must load such tokenizers with the prefix space itself.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from dapt.evaluation.encoding import encode_ner
from dapt.evaluation.readers import NerExample
from dapt.modeling.loading import load_tokenizer

OHSUMED = "biomed/corpus/ohsumed/train.jsonl"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _train_byte_level_bpe(data_dir: Path, docs: int = 300, vocab_size: int = 2000) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    with (data_dir / OHSUMED).open(encoding="utf-8") as handle:
        texts = [(d["title"] + "\n" + d["text"]) for d in map(json.loads, itertools.islice(handle, docs))]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # RoBERTa's own setting
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return tok


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    """The same trained tokenizer saved as RobertaTokenizerFast and as a generic fast tokenizer,
    each beside a config.json (what makes a directory a model source for dapt)."""
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaTokenizerFast

    tok = _train_byte_level_bpe(data_dir)
    kwargs = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                  cls_token="<s>", sep_token="</s>")
    out = {}
    for name, cls in (("roberta", RobertaTokenizerFast), ("generic", PreTrainedTokenizerFast)):
        path = tmp_path_factory.mktemp(f"bpe_{name}")
        cls(tokenizer_object=tok, **kwargs).save_pretrained(path)
        RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64).save_pretrained(path)
        out[name] = path
    return out


SENTENCE = "Patients with coronary heart disease were treated with aspirin and heparin .".split()


@pytest.mark.parametrize("kind", ["roberta", "generic"])
def test_split_words_keep_word_boundaries_with_byte_level_bpe(bpe_dirs, kind):
    tokenizer = load_tokenizer(str(bpe_dirs[kind]), split_words=True)
    split = tokenizer(SENTENCE, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    joined = tokenizer(" ".join(SENTENCE), add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(split) == tokenizer.convert_ids_to_tokens(joined)
    # Each word's first sub-token carries the space marker: it decodes with a leading space and the
    # word's sub-tokens are exactly those of " " + word in running text.
    enc = tokenizer(SENTENCE, is_split_into_words=True, add_special_tokens=False)
    word_ids = enc.word_ids()
    for w, word in enumerate(SENTENCE):
        ids = [i for i, wid in zip(enc["input_ids"], word_ids) if wid == w]
        assert tokenizer.decode(ids[:1]).startswith(" "), (word, tokenizer.convert_ids_to_tokens(ids))
        assert ids == tokenizer(" " + word, add_special_tokens=False)["input_ids"], word
    # Through dapt's NER encoding: 'patients' is one word-initial token, not 'p' + 'atients'.
    example = NerExample(tokens=["patients", "with", "disease"], tags=["O", "O", "B-Disease"])
    encoded = encode_ner([example], tokenizer, {"O": 0, "B-Disease": 1}, max_length=32)
    first = encoded.features[0]["input_ids"][encoded.features[0]["word_starts"][0]]
    assert tokenizer.convert_ids_to_tokens([first]) == tokenizer.convert_ids_to_tokens(
        tokenizer(" patients", add_special_tokens=False)["input_ids"][:1])


def test_prepare_loads_ner_tokenizer_with_prefix_space(bpe_dirs, data_dir):
    """The fine-tuning path (prepare) uses the word-split loading for NER tasks."""
    from dapt.evaluation.finetuning import DownstreamConfig, prepare
    from dapt.evaluation.tasks import load_task, resolve_task

    data = load_task(resolve_task("ncbi_disease"), data_dir)
    cfg = DownstreamConfig(seeds=[0], max_train_examples=4, max_eval_examples=4, max_seq_length=64)
    prepared = prepare(str(bpe_dirs["roberta"]), data, cfg)
    tok = prepared.tokenizer
    for feature in prepared.train.features:
        starts = [p for p in feature["word_starts"] if p >= 0]
        assert starts and all(tok.decode([feature["input_ids"][p]]).startswith(" ") for p in starts)


def test_plain_text_loading_is_unchanged(bpe_dirs, tokenizer):
    """Running-text loading (MLM training) keeps the checkpoint's own setting; WordPiece is untouched."""
    from dapt.modeling.loading import needs_prefix_space, words_encode_like_text

    plain = load_tokenizer(str(bpe_dirs["roberta"]))
    assert needs_prefix_space(plain)
    assert not needs_prefix_space(tokenizer) and words_encode_like_text(tokenizer)
