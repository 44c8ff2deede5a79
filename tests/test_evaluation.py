"""BLEU and chrF against direct sacreBLEU calls, test sets from files and Tatoeba, `translator evaluate`."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import sacrebleu

from tests.tiny import WORDS
from translator.corpora import tatoeba_split
from translator.evaluation import evaluate, load_test_set, write_hypotheses
from translator.scoring import bleu_chrf

# Tatoeba-style: several references for some sentences, a different number for each.
HYPOTHESES = [
    "the cat sat on the mat today",
    "a small dog runs in the big green park",
    "he reads a long book every evening",
    "we will meet at the station at noon",
]
REFERENCES = [
    ["the cat sat on the mat"],
    ["a little dog runs in the big park", "a small dog is running in the green park",
     "the small dog runs through a big green park"],
    ["he reads a long book each evening", "every evening he reads a big book"],
    ["we meet at the station at twelve"],
]  # fmt: skip
# The same references as sacreBLEU's streams, transposed by hand: stream k holds each
# sentence's k-th reference, "" where a sentence has fewer (sacreBLEU's convention).
STREAMS = [
    ["the cat sat on the mat", "a little dog runs in the big park",
     "he reads a long book each evening", "we meet at the station at twelve"],
    ["", "a small dog is running in the green park", "every evening he reads a big book", ""],
    ["", "the small dog runs through a big green park", "", ""],
]  # fmt: skip


def test_multi_reference_scores_match_sacrebleu_with_transposed_streams():
    bleu, chrf, bleu_signature, chrf_signature = bleu_chrf(HYPOTHESES, REFERENCES)
    expected_bleu = sacrebleu.corpus_bleu(HYPOTHESES, STREAMS)
    expected_chrf = sacrebleu.corpus_chrf(HYPOTHESES, STREAMS)
    assert bleu.score == pytest.approx(expected_bleu.score, abs=1e-9)
    assert chrf.score == pytest.approx(expected_chrf.score, abs=1e-9)
    assert bleu.counts == expected_bleu.counts and bleu.ref_len == expected_bleu.ref_len
    assert 5 < bleu.score < 95 and 5 < chrf.score < 95  # neither stuck at 0 nor at 100
    # The extra references count: the first reference alone scores lower.
    single = sacrebleu.corpus_bleu(HYPOTHESES, STREAMS[:1]).score
    assert bleu.score > single + 1
    assert "nrefs:var" in str(bleu_signature) and "nrefs:var" in str(chrf_signature)


def test_a_hypothesis_matching_any_of_its_references_scores_100():
    # Each hypothesis is its sentence's *last* reference (the 3rd, 2nd or only one).
    last = [refs[-1] for refs in REFERENCES]
    bleu, chrf, _, _ = bleu_chrf(last, REFERENCES)
    assert bleu.score == pytest.approx(100.0) and chrf.score == pytest.approx(100.0)
    bleu, _, _, _ = bleu_chrf(["something else entirely here"] * 4, REFERENCES)
    assert bleu.score < 5


class TableTranslator:
    """A stand-in for `Translator`: translates through a table, recording its calls."""

    batch_size = 1  # evaluate() translates chunks of 4 * batch_size

    def __init__(self, table):
        self.table = table
        self.calls = []

    def translate(self, texts, beam_size=None, length_penalty=None):
        self.calls.append((list(texts), beam_size, length_penalty))
        return [SimpleNamespace(text=self.table[t]) for t in texts]


def test_evaluate_translates_in_order_and_scores_like_sacrebleu():
    sources = [f"source {i}" for i in range(10)]
    perfect = TableTranslator({s: REFERENCES[i % 4][-1] for i, s in enumerate(sources)})
    references = [REFERENCES[i % 4] for i in range(10)]
    result = evaluate(perfect, sources, references, beam_size=3, length_penalty=0.5, progress=False)
    assert result["bleu"] == 100.0 and result["chrf"] == 100.0
    assert result["hypotheses"] == [REFERENCES[i % 4][-1] for i in range(10)]
    assert [len(c[0]) for c in perfect.calls] == [4, 4, 2]  # chunks, in order
    assert all(c[1:] == (3, 0.5) for c in perfect.calls)

    partial = TableTranslator({s: HYPOTHESES[i % 4] for i, s in enumerate(sources)})
    result = evaluate(partial, sources, references, progress=False)
    streams = [[STREAMS[k][i % 4] for i in range(10)] for k in range(3)]
    hypotheses = [HYPOTHESES[i % 4] for i in range(10)]
    assert result["bleu"] == round(sacrebleu.corpus_bleu(hypotheses, streams).score, 2)
    assert result["chrf"] == round(sacrebleu.corpus_chrf(hypotheses, streams).score, 2)
    assert result["sentences"] == 10 and 0 < result["bleu"] < 100


def test_load_test_set_groups_tatoeba_translations_as_references(tmp_path):
    # A Tatoeba export (English<TAB>French<TAB>attribution) with 1 to 3 translations per
    # sentence; which sentences are in "test" is decided by a hash of the English.
    english = [f"sentence number {i} is here" for i in range(600)]
    test = [e for e in english if tatoeba_split(e) == "test"][:6]
    assert len(test) == 6
    lines, expected = [], []
    for i, sentence in enumerate(english):
        french = [f"la phrase {i} est ici", f"voici la phrase {i}", f"phrase {i} ici"]
        french = french[: 1 + i % 3]
        lines += [f"{sentence}\t{f}\tCC-BY 2.0 (France) Attribution" for f in french]
        if sentence in test:
            expected.append((sentence, french))
    (tmp_path / "tatoeba").mkdir()
    (tmp_path / "tatoeba" / "fra-eng.tsv").write_text("\n".join(lines) + "\n")
    sources, references, label = load_test_set("tatoeba", "test", data_dir=str(tmp_path))
    assert label == "tatoeba.test"
    got = list(zip(sources, references, strict=True))
    assert got[:6] == expected
    assert {len(r) for r in references} == {1, 2, 3}


def write_lines(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def test_load_test_set_from_files_and_its_errors(tmp_path):
    source = write_lines(tmp_path / "test.en", ["a", "b", "c"])
    first = write_lines(tmp_path / "ref1.fr", ["A", "B", "C"])
    second = write_lines(tmp_path / "ref2.fr", ["a'", "b'", "c'"])
    sources, references, label = load_test_set(source=source, references=[first, second])
    assert sources == ["a", "b", "c"] and label == "test.en"
    assert references == [["A", "a'"], ["B", "b'"], ["C", "c'"]]

    short = write_lines(tmp_path / "short.fr", ["A", "B"])
    with pytest.raises(ValueError) as error:
        load_test_set(source=source, references=[first, short])
    assert f"{source} has 3 lines but {short} has 2" in str(error.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.fr"))):
        load_test_set(source=source, references=[first, str(tmp_path / "nope.fr")])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.en"))):
        load_test_set(source=str(tmp_path / "nope.en"), references=[first])
    with pytest.raises(ValueError, match="--reference"):
        load_test_set(source=source, references=[])
    empty = write_lines(tmp_path / "empty.en", [])
    with pytest.raises(ValueError, match=f"{re.escape(empty)} is empty"):
        load_test_set(source=empty, references=[write_lines(tmp_path / "empty.fr", [])])
    fake = tmp_path / "fake.en.gz"
    fake.write_text("not gzip\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(fake))} is not a complete gzip file"):
        load_test_set(source=str(fake), references=[first])
    with pytest.raises(ValueError, match="not both"):
        load_test_set(corpus="multi30k", source=source, references=[first])
    with pytest.raises(ValueError, match="--reference goes with --source"):
        load_test_set(corpus="multi30k", references=[first])


def test_load_test_set_drops_a_byte_order_mark_opening_a_file(tmp_path):
    # Windows editors' "UTF-8 with BOM": the mark would otherwise be the first line's first word.
    source, reference = tmp_path / "bom.en", tmp_path / "bom.fr"
    source.write_bytes("\ufeffa cat\r\nb\n".encode("utf-8"))
    reference.write_bytes("\ufeffun chat\nb\n".encode("utf-8"))
    sources, references, _ = load_test_set(source=str(source), references=[str(reference)])
    assert sources == ["a cat", "b"] and references == [["un chat"], ["b"]]


def test_write_hypotheses_one_per_line(tmp_path):
    write_hypotheses(tmp_path / "hyp.txt", ["un chat", "", "deux chiens"])
    assert (tmp_path / "hyp.txt").read_text() == "un chat\n\ndeux chiens\n"
    assert os.listdir(tmp_path) == ["hyp.txt"]


def test_evaluate_cli_errors_name_the_files(tiny_run_dir, tmp_path, capsys):
    from translator.cli import main

    source = write_lines(tmp_path / "test.en", ["one red cat", "big house", "two dogs"])
    good = write_lines(tmp_path / "good.fr", ["un chat rouge", "grand maison", "deux chiens"])
    short = write_lines(tmp_path / "short.fr", ["un chat rouge", "grande maison"])
    base = ["evaluate", "--model", str(tiny_run_dir), "--source", source]
    assert main([*base, "--reference", good, "--reference", short]) == 2
    err = capsys.readouterr().err
    assert "translator evaluate: error:" in err
    assert f"{source} has 3 lines but {short} has 2" in err
    missing = str(tmp_path / "missing.fr")
    assert main([*base, "--reference", missing, "--output", str(tmp_path / "h.txt")]) == 2
    assert f"file {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "h.txt").exists()


def test_evaluate_cli_prints_the_python_api_score_and_writes_hypotheses(
    tmp_path, monkeypatch, capsys
):
    import translator.inference
    from translator.cli import main

    sources = [f"source {i}" for i in range(8)]
    table = TableTranslator({s: HYPOTHESES[i % 4] for i, s in enumerate(sources)})
    table.beam_size = 5
    loaded = []
    monkeypatch.setattr(translator.inference, "load", lambda *a, **k: loaded.append(a) or table)
    source = write_lines(tmp_path / "test.en", sources)
    references = [
        write_lines(tmp_path / f"ref{k}.fr", [STREAMS[k][i % 4] for i in range(8)])
        for k in range(3)
    ]
    output = tmp_path / "hyp.txt"
    args = ["evaluate", "--model", "some/model", "--source", source, "--output", str(output)]
    assert main([*args, *[a for r in references for a in ("--reference", r)]]) == 0
    out = capsys.readouterr().out
    hypotheses = [HYPOTHESES[i % 4] for i in range(8)]
    streams = [[STREAMS[k][i % 4] for i in range(8)] for k in range(3)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    chrf = sacrebleu.corpus_chrf(hypotheses, streams).score
    assert f"test.en, beam 5: BLEU {bleu:.2f}  chrF {chrf:.2f}" in out
    assert 5 < bleu < 95
    api = evaluate(table, *load_test_set(source=source, references=references)[:2])
    assert f"BLEU {api['bleu']:.2f}  chrF {api['chrf']:.2f}" in out
    assert output.read_text() == "".join(f"{h}\n" for h in hypotheses)
    assert f"hypotheses: {output}" in out and loaded == [("some/model",)]


def test_evaluate_cli_with_a_trained_run(tiny_run_dir, tmp_path):
    from translator.inference import load

    english = ["one red cat", "big house", "two small dogs", "three blue cars", "green tree"]
    truth = [" ".join(WORDS[w.rstrip("s")] for w in e.split()) for e in english]
    source = write_lines(tmp_path / "test.en", english)
    reference = write_lines(tmp_path / "ref.fr", truth)
    expected = evaluate(load(tiny_run_dir), english, [[t] for t in truth], progress=False)
    output = tmp_path / "hyp.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "translator.cli", "evaluate", "--model", str(tiny_run_dir),
         "--source", source, "--reference", reference, "--output", str(output)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = re.search(r"test\.en, beam 2: BLEU ([\d.]+)  chrF ([\d.]+)", proc.stdout)
    assert scores, proc.stdout
    assert float(scores.group(1)) == expected["bleu"]
    assert float(scores.group(2)) == expected["chrf"]
    assert output.read_text() == "".join(f"{h}\n" for h in expected["hypotheses"])


def _files(directory):
    """Every entry under `directory` with its bytes (None for a directory)."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


def test_evaluate_cli_leaves_a_read_only_model_directory_alone(
    tiny_run_dir, tmp_path, monkeypatch, capsys
):
    import shutil

    from translator.cli import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("model.keras", "config.yaml", "spm.model"):
        shutil.copy2(tiny_run_dir / name, model_dir / name)
    before = _files(model_dir)
    english = ["one red cat", "big house", "two small dogs"]
    source = write_lines(tmp_path / "test.en", english)
    reference = write_lines(tmp_path / "ref.fr", ["un chat rouge", "grand maison", "deux chiens"])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    mode = model_dir.stat().st_mode
    model_dir.chmod(0o555)  # read-only (except for root, hence the comparison below)
    try:
        for model in (model_dir, model_dir / "model.keras"):
            args = ["evaluate", "--model", str(model), "--source", source, "--reference", reference]
            assert main(args) == 0
            out = capsys.readouterr().out
            assert re.search(r"test\.en, beam 2: BLEU [\d.]+  chrF [\d.]+", out), out
            # By default the hypotheses go to the current directory, named after the model,
            # the test set and the beam.
            default = "hyp.model.test.en.beam2.txt"
            assert f"hypotheses: {default}" in out
            assert len((work / default).read_text().splitlines()) == len(english)
    finally:
        model_dir.chmod(mode)
    assert _files(model_dir) == before  # nothing written into the model directory


def test_evaluate_cli_prints_the_score_before_saving_hypotheses(tmp_path, monkeypatch, capsys):
    import translator.inference
    from translator.cli import main

    sources = [f"source {i}" for i in range(4)]
    table = TableTranslator({s: HYPOTHESES[i] for i, s in enumerate(sources)})
    table.beam_size = 5
    monkeypatch.setattr(translator.inference, "load", lambda *a, **k: table)
    source = write_lines(tmp_path / "test.en", sources)
    reference = write_lines(tmp_path / "ref.fr", STREAMS[0])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    output = blocker / "hyp.txt"  # cannot be written, not even by root
    args = ["evaluate", "--model", "m", "--source", source, "--reference", reference]
    assert main([*args, "--output", str(output)]) == 2
    captured = capsys.readouterr()
    bleu = sacrebleu.corpus_bleu(HYPOTHESES, [STREAMS[0]]).score
    assert f"test.en, beam 5: BLEU {bleu:.2f}" in captured.out  # the score is not lost
    assert "translator evaluate: error:" in captured.err and str(output) in captured.err


def test_default_hypotheses_file_is_one_file_named_after_model_and_test_set():
    from translator.cli import default_hypotheses_path

    assert default_hypotheses_path("saved_models/en-fr", "multi30k.test", 5) == (
        "hyp.en-fr.multi30k.test.beam5.txt"
    )
    assert default_hypotheses_path("runs/x/model.keras", "test.en", 1) == "hyp.x.test.en.beam1.txt"
    # A corpus label with a path in it still names one file in the current directory.
    name = default_hypotheses_path("m", "tfds:wmt14_translate/fr-en.validation", 5)
    assert name == "hyp.m.tfds_wmt14_translate_fr-en.validation.beam5.txt"


def _write_multi30k(data_dir, splits):
    import gzip

    (data_dir / "multi30k").mkdir(parents=True)
    for split, (english, french) in splits.items():
        for lang, lines in (("en", english), ("fr", french)):
            with gzip.open(data_dir / "multi30k" / f"{split}.{lang}.gz", "wt") as f:
                f.write("".join(f"{line}\n" for line in lines))


def test_scorecard_scores_every_set_at_every_beam_as_evaluate_does(tmp_path, monkeypatch, capsys):
    import json

    import translator.inference
    from translator.cli import main
    from translator.evaluation import format_scorecard, parse_test_sets, scorecard

    val = ([f"val {i}" for i in range(5)], [STREAMS[0][i % 4] for i in range(5)])
    test = ([f"test {i}" for i in range(4)], STREAMS[0])
    _write_multi30k(tmp_path, {"val": val, "test_2016_flickr": test})
    table = TableTranslator(
        {**{s: HYPOTHESES[i % 4] for i, s in enumerate(val[0])},
         **{s: STREAMS[0][i] for i, s in enumerate(test[0])}}
    )  # fmt: skip
    table.options = lambda: {"beam_size": 5, "length_penalty": 0.6}
    monkeypatch.setattr(translator.inference, "load", lambda *a, **k: table)
    out_json = tmp_path / "scores.json"
    args = ["scorecard", "--model", "m", "--data-dir", str(tmp_path), "--beam-sizes", "1,3",
            "--sets", "multi30k:val,multi30k", "--json", str(out_json)]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["test_set"], r["beam_size"]) for r in rows] == [
        ("multi30k.val", 1), ("multi30k.val", 3), ("multi30k.test", 1), ("multi30k.test", 3)
    ]  # fmt: skip
    # Each figure is what `evaluate` gives for that set and beam, and the beams reached the
    # translator.
    val_bleu = sacrebleu.corpus_bleu([HYPOTHESES[i % 4] for i in range(5)], [val[1]]).score
    assert rows[0]["bleu"] == round(val_bleu, 2) and rows[2]["bleu"] == 100.0
    assert {c[1] for c in table.calls} == {1, 3}
    lines = captured.out.splitlines()
    assert (
        lines[0]
        == "| test set | sentences | greedy BLEU | greedy chrF | beam 3 BLEU | beam 3 chrF |"
    )
    assert lines[2].startswith(f"| multi30k.val | 5 | {val_bleu:.2f} |")
    assert lines[3].startswith("| multi30k.test | 4 | 100.00 | 100.00 | 100.00 |")
    assert "[4/4] multi30k.test, beam 3: BLEU 100.00" in captured.err  # progress
    assert format_scorecard(rows) in captured.out
    # --limit takes the first sentences of each set.
    assert main([*args[:-2], "--limit", "2", "--beam-sizes", "1"]) == 0
    assert "| multi30k.val | 2 |" in capsys.readouterr().out
    # Errors name what is wrong, before the model loads.
    assert parse_test_sets("news:newstest2013, tatoeba") == [
        ("news", "newstest2013"), ("tatoeba", "test")
    ]  # fmt: skip
    for bad, message in (
        (["--sets", "multi30k:val:x"], "write corpus:split"),
        (["--sets", "multi30k:"], "write corpus:split"),
        (["--sets", "multi30k,multi30k:test"], "listed twice"),
        (["--sets", "tatoeba:test"], "tatoeba"),  # no Tatoeba file in this data dir
        (["--beam-sizes", "1,x"], "give integers"),
        (["--beam-sizes", "0"], "between 1 and 64"),
        (["--beam-sizes", "1,65"], "between 1 and 64"),  # before beam 1 runs anything
        (["--sets", ""], "write corpus:split"),  # not the default sets
    ):
        table.calls.clear()
        assert main(["scorecard", "--model", "m", "--data-dir", str(tmp_path), *bad]) == 2
        err = capsys.readouterr().err
        assert "translator scorecard: error:" in err and message in err, err
        assert table.calls == []
    assert scorecard(table, [], [1]) == []
    # Signatures that differ (Tatoeba has several references) are each listed with their sets.
    two = [dict(rows[0]), dict(rows[2], test_set="tatoeba.test", bleu_signature="nrefs:var|x")]
    text = format_scorecard(two)
    assert f"BLEU (multi30k.val): {rows[0]['bleu_signature']}" in text
    assert "BLEU (tatoeba.test): nrefs:var|x" in text
    assert f"chrF: {rows[0]['chrf_signature']}" in text  # one chrF signature: no labels
