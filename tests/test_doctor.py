"""``dapt doctor`` profiles corpora and flags the problems that make DAPT fail."""

from __future__ import annotations

from dapt.diagnostics.corpus import domain_terms, fragmentation, profile, vocabulary_overlap


def test_profile_flags_duplicates_noise_and_fragmentation(tokenizer):
    docs = ["the cardiomyopathy patient had hyperlipidemia " * 5] * 3 + ["football is a game played " * 6, "\ufffd\ufffd ### 123 456"]
    p = profile(docs, tokenizer)
    assert p.documents == 5 and abs(p.duplicate_documents - 2 / 5) < 1e-9
    assert p.replacement_chars == 2 and p.short_documents == 1 / 5
    assert p.tokens > p.words > 0
    general = profile(["football is a game played by the team " * 5], tokenizer)
    terms = domain_terms(p, general)
    assert "cardiomyopathy" in terms and "football" not in terms
    assert fragmentation(["cardiomyopathy", "hyperlipidemia"], tokenizer) > fragmentation(["the", "game"], tokenizer) == 1.0
    assert 0 < vocabulary_overlap(p, general) < 1


def test_doctor_cli_on_the_real_biomedical_corpus(capsys, data_dir):
    from dapt.cli import main

    assert main(["doctor", "--max-documents", "200", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["domain"]["documents"] == 200 and report["general"]["documents"] == 200
    assert report["domain_term_fragmentation"] > report["general_word_fragmentation"]
    assert 0 < report["vocabulary_overlap_top10k"] < 1
