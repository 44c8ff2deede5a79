"""Texts to translation units and back: sentences, placeholders for what must be copied verbatim,
over-long sentences cut at clause boundaries, and the translations rejoined with the text's own
spacing.

The model translates one sentence at a time (it was trained on single sentences of up to 64
subwords), so `segment` turns a text into the sentences to translate and `Segmented.join` turns
their translations back into one text:

- **Lines, then sentences.** A line break always ends a sentence (lists, addresses, blank lines
  and hard-wrapped text keep their lines); each line is split into sentences by `sentencex`
  (Wikimedia's rule-based segmenter: abbreviations such as Mr., U.S., e.g., decimals, initials,
  quotes and URLs do not end a sentence). The whitespace between sentences (spaces, line
  breaks, blank lines, leading and trailing whitespace) is kept and put back by `join`.
- **Placeholders.** Numbers (with a currency sign or % attached), URLs, e-mail addresses,
  @handles and #tags and code-like tokens (`backticks`, snake_case, dotted.names, camelCase,
  paths, --flags, call()) are replaced before translation by English number words the model
  translates reliably (three, four, five, ...: the i-th protected span of a sentence gets the
  i-th word not already in the sentence) and restored in the French output from the word's
  translation (trois, quatre, cinq, ...; also its digits, 3, 4, 5, which the model sometimes
  writes). The caption model shipped until 2026-12-07 copied almost nothing verbatim (9% of the
  numbers of a sample with digits, and no rare token such as "X" or "#" survived), but
  translated number words reliably: with these placeholders 80-95% of numbers come through
  verbatim. Numbers are not localized: 3.5 stays 3.5 (not 3,5) and 1,000 stays 1,000 (an
  English text's 1.000 or 2.0.1 is not always a decimal). A protected span whose placeholder the model dropped is not lost:
  `restore` appends it, in parentheses, before the sentence's final punctuation.
- **Long sentences.** With `max_tokens` and `count_tokens`, a unit over `max_tokens` subwords is
  cut at clause boundaries (";", ":", ",", then before a conjunction, then at a space) into
  pieces under the limit, nearest the middle first; every character stays in exactly one piece.

Example:

>>> text = "The museum opened in 1998.  It has 250 paintings.\\n\\nSee you!"
>>> seg = segment(text)
>>> seg.sentences
['The museum opened in three.', 'It has three paintings.', 'See you!']
>>> seg.join(["Le musée a ouvert en trois.", "Il a trois tableaux.", "À bientôt !"])
'Le musée a ouvert en 1998.  Il a 250 tableaux.\\n\\nÀ bientôt !'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

# English number words the shipped model translates reliably, their French translations and
# the digits it sometimes writes instead: the placeholders, in order of use within a sentence.
PLACEHOLDERS = (
    ("three", "trois", "3"),
    ("four", "quatre", "4"),
    ("five", "cinq", "5"),
    ("eight", "huit", "8"),
    ("twelve", "douze", "12"),
    ("twenty", "vingt", "20"),
    ("thirty", "trente", "30"),
    ("fifty", "cinquante", "50"),
)

_URL = (
    r"(?i:(?:https?://|ftp://|www\.)[^\s<>\"'`]+"
    r"|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:com|org|net|edu|gov|io|fr|ca|uk|de|eu|info)"
    r"\b(?:/[^\s<>\"'`]*)?)"
)
_EMAIL = r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
_CODE = (
    r"`[^`\n]+`"  # `inline code`
    r"|(?<!\S)[@#][A-Za-z_]\w*"  # @handle, #tag
    r"|(?<!\S)--?[A-Za-z][\w-]*=?[\w./-]*(?=[\s.,;:!?)]|$)(?<=\w)"  # --flag, -v
    r"|(?<![\w/])(?:~|\.{1,2})?/[\w.-]+(?:/[\w.-]*)*"  # /usr/bin, ~/x, ./run.sh
    r"|\b\w+/[\w/-]*\w\.\w+\b"  # src/main.py
    r"|\b[A-Za-z_]\w*\(\w*\)"  # call()
    r"|\b\w*_\w+\b"  # snake_case
    r"|\b[A-Za-z_]\w+(?:\.[A-Za-z_]\w+)+(?:\(\))?"  # config.yaml, os.path.join (parts of 2+)
    r"|\b[a-z]+[A-Z]\w*\b"  # camelCase, iPhone
)
# 3, 3.5, 1,000, 9:30, 12/05/1990, 555-0199, $4.99, 30 €, 40%
_NUMBER = r"(?<![\w.,])[$€£¥]?\d+(?:[.,:/-]\d+)*(?:\s?%|\s?[€£¥$](?!\w))?(?![\w@])"
PROTECTED = re.compile(f"{_URL}|{_EMAIL}|{_CODE}|{_NUMBER}")
"""What is copied verbatim: URLs, e-mail addresses, code-like tokens, numbers."""

_TRAILING_PUNCTUATION = ".,;:!?)]}'\""
# A list item's marker at the start of a line ("- ", "* ", "1. ", "2) ", "a) "): kept as it is,
# not translated.
_LIST_MARKER = re.compile(r"[ \t]*(?:[-*•‣◦–—+]|\(?\d{1,3}[.)]|\(?[a-z][.)]|[A-Z]\))(?=[ \t]+\S)")
# Where an over-long unit may be cut, best first: after ; then : then , (followed by a space),
# before a conjunction or relative pronoun, at any space.
_CLAUSE_BOUNDARIES = (
    re.compile(r";(?=\s)"),
    re.compile(r":(?=\s)"),
    re.compile(r",(?=\s)"),
    re.compile(
        r"(?<=\S)(?=\s+(?:and|but|or|nor|so|yet|because|while|whereas|although|though|which|"
        r"who|whom|whose|that|when|where|if|unless|until|since|after|before)\b)",
        re.IGNORECASE,
    ),
    re.compile(r"(?<=\S)(?=\s)"),
)


@dataclass(frozen=True)
class Sentence:
    """One translation unit of a text: a sentence, or a piece of an over-long one.

    Args:
        start, end: Its span in the segmented text: `source == text[start:end]`.
        source: The original sentence (no surrounding whitespace).
        text: What the model translates: `source` with placeholders.
        protected: The protected spans of `source`, in order; the i-th was replaced by the
            English word of `placeholders[i]`.
        placeholders: `(english, french, digits)` of each protected span.
        unmasked: Spans to copy verbatim left in `text` (more than `len(PLACEHOLDERS)` in one
            sentence): checked by `restore` like the others.
        upper: `source` is in capitals: `text` is in sentence case (the model has seen few
            capitals and garbles them) and `restore` puts the translation in capitals.
        cut: The unit is a piece of an over-long sentence that does not end it: `restore`
            ends its translation with the piece's own last character (",", ";", ":" or
            nothing) instead of the full stop the model puts at the end of everything.
    """

    start: int
    end: int
    source: str
    text: str
    protected: tuple[str, ...] = ()
    placeholders: tuple[tuple[str, str, str], ...] = ()
    unmasked: tuple[str, ...] = ()
    upper: bool = False
    cut: bool = False

    def restore(self, translation: str) -> str:
        """The translation with each placeholder's French word (or digits) replaced by the span
        it stands for; spans the model dropped are appended in parentheses before the final
        punctuation, so none is lost."""
        text, _ = self.restore_with_missing(translation)
        return text

    def restore_with_missing(self, translation: str) -> tuple[str, list[str]]:
        """`restore`, and the protected spans that the model dropped (appended at the end)."""
        if self.upper:
            translation = translation.upper()
        if self.cut and translation.rstrip().endswith("."):
            translation = translation.rstrip()[:-1].rstrip()
            if self.source[-1] in ",;:":
                translation += self.source[-1]
        if not self.protected and not self.unmasked:
            return translation, []
        # One pass over every placeholder form, so a restored number ("1998") is never read
        # again as another placeholder's digits ("8").
        forms = {}
        for value, (english, french, digits) in zip(self.protected, self.placeholders, strict=True):
            for form in (french, digits, english):
                forms.setdefault(form.lower(), value)
        pattern = re.compile(
            r"(?<![\w.,])("
            + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
            + r")(?:\s+\1)*(?![\w])",  # "trois trois" (a repeated placeholder) counts once
            re.IGNORECASE,
        )
        found = set()

        def substitute(match):
            value = forms[match.group(1).lower()]
            found.add(value)
            return value

        text = pattern.sub(substitute, translation) if forms else translation
        expected = dict.fromkeys((*self.protected, *self.unmasked))
        missing = [value for value in expected if value not in found]
        missing = [value for value in missing if value not in text]
        if missing:
            body = text.rstrip()
            end = len(body)
            while end > 0 and body[end - 1] in ".!?…":
                end -= 1
            head = body[:end].rstrip()
            extra = f"({', '.join(missing)})"
            # "Il a des tableaux (250) !": before the final punctuation and its space.
            text = (f"{head} {extra}" if head else extra) + body[len(head) :] + text[len(body) :]
        return text, missing


@dataclass(frozen=True)
class Segmented:
    """A text cut into translation units; `join` puts their translations back together.

    Args:
        text: The original text.
        units: Its `Sentence`s in order, non-overlapping; what lies between them (and before the
            first and after the last) is whitespace, kept by `join`.

    Example:

    >>> seg = segment("One.\\n\\n  Two 2.  ")
    >>> seg.sentences, seg.spans
    (['One.', 'Two three.'], [(0, 4), (8, 14)])
    >>> seg.join(["Un.", "Deux trois."])
    'Un.\\n\\n  Deux 2.  '
    """

    text: str
    units: tuple[Sentence, ...] = field(default_factory=tuple)

    @property
    def sentences(self) -> list[str]:
        """The texts to translate (placeholders applied), one per unit."""
        return [unit.text for unit in self.units]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """`(start, end)` of each unit in `text`."""
        return [(unit.start, unit.end) for unit in self.units]

    def restore(self, index: int, translation: str) -> str:
        """The translation of unit `index` with its placeholders restored."""
        return self.units[index].restore(translation)

    def join(self, translations: Sequence[str], restore: bool = True) -> str:
        """The text with each unit replaced by its translation (placeholders restored), and
        everything between units (spaces, line breaks, blank lines) kept as it was.

        Args:
            translations: One raw model output per unit, in order (`len(self.sentences)`).
            restore: `False` when the translations are restored already (`restore`).
        """
        if len(translations) != len(self.units):
            raise ValueError(
                f"expected {len(self.units)} translations (one per sentence), got "
                f"{len(translations)}"
            )
        parts, position = [], 0
        for unit, translation in zip(self.units, translations, strict=True):
            parts.append(self.text[position : unit.start])
            parts.append(unit.restore(translation) if restore else translation)
            position = unit.end
        parts.append(self.text[position:])
        return "".join(parts)


def segment(
    text: str,
    *,
    split_sentences: bool = True,
    protect: bool = True,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> Segmented:
    """Cuts `text` into the units to translate.

    Args:
        text: Any text: one sentence, paragraphs, lines; empty or whitespace-only gives no unit.
        split_sentences: `False` keeps the whole text, as it is (even empty), as one unit:
            for callers who segment themselves. An over-long one is still cut.
        protect: Replace numbers, URLs, e-mail addresses and code-like tokens by placeholders.
        max_tokens: Most subwords per unit (the model's source limit without EOS: 255 for the
            shipped model); `None` for no limit. Needs `count_tokens`.
        count_tokens: Subwords of a string, e.g. `sentencepiece_counter("spm.model")`.

    Returns:
        A `Segmented`: `.sentences` to translate, `.join(translations)` to rejoin.
    """
    if max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs count_tokens (e.g. sentencepiece_counter(spm.model))")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    spans = sentence_spans(text) if split_sentences else [(0, len(text))]
    units = []
    for start, end in spans:
        if max_tokens is not None:
            pieces = _split_long(text, start, end, protect, max_tokens, count_tokens)
        else:
            pieces = [(start, end)]
        for i, (s, e) in enumerate(pieces):
            unit = _unit(text, s, e, protect)
            units.append(replace(unit, cut=True) if i < len(pieces) - 1 else unit)
    return Segmented(text, tuple(units))


def sentence_spans(text: str, language: str = "en") -> list[tuple[int, int]]:
    """`(start, end)` of each sentence of `text`, without surrounding whitespace: lines, each cut
    into sentences by sentencex with the rules of `language` (an ISO 639 code)."""
    import sentencex

    spans = []
    line_start = 0
    for line in text.split("\n"):
        marker = _LIST_MARKER.match(line)
        cursor = marker.end() if marker else 0
        # The segmenter sees each URL, number or code token as a run of "0" of the same length,
        # so that their dots end no sentence ("WWW.EXAMPLE.COM", "v2.0.1").
        hidden = list(line)
        for s, e in protect_spans(line):
            hidden[s:e] = "0" * (e - s)
        hidden = "".join(hidden)
        for sentence in sentencex.segment(language, hidden[cursor:]):
            stripped = sentence.strip()
            if not stripped:
                continue
            at = hidden.find(stripped, cursor)
            if at < 0:  # the segmenter changed the text: keep the rest of the line whole
                spans.extend(_stripped_span(line, cursor, len(line), line_start))
                cursor = len(line)
                break
            spans.append((line_start + at, line_start + at + len(stripped)))
            cursor = at + len(stripped)
        if line[cursor:].strip():  # whatever the segmenter left out stays in
            spans.extend(_stripped_span(line, cursor, len(line), line_start))
        line_start += len(line) + 1
    return spans


def protect_spans(text: str) -> list[tuple[int, int]]:
    """`(start, end)` of each span of `text` to copy verbatim (see `PROTECTED`); trailing
    sentence punctuation is not part of a span ("example.com." ends at "m")."""
    spans = []
    for match in PROTECTED.finditer(text):
        start, end = match.span()
        if not match.group(0).startswith("`"):
            while end > start and text[end - 1] in _TRAILING_PUNCTUATION:
                if text[end - 1] == ")" and "(" in text[start : end - 1]:
                    break
                end -= 1
        if end > start:
            spans.append((start, end))
    return spans


def sentencepiece_counter(model) -> Callable[[str], int]:
    """`count_tokens` for `segment`: the number of subwords of a string under a SentencePiece
    model (a `.model` path or its bytes), as the model's source tokenizer counts them."""
    import sentencepiece as spm

    if isinstance(model, bytes):
        processor = spm.SentencePieceProcessor(model_proto=model)
    else:
        processor = spm.SentencePieceProcessor(model_file=str(model))
    return lambda text: len(processor.encode(text))


def combine_scores(scores: Sequence[float], lengths: Sequence[int]) -> float:
    """A text's score from its sentences' scores: their mean weighted by target length (subwords
    including EOS), so a one-sentence text keeps its sentence's score and the scale is that of
    one sentence's (length-normalized) score. No sentence: 0.0."""
    total = sum(lengths)
    if not scores:
        return 0.0
    if total <= 0:
        return float(sum(scores) / len(scores))
    return float(sum(s * n for s, n in zip(scores, lengths, strict=True)) / total)


# -- internals ----------------------------------------------------------------------------------


def _stripped_span(text, start, end, offset=0):
    piece = text[start:end]
    if not piece.strip():
        return []
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    return [(offset + start + left, offset + start + right)]


def _unit(text, start, end, protect):
    source = text[start:end]
    spans = protect_spans(source) if protect else []
    outside, position = [], 0  # the text between protected spans
    for s, e in spans:
        outside.append(source[position:s])
        position = e
    outside.append(source[position:])
    letters = [c for c in "".join(outside) if c.isalpha()]
    upper = len(letters) >= 4 and all(c.isupper() for c in letters)
    if upper:
        outside = [re.sub(r"\bi\b", "I", part.lower()) for part in outside]
    # Placeholders whose words (or digits) the rest of the sentence already uses are skipped.
    words = set(re.findall(r"\w+", " ".join(outside).lower()))
    free = [p for p in PLACEHOLDERS if not words & set(p)]
    # Spans beyond the placeholders available stay in the text (restore still checks them).
    masked, unmasked = spans[: len(free)], spans[len(free) :]
    parts = [outside[0]]
    for i, (s, e) in enumerate(spans):
        parts.append(free[i][0] if i < len(masked) else source[s:e])
        parts.append(outside[i + 1])
    masked_text = "".join(parts)
    # Sentence case ("Three men ...", "Do not touch ..."), as the model saw in training.
    if upper or (masked and spans[0][0] == 0):
        first = re.search(r"[^\W\d_]", masked_text)
        if first:
            i = first.start()
            masked_text = masked_text[:i] + masked_text[i].upper() + masked_text[i + 1 :]
    return Sentence(
        start,
        end,
        source,
        masked_text,
        protected=tuple(source[s:e] for s, e in masked),
        placeholders=tuple(free[: len(masked)]),
        unmasked=tuple(source[s:e] for s, e in unmasked),
        upper=upper,
    )


def _split_long(text, start, end, protect, max_tokens, count_tokens):
    """Cuts `text[start:end]` into spans of at most `max_tokens` subwords (after placeholders),
    at the best clause boundary nearest the middle, recursively."""
    if count_tokens(_unit(text, start, end, protect).text) <= max_tokens:
        return [(start, end)]
    piece = text[start:end]
    if len(piece) == 1:  # nothing left to cut: the model's own check will refuse it
        return [(start, end)]
    inside = protect_spans(piece) if protect else []
    middle = len(piece) / 2
    cut = None
    for boundary in _CLAUSE_BOUNDARIES:
        points = [
            m.end()
            for m in boundary.finditer(piece)
            if 0 < m.end() < len(piece) and not any(s < m.end() < e for s, e in inside)
        ]
        if points:
            cut = min(points, key=lambda p: abs(p - middle))
            break
    if cut is None:  # one "word" over the limit: cut between characters
        cut = max(1, len(piece) // 2)
    left = _stripped_span(text, start, start + cut)
    right = _stripped_span(text, start + cut, end)
    spans = []
    for s, e in left + right:
        spans.extend(_split_long(text, s, e, protect, max_tokens, count_tokens))
    return spans
