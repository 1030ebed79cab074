"""The label value a loss skips.

``-100`` is the default ``ignore_index`` of ``torch.nn.functional.cross_entropy`` and the convention of
transformers' heads: MLM labels carry it at unmasked positions, token-classification labels at
padding and at every sub-token but a word's first. One definition for the maskers, the MLM loss and
the fine-tuning encoders.
"""

IGNORE_INDEX = -100
