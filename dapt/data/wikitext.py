"""Plain text from the tokenized WikiText release (the general held-out set of every run).

WikiText's tokenized files are markup, not English: rare words are replaced by ``<unk>`` (15,218
times in the WikiText-2 test split, about 6% of its words), number separators and in-word hyphens are
written `` @,@ `` / `` @.@ `` / `` @-@ ``, headings are `` = = Title = = ``, formulas ``<formula>``,
and punctuation is spaced off. A WordPiece tokenizer cuts ``<unk>`` into four pieces (``<``, ``un``,
``##k``, ``>``) and `` @-@ `` into three, so scored as it is, 23% of the test split's word pieces
are markup, which a model learns to predict from any text with angle brackets (TAPT on ChemProt,
whose entities are marked ``<< >>``, lowered it by 40% against the control). ``plain_text`` undoes
the markup, keeping every other word in order:

- ``<unk>`` is removed, with any separator attached to it (``the <unk> @-@ based`` -> ``the based``,
  not ``the-based``). The trade-off: the context loses a word (``directed by .``) where mapping it to
  each tokenizer's own unknown token (``[UNK]``, RoBERTa's ``<unk>``; special tokens are never
  masked) would keep a placeholder. Removal was chosen because it needs no tokenizer at read time and
  gives every model family the same text; the gap is the same for every arm, whose perplexities are
  compared on identical documents and masks.
- ``<formula>`` placeholders and the empty tags left by removed words (``< / >``) are removed.
- Separators are joined back (``1 @,@ 000`` -> ``1,000``), heading markers dropped, punctuation and
  clitics re-attached (``Teddy 's``, ``didn 't``): the same word pieces for WordPiece, but different
  words for a byte-level BPE tokenizer such as RoBERTa's.

Any change to this module changes the held-out sets' fingerprint (``dapt.data.sources.describe``
hashes its source), so cached perplexities of the old text are re-measured, not served.
"""

from __future__ import annotations

import re

_UNK = re.compile(r"(?: *@[-,.]@)* *<unk>(?: *@[-,.]@)*")
_TAGS = re.compile(r"<formula>|< *(?:/ *)?>")
_SEPARATOR = re.compile(r" *@([-,.])@ *")
_HEADING = re.compile(r"^ *(=+ )+(?P<title>.*?)( =+)+ *$", re.MULTILINE)
_SPACE_BEFORE = re.compile(r" +(?=[,.;:!?%)\]}]|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|n't\b|'t\b)")
_SPACE_AFTER = re.compile(r"(?<=[(\[{$]) +")
_SPACES = re.compile(r"[ \t]{2,}")


def plain_text(text: str) -> str:
    """``text`` (lines of the tokenized WikiText release) without its markup, line by line."""
    text = _UNK.sub(" ", text)
    text = _TAGS.sub(" ", text)
    text = _SEPARATOR.sub(r"\1", text)
    text = _HEADING.sub(r"\g<title>", text)
    text = _SPACE_BEFORE.sub("", text)
    text = _SPACE_AFTER.sub("", text)
    text = _SPACES.sub(" ", text)
    return "\n".join(line.strip() for line in text.split("\n") if line.strip())
