"""Evaluation: held-out perplexity and downstream fine-tuning of base, control and adapted models.

Downstream pieces, one job each:
``tasks`` (conf/task schema, loading splits, label set from train), ``readers`` (CoNLL / JSONL /
TSV / hub), ``encoding`` (first-sub-token labels, padding), ``metrics`` (seqeval, torchmetrics),
``modules`` (Lightning fine-tuning modules), ``finetuning`` (one model x task x seed, hyperparameters),
``stats`` (mean/std, paired t-test with CI, MDE and Holm), ``cache`` (base and control scores on disk), ``report`` (the table) and
``downstream`` (``evaluate_downstream``, the entry ``dapt train`` and ``dapt finetune`` use).
"""
