"""Cached numbers must not outlive the code that made them.

Each cache (general-MLM base, control arm) keys on a recipe version. These tests pin the fingerprint
of each recipe's code next to its version: editing the code without bumping the version fails here,
with the new fingerprint to pin once the version is bumped. (Bumping invalidates every cached entry,
which is the point: a cached base trained by old code would silently serve old numbers.)
"""

from __future__ import annotations

import pytest

# version -> fingerprint of the recipe's code at that version
BASE_RECIPE = {2: "0dbf0f5dd1aee9a4"}  # re-pinned for trainer.cpu_threads and MLMModule keeping one tuner instance (its history survived no evaluation) (default all: the thread count stays fixed instead of the CpuThreadTuner probing 1 and 2 threads; that changes the last bits of sums, as another machine or load did before, not the recipe; cached bases stay valid); before that for data.eval_max_doc_tokens truncating only the domain held-out sets (held-out sets only; a base's training reads no held-out set); before that for held-out sets recording a digest of their masked tokens (dapt.data.heldout: one more info field, the same tensors); before that for text sources split_by=wikitext removing the tokenized release's markup (dapt.data.wikitext; only the WikiText held-out sets read differently, a base never trains or evaluates on them); before that for text sources split_by=conll (issue 17: a new mode; the other modes read exactly as before, their unit emission moved into one shared helper) and a log line when a signal arrives with no step running; before that for the remedies (issue 14): MLMModule takes an optional penalty and layer-wise lr decay, param_groups an optional per-parameter lr scale, the scheduler an optional min_lr_ratio; with all of them off the groups, their order and the schedule are unchanged; before that, re-pinned for the one-way restructuring (issue 13): code moved between modules (data/config.py, data/stream.py, masking/selection.py, pipeline/base_prep.py), dead code removed, and the fingerprint now covers model loading, data quality, word starts and labels; base training unchanged
CONTROL_RECIPE = {2: "53a990fb0657d33e"}  # re-pinned for trainer.cpu_threads and one tuner instance per module (fixed thread count by default, out of the key like the machine; a control trains the same recipe, its last bits no longer depend on the load); before that for data.eval_max_doc_tokens truncating only the domain held-out sets, and the cached control's held-out numbers now keyed on the evaluation code too (a control trains as before; its held-out numbers are re-measured, not served); before that for held-out sets recording a digest of their masked tokens (one more info field; the sets, their masks and a control's training unchanged); before that for WikiText markup removal (dapt.data.wikitext, now fingerprinted): a control trains as before; its held-out numbers are cached per held-out fingerprint, which hashes dapt.data.wikitext, so they are re-measured, not served; before that for text sources split_by=conll (issue 17: a new mode only; unit emission shared) and a log line on a signal; before that for the remedies (issue 14; the control never gets one: same code path as before); 2: held-out evaluation under bf16 projects to the vocabulary in fp32; re-pinned for the one-way restructuring (issue 13), which moved code without changing it and widened the fingerprint (data quality, labels, sample_stats, selection)


@pytest.mark.parametrize(
    ("name", "pinned", "module", "version_attr"),
    [
        ("base", BASE_RECIPE, "dapt.pipeline.base_prep", "BASE_PREP_VERSION"),
        ("control", CONTROL_RECIPE, "dapt.pipeline.control", "CONTROL_VERSION"),
    ],
)
def test_recipe_code_changes_bump_the_cache_version(name, pinned, module, version_attr):
    import importlib

    mod = importlib.import_module(module)
    version = getattr(mod, version_attr)
    current = mod.recipe_fingerprint()
    assert version in pinned, f"{module}.{version_attr}={version} is not pinned: add {{{version}: {current!r}}} to this test"
    assert pinned[version] == current, (
        f"the {name} recipe's code changed (fingerprint {current!r}, pinned {pinned[version]!r} for version {version}): "
        f"if cached {name}s made by the old code are no longer valid, bump {module}.{version_attr} and pin "
        f"{{{version + 1}: {current!r}}}; if the change cannot alter results, pin the new fingerprint for {version}"
    )


def test_fingerprint_changes_with_the_code():
    from dapt.versioning import source_fingerprint

    def recipe_a(x):
        return x + 1

    def recipe_b(x):
        return x + 2

    assert source_fingerprint(recipe_a) != source_fingerprint(recipe_b)
