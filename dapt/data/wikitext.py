"""Plain text from the tokenized WikiText release (the general held-out set of every run).

WikiText's tokenized files are markup, not English: rare words are replaced by ``<unk>`` (15,218
times in the WikiText-2 test split, about 6% of its words), number separators and in-word hyphens are
written `` @,@ `` / `` @.@ `` / `` @-@ ``, headings are `` = = Title = = ``, and punctuation is spaced
off. A WordPiece tokenizer cuts ``<unk>`` into four pieces (``<``, ``un``, ``##k``, ``>``) and
`` @-@ `` into three, so scored as it is, about a fifth of a "general English" perplexity's targets
are markup that a model learns to predict from any text with angle brackets (TAPT on ChemProt, whose
entities are marked ``<< >>``, lowered it by 40% against the control). ``plain_text`` undoes the
markup: ``<unk>`` is removed (the word behind it is unknown, no model is pretrained on the placeholder,
and a tokenizer-specific stand-in would not do: RoBERTa's unknown token is the string ``<unk>``
itself, so the same text would be scored differently by BERT- and RoBERTa-family models; the gap it
leaves is the same for every arm, whose perplexities are compared on identical inputs), the separators are joined back (``1 @,@ 000`` -> ``1,000``), heading markers dropped
and punctuation re-attached (what a byte-level BPE tokenizer such as RoBERTa's would otherwise see
as different words). Every other word is kept, in order.
"""

from __future__ import annotations

import re

# Bump when plain_text changes what it returns: it is part of the held-out sets' fingerprint
# (dapt.data.sources.describe), so cached perplexities measured on the old text are recomputed.
RULES_VERSION = 1

_SEPARATOR = re.compile(r" *@([-,.])@ *")
_HEADING = re.compile(r"^ *(=+ )+(?P<title>.*?)( =+)+ *$", re.MULTILINE)
_SPACE_BEFORE = re.compile(r" +(?=[,.;:!?%)\]}]|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|n't\b)")
_SPACE_AFTER = re.compile(r"(?<=[(\[{$]) +")
_SPACES = re.compile(r"[ \t]{2,}")


def plain_text(text: str) -> str:
    """``text`` (lines of the tokenized WikiText release) without its markup, line by line."""
    text = text.replace("<unk>", "")
    text = _SEPARATOR.sub(r"\1", text)
    text = _HEADING.sub(r"\g<title>", text)
    text = _SPACE_BEFORE.sub("", text)
    text = _SPACE_AFTER.sub("", text)
    text = _SPACES.sub(" ", text)
    return "\n".join(line.strip() for line in text.split("\n") if line.strip())
