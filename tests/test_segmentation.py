"""translator.segmentation: sentences, placeholders and clause cuts, checked without a model."""

import random

import pytest

from translator.segmentation import (
    PLACEHOLDERS,
    combine_scores,
    protect_spans,
    segment,
    sentence_spans,
)

# Texts whose spacing must survive: blank lines, tabs, CRLF, leading and trailing whitespace.
TEXTS = [
    "A dog runs on the beach. It is 3 years old.",
    "The meeting starts at 9 o'clock. Please be on time! Do you have 45 minutes?",
    "   A child reads.   ",
    "\tThe cat sleeps.\n\n\nThe dog barks.\n",
    "A girl sings.\r\nA boy dances.\r\n",
    "One.  Two.   Three.",
    "Shopping list:\n- two apples\n- 6 eggs\n1. Open the door.\n2) Sit down.",
    "See https://example.com/a.b?x=1, or mail john.doe@example.org! Then run `make test`.",
    "DO NOT TOUCH. THE PAINT IS WET.",
    "",
    " \n\t ",
]


def identity_join(text, **kwargs):
    """Segments `text` and joins the units' own texts back: a 'translation' that is the source."""
    seg = segment(text, **kwargs)
    return seg.join(seg.sentences)


@pytest.mark.parametrize("text", TEXTS)
def test_join_of_the_sources_gives_the_text_back_exactly(text):
    # Spacing, line breaks and list markers are kept; every placeholder is restored; capitals
    # come back (the units of an ALL CAPS sentence are in sentence case).
    assert identity_join(text) == text
    assert identity_join(text, protect=False) == text


def test_join_keeps_the_whitespace_between_sentences():
    seg = segment("  One.\n\n  Two.\t")
    assert seg.sentences == ["One.", "Two."]
    assert seg.spans == [(2, 6), (10, 14)]
    assert seg.join(["Un.", "Deux."]) == "  Un.\n\n  Deux.\t"
    with pytest.raises(ValueError, match="expected 2 translations"):
        seg.join(["Un."])


def test_random_texts_round_trip():
    """Random paragraphs of sentences, numbers, URLs and whitespace: the units cover every
    non-space character once, in order, and join gives the text back."""
    rng = random.Random(0)
    pieces = ["A man walks.", "It is 3.5 km long!", "Is it 12:30?", "Mr. Smith paid $4.99."]
    pieces += ["Mail a@b.org now.", "Visit www.x.com.", "e.g. this one", "THE END.", "1,000 cats"]
    spaces = [" ", "  ", "\n", "\n\n", "\t", " \n "]
    for _ in range(200):
        parts = [rng.choice(spaces) if rng.random() < 0.3 else ""]
        for _ in range(rng.randint(0, 6)):
            parts += [rng.choice(pieces), rng.choice(spaces)]
        text = "".join(parts[:-1] if rng.random() < 0.5 else parts)
        seg = segment(text)
        covered = "".join(text[s:e] for s, e in seg.spans)
        assert "".join(covered.split()) == "".join(text.split()), text
        assert all(e <= s2 for (_, e), (s2, _) in zip(seg.spans, seg.spans[1:], strict=False)), text
        assert seg.join(seg.sentences) == text, text


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
        ("The U.S. economy grew. Prices fell.", ["The U.S. economy grew.", "Prices fell."]),
        ("Bring fruit, e.g. apples. Thanks.", ["Bring fruit, e.g. apples.", "Thanks."]),
        ("It rose to 3.5 percent. It was 2.75.", ["It rose to 3.5 percent.", "It was 2.75."]),
        ('"Stop!" she said. He stopped.', ['"Stop!" she said.', "He stopped."]),
        ("Wait... I know. Let me think.", ["Wait... I know.", "Let me think."]),
        ("J. R. R. Tolkien wrote. They read.", ["J. R. R. Tolkien wrote.", "They read."]),
        ("See www.example.com now. It is free.", ["See www.example.com now.", "It is free."]),
        ("Version 2.0.1 is out. Update now.", ["Version 2.0.1 is out.", "Update now."]),
        (
            "VISIT WWW.EXAMPLE.COM TODAY. IT IS FREE.",
            ["VISIT WWW.EXAMPLE.COM TODAY.", "IT IS FREE."],
        ),
        ("Is it true? Yes! It is.", ["Is it true?", "Yes!", "It is."]),
        ("no capitals here. another one.", ["no capitals here.", "another one."]),
        ("Line one\nline two", ["Line one", "line two"]),  # a line break ends a sentence
        ("- apples\n- 2 pears\n3) plums", ["apples", "2 pears", "plums"]),  # markers stay
    ],
)
def test_sentences(text, sentences):
    assert [text[s:e] for s, e in sentence_spans(text)] == sentences


def test_empty_and_whitespace_only_texts_have_no_sentence():
    for text in ("", " ", "\n\n", " \t\n "):
        seg = segment(text)
        assert seg.sentences == [] and seg.spans == []
        assert seg.join([]) == text


def test_without_sentence_splitting_the_text_is_one_unit_as_it_is():
    text = "  One. Two 2.\n"
    seg = segment(text, split_sentences=False)
    assert seg.spans == [(0, len(text))]
    assert seg.sentences == ["  One. Two three.\n"]
    assert seg.join(["Un. Deux trois."]) == "Un. Deux 2."
    assert segment("", split_sentences=False).sentences == [""]


@pytest.mark.parametrize(
    "text, spans",
    [
        ("Go to https://example.com/a.b?c=1.", ["https://example.com/a.b?c=1"]),
        ("Visit example.org or www.test.fr/x today", ["example.org", "www.test.fr/x"]),
        ("Write to john.doe+x@mail.example.com.", ["john.doe+x@mail.example.com"]),
        ("It costs $4.99, 30 €, 50% or 1,000,000.", ["$4.99", "30 €", "50%", "1,000,000"]),
        ("At 9:30 on 12/05/2013 or 2013-05-12.", ["9:30", "12/05/2013", "2013-05-12"]),
        ("Run `make test` on config.yaml and my_var.", ["`make test`", "config.yaml", "my_var"]),
        ("Call os.path.join() or f() in ~/x/run.sh", ["os.path.join()", "f()", "~/x/run.sh"]),
        (
            "Use --no-segment and src/main.py with getValue",
            ["--no-segment", "src/main.py", "getValue"],
        ),
        ("Follow @city_news and #marathon2024.", ["@city_news", "#marathon2024"]),
        # Not protected: abbreviations, ordinals, units glued to a number, slashes between words.
        ("The U.S. and e.g. Ph.D. at 5 p.m. and/or 3rd 1990s 27km", ["5"]),
    ],
)
def test_protected_spans(text, spans):
    assert [text[s:e] for s, e in protect_spans(text)] == spans


def test_placeholders_are_number_words_restored_from_their_french_or_digits():
    seg = segment("In 1998, 12 apples cost $3.50.")
    (unit,) = seg.units
    assert unit.text == "In three, four apples cost five."
    assert unit.protected == ("1998", "12", "$3.50")
    # French words in any case, digits, the English word, in any order.
    for french in (
        "En trois, quatre pommes coûtaient cinq.",
        "En TROIS, 4 pommes coûtaient Cinq.",
        "Cinq : quatre pommes en three.",
    ):
        restored = seg.join([french])
        assert all(value in restored for value in unit.protected), restored
        assert not any(w in restored.lower() for w in ("trois", "quatre", "cinq", "three"))
    assert seg.join(["En trois, quatre pommes coûtaient cinq."]) == (
        "En 1998, 12 pommes coûtaient $3.50."
    )
    assert seg.join(["Cinq pour trois trois."]) == "$3.50 pour 1998 (12)."  # repeat counts once


def test_a_restored_number_is_not_read_again_as_a_placeholder():
    # "1998" holds the digits of "eight"; "12" is placeholder "twelve"'s own digits.
    seg = segment("In 1998 and 12 and 8.")
    assert seg.sentences == ["In three and four and five."]
    assert seg.join(["En trois et quatre et cinq."]) == "En 1998 et 12 et 8."


def test_words_of_the_sentence_are_never_placeholders():
    seg = segment("Three men and 4 dogs; trois is French, 5 too.")
    (unit,) = seg.units
    assert [p[0] for p in unit.placeholders] == ["four", "five"]  # "three" is in the text
    assert seg.join(["Trois hommes et quatre chiens ; trois est français, cinq aussi."]) == (
        "Trois hommes et 4 chiens ; trois est français, 5 aussi."
    )


def test_a_placeholder_the_model_dropped_is_appended_not_lost():
    seg = segment("It has 250 paintings since 1998!")
    unit = seg.units[0]
    assert unit.restore_with_missing("Il a des tableaux depuis quatre !") == (
        "Il a des tableaux depuis 1998 (250) !",
        ["250"],
    )
    assert seg.join(["Il a des tableaux."]) == "Il a des tableaux (250, 1998)."
    assert seg.join([""]) == "(250, 1998)"
    # The number itself, written by the model, counts as restored.
    assert seg.join(["Il a 250 tableaux depuis quatre !"]) == "Il a 250 tableaux depuis 1998 !"


def test_more_spans_than_placeholders_are_left_in_and_still_checked():
    numbers = [str(n) for n in range(1, len(PLACEHOLDERS) + 3)]
    seg = segment(" ".join(numbers) + ".")
    (unit,) = seg.units
    assert len(unit.protected) == len(PLACEHOLDERS)
    assert unit.unmasked == tuple(numbers[len(PLACEHOLDERS) :])
    french = " ".join(p[1] for p in PLACEHOLDERS) + "."
    expected = " ".join(numbers[: len(PLACEHOLDERS)]) + f" ({numbers[-2]}, {numbers[-1]})."
    assert seg.join([french]) == expected


def test_all_capitals_are_translated_in_sentence_case_and_put_back_in_capitals():
    seg = segment("DO NOT TOUCH THE PAINTING, I SAID. CALL 555-0199.")
    assert seg.sentences == ["Do not touch the painting, I said.", "Call three."]
    assert seg.join(["Ne touchez pas le tableau, j'ai dit.", "Appelez trois."]) == (
        "NE TOUCHEZ PAS LE TABLEAU, J'AI DIT. APPELEZ 555-0199."
    )
    assert segment("NASA is here.").sentences == ["NASA is here."]  # not all capitals


def test_protect_false_translates_the_text_as_it_is():
    seg = segment("It has 250 paintings.", protect=False)
    assert seg.sentences == ["It has 250 paintings."]
    assert seg.join(["Il a deux50 peintures."]) == "Il a deux50 peintures."


def words(text):
    return len(text.split())


LONG = (
    "A young man wearing a red jacket and blue jeans is standing next to an old wooden boat on "
    "a sandy beach while his friends, who are sitting on colorful towels near the water, are "
    "laughing and eating sandwiches; a small brown dog runs around them chasing a yellow ball "
    "that one of the children has thrown toward the waves, and 3 birds watch."
)


@pytest.mark.parametrize("limit", [5, 10, 20, 40])
def test_long_sentences_are_cut_at_clauses_and_keep_every_word(limit):
    seg = segment(LONG, max_tokens=limit, count_tokens=words)
    assert len(seg.units) > 1
    assert all(words(unit.text) <= limit for unit in seg.units)
    assert seg.join(seg.sentences) == LONG
    assert " ".join(unit.source for unit in seg.units) == LONG
    if limit == 40:  # the semicolon, the strongest boundary, comes first
        assert seg.units[0].source.endswith("sandwiches;")


def test_the_pieces_of_a_cut_sentence_end_as_in_the_source():
    # The model ends every translation with a full stop; a piece ends as its source does.
    seg = segment(LONG, max_tokens=40, count_tokens=words)
    assert [u.cut for u in seg.units] == [True, False]
    assert seg.join(["Un jeune homme mange.", "Un chien court, et 3 oiseaux regardent."]) == (
        "Un jeune homme mange; Un chien court, et 3 oiseaux regardent."
    )
    seg = segment("one two three four five six", max_tokens=3, count_tokens=words)
    assert seg.join(["Un deux trois.", "Quatre cinq six."]) == "Un deux trois Quatre cinq six."


def test_a_sentence_under_the_limit_is_not_cut():
    seg = segment(LONG, max_tokens=words(LONG), count_tokens=words)
    assert seg.sentences == [segment(LONG).sentences[0]]


def test_a_long_word_is_cut_between_characters_and_kept_whole():
    text = "x" * 50
    seg = segment(text, max_tokens=8, count_tokens=len)
    assert all(len(s) <= 8 for s in seg.sentences)
    assert "".join(seg.sentences) == text and seg.join(seg.sentences) == text


def test_max_tokens_needs_a_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        segment("A text.", max_tokens=10)


def test_combine_scores_is_the_length_weighted_mean():
    assert combine_scores([-1.0], [7]) == -1.0
    assert combine_scores([-1.0, -4.0], [3, 1]) == pytest.approx(-1.75)
    assert combine_scores([], []) == 0.0
