"""Downstream metrics, computed by the libraries the field uses so numbers match papers.

NER: seqeval in strict mode with the IOB2 scheme, i.e. an entity counts only when its type and both
boundaries match exactly, and an ill-formed prediction (``I-X`` after ``O``) does not open an entity.
Micro-averaged precision / recall / F1 over entities, plus F1 per entity type. Classification:
torchmetrics accuracy, micro-F1 and macro-F1 (macro skips classes absent from both gold and
predictions, e.g. ChemProt's test lacks one train label).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch


def ner_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Strict entity-level micro P/R/F1 and per-type scores (``per_type[type] = {f1, precision, recall, support}``)."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tag sequences must have the same shapes")
    gold_l = [list(g) for g in gold]
    pred_l = [list(p) for p in pred]
    kwargs: dict[str, Any] = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    with warnings.catch_warnings():  # no entity anywhere: seqeval averages an empty array (harmless)
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(gold_l, pred_l, output_dict=True, **kwargs)
    per_type = {
        name: {
            "f1": float(row["f1-score"]),
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "support": int(row["support"]),
        }
        for name, row in report.items()
        if not name.endswith(" avg")
    }
    return {
        "f1": float(f1_score(gold_l, pred_l, average="micro", **kwargs)),
        "precision": float(precision_score(gold_l, pred_l, average="micro", **kwargs)),
        "recall": float(recall_score(gold_l, pred_l, average="micro", **kwargs)),
        "per_type": per_type,
    }


def classification_scores(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, micro-F1, macro-F1 and per-label F1 over label ids ``0..len(labels)-1``."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    target = torch.as_tensor(list(gold), dtype=torch.long)
    preds = torch.as_tensor(list(pred), dtype=torch.long)
    n = len(labels)
    per_label = multiclass_f1_score(preds, target, num_classes=n, average="none")
    present = torch.bincount(target, minlength=n)
    return {
        "accuracy": float(multiclass_accuracy(preds, target, num_classes=n, average="micro")),
        "micro_f1": float(multiclass_f1_score(preds, target, num_classes=n, average="micro")),
        "macro_f1": float(multiclass_f1_score(preds, target, num_classes=n, average="macro")),
        "per_label": {
            label: {"f1": float(per_label[i]), "support": int(present[i])} for i, label in enumerate(labels)
        },
    }
