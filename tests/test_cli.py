"""`translator translate` and `export` from the command line, and the attention plot."""

import os
import subprocess
import sys

import numpy as np
import pytest


def cli(*args, stdin=None, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "translator.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_translate_reads_stdin_in_order_and_keeps_empty_lines(tiny_export_dir):
    from translator.inference import load

    lines = ["one red cat", "", "big house", "   ", "two small dogs"] * 30  # > one batch
    proc = cli("translate", "--model", str(tiny_export_dir), stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    results = load(tiny_export_dir).translate(["one red cat", "big house", "two small dogs"])
    expected = dict(zip(["one red cat", "big house", "two small dogs"], results, strict=True))
    for line, got in zip(lines, out, strict=False):
        assert got == (expected[line].text if line.strip() else "")


def test_translate_stdin_that_is_not_utf8_names_the_line_after_translating_the_rest(
    tiny_export_dir,
):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "translator.cli", "translate", "--model", str(tiny_export_dir)],
        input="one red cat\r\nbig house\nd\u00e9j\u00e0 vu\nlast\n".encode("latin-1"),
        capture_output=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.decode()
    assert "standard input, line 3, is not UTF-8" in err and "iconv" in err, err
    assert len(proc.stdout.decode().split("\n")) == 3  # lines 1 and 2 (\r\n ends a line too)


def test_stdin_lines_end_at_lf_or_crlf_and_stop_at_a_line_that_is_not_utf8(monkeypatch):
    import io

    from translator.cli import _stdin_lines

    raw = "one\r\n\ntwo\nd\u00e9j\u00e0\nnever read\n".encode("latin-1")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    *lines, error = _stdin_lines()
    assert lines == ["one", "", "two"] and isinstance(error, UnicodeDecodeError)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb"))  # a text stream without .buffer
    assert list(_stdin_lines()) == ["a", "b"]


def test_stdin_drops_a_byte_order_mark_opening_the_input_only(monkeypatch):
    import io

    from translator.cli import _stdin_lines

    # Notepad's "UTF-8 with BOM": the mark is not text, and must not reach the model.
    raw = "\ufeffone\r\n\ufefftwo\n".encode("utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert list(_stdin_lines()) == ["one", "\ufefftwo"]  # only the opening one is a mark


def test_translate_arguments_with_n_best_and_scores(tiny_export_dir):
    proc = cli(
        "translate", "--model", str(tiny_export_dir), "--beam-size", "3", "--n-best", "2",
        "--scores", "one red cat", "big house",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = proc.stdout.rstrip("\n").split("\n")
    assert len(rows) == 4  # two hypotheses for each of two sentences
    scores = [float(row.split("\t")[0]) for row in rows]
    assert scores[0] >= scores[1] and scores[2] >= scores[3]  # best first


def test_translate_rejects_bad_options_with_a_clear_error(tiny_export_dir, tmp_path):
    proc = cli("translate", "--model", str(tiny_export_dir), "--n-best", "4", "--beam-size", "2",
               "hello")  # fmt: skip
    assert proc.returncode == 2 and "n_best must be between 1 and beam_size" in proc.stderr
    proc = cli("translate", "--model", str(tmp_path / "missing"), "hello")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = cli("translate", "--model", str(tiny_export_dir), "--early-stopping", "never", "hi")
    assert proc.returncode == 2 and "invalid choice: 'never'" in proc.stderr


def test_decoding_options_out_of_range_are_refused(tiny_export_dir):
    from translator.inference import load

    translator = load(tiny_export_dir)
    for name, value in (("length_penalty", float("nan")), ("length_penalty", -1.0),
                        ("coverage_penalty", 6.0)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be between 0 and 5, got {value}"):
            translator.translate(["one red cat"], **{name: value})
    for beam_size in (0, 65):  # the config's range, 1-64
        with pytest.raises(ValueError, match=f"between 1 and 64, got {beam_size}"):
            load(tiny_export_dir, beam_size=beam_size)  # the default, e.g. for an export
        with pytest.raises(
            ValueError, match=f"beam_size must be between 1 and 64, got {beam_size}"
        ):
            translator.translate(["one red cat"], beam_size=beam_size)
    assert translator.translate(["one red cat"], length_penalty=5.0)[0].text


BF16 = 2.0**-8  # bfloat16's unit roundoff: the relative change of a rounding


def assert_bfloat16_scores_close(rounded, exact, factor):
    """Translations computed with bfloat16 matmuls against float32 ones: where the text is the
    same (at least once), the score (log-probability over length penalty) moves by at most
    `factor` roundings of its magnitude; and bfloat16 did run (some score moved)."""
    same = [(a, b) for a, b in zip(rounded, exact, strict=True) if a.text == b.text]
    assert same and all(b.text for _, b in same)  # something to compare, and not ""
    for a, b in same:
        assert abs(a.score - b.score) <= factor * BF16 * abs(b.score), (a, b)
    assert [a.score for a in rounded] != [b.score for b in exact]  # bfloat16 did run


def test_early_stopping_is_a_translator_option(tiny_export_dir):
    from translator.inference import load

    texts = ["one red cat", "big house", "two small dogs", "five blue cars", "green tree"]
    exact_translator = load(tiny_export_dir, early_stopping="exact")
    heuristic_translator = load(tiny_export_dir)
    assert heuristic_translator.early_stopping == "heuristic"  # the config default
    # Without a length penalty both rules stop at the same step.
    exact = exact_translator.translate(texts, length_penalty=0.0)
    heuristic = heuristic_translator.translate(texts, length_penalty=0.0)
    assert [r.n_best for r in heuristic] == [r.n_best for r in exact]
    # With a strong one, a longer hypothesis can win after the heuristic has stopped: "exact"
    # keeps searching until none can (here, to the length limit) and so never scores less.
    exact = exact_translator.translate(texts, beam_size=3, length_penalty=5.0)
    heuristic = heuristic_translator.translate(texts, beam_size=3, length_penalty=5.0)
    for a, b in zip(exact, heuristic, strict=True):
        assert a.score >= b.score - 1e-5, (a, b)
    assert any(a.score > b.score + 1e-3 for a, b in zip(exact, heuristic, strict=True))
    with pytest.raises(ValueError, match="early_stopping must be one of exact, heuristic"):
        load(tiny_export_dir, early_stopping="never")


def test_projection_dtype_is_a_translator_option(tiny_export_dir):
    from translator.inference import load

    texts = ["one red cat", "big house", "two small dogs"]
    assert load(tiny_export_dir).projection_dtype is None  # the config default: the model's
    exact = load(tiny_export_dir, projection_dtype="float32").translate(texts, beam_size=3)
    rounded = load(tiny_export_dir, projection_dtype="bfloat16").translate(texts, beam_size=3)
    # bfloat16 rounding moves scores by little (whether a near-tie flips is the model's business).
    assert_bfloat16_scores_close(rounded, exact, factor=4)
    with pytest.raises(ValueError, match="projection_dtype must be one of None, float32, bf"):
        load(tiny_export_dir, projection_dtype="float16")
    proc = cli("translate", "--model", str(tiny_export_dir), "--projection-dtype", "bfloat16",
               "--scores", *texts)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [row.split("\t")[1] for row in proc.stdout.rstrip("\n").split("\n")] == [
        r.text for r in rounded
    ]


def test_compute_dtype_is_a_translator_option(tiny_export_dir, monkeypatch):
    from translator import hardware
    from translator.inference import load, resolve_compute_dtype

    texts = ["one red cat", "big house", "two small dogs"]
    exact_translator = load(tiny_export_dir)
    assert exact_translator.compute_dtype is None  # the config default: the model's
    assert exact_translator.model.decoder.compute_dtype == "float32"
    fast_translator = load(tiny_export_dir, compute_dtype="bfloat16")
    assert fast_translator.model.decoder.compute_dtype == "bfloat16"
    exact = exact_translator.translate(texts, beam_size=3)
    fast = fast_translator.translate(texts, beam_size=3)
    # Every matmul rounds here, not only the projection: a few more roundings.
    assert_bfloat16_scores_close(fast, exact, factor=8)
    # auto: adaptive (float32 for few rows, a bfloat16 copy for many) only where the CPU has
    # bfloat16 matmuls, float32 elsewhere (what adaptive decodes: tests/test_export.py).
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    adaptive = load(tiny_export_dir, compute_dtype="auto")
    assert adaptive.adaptive and adaptive.model.decoder.compute_dtype == "float32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert resolve_compute_dtype("auto") == "float32"
    with pytest.raises(ValueError, match="compute_dtype must be one of None, float32, bfloat16"):
        load(tiny_export_dir, compute_dtype="float16")
    proc = cli("translate", "--model", str(tiny_export_dir), "--compute-dtype", "bfloat16",
               "--scores", *texts)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [row.split("\t") for row in proc.stdout.rstrip("\n").split("\n")]
    assert [row[1] for row in rows] == [r.text for r in fast]
    np.testing.assert_allclose([float(row[0]) for row in rows], [r.score for r in fast], atol=1e-4)
    proc = cli("translate", "--model", str(tiny_export_dir), "--compute-dtype", "float16", "x")
    assert proc.returncode == 2 and "--compute-dtype: invalid choice: 'float16'" in proc.stderr


def test_plot_attention_draws_a_labelled_heatmap(tiny_export_dir, tmp_path):
    import matplotlib.image

    path = tmp_path / "attention.png"
    proc = cli("translate", "--model", str(tiny_export_dir), "--plot-attention", str(path),
               "one red cat and a big green house")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert np.std(image[..., :3]) > 0.05  # not a blank canvas


def test_plot_attention_draws_the_alignment_with_its_tokens(tiny_export_dir, tmp_path, monkeypatch):
    """What the figure holds before it is written: the heatmap's values are the alignment, on
    a fixed 0..1 colour scale, and the ticks are labelled with the source (x) and target (y)
    subwords, one per row and column."""
    from translator import plotting
    from translator.inference import load

    result = load(tiny_export_dir).translate("one red cat", return_alignment=True)
    assert result.alignment.shape == (len(result.target_tokens), len(result.source_tokens))
    assert result.alignment.max() > 0.2 and result.target_tokens != ["</s>"]  # worth drawing
    drawn = {}
    save = plotting._save_figure

    def inspect_then_save(fig, path, dpi):
        ax = fig.axes[0]
        (image,) = ax.images
        drawn["values"] = np.asarray(image.get_array())
        drawn["clim"] = image.get_clim()
        drawn["x"] = [
            (t, label.get_text())
            for t, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)
        ]
        drawn["y"] = [
            (t, label.get_text())
            for t, label in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)
        ]
        drawn["title"] = ax.get_title()
        save(fig, path, dpi)

    monkeypatch.setattr(plotting, "_save_figure", inspect_then_save)
    path = plotting.plot_attention(result, tmp_path / "attention.png")
    assert path.is_file()
    np.testing.assert_array_equal(drawn["values"], result.alignment.astype(np.float32))
    assert drawn["clim"] == (0.0, 1.0)

    def label(piece):  # word starts (U+2581) are drawn as a wide space, a lone one as a bar
        return "\u2423" if piece == "\u2581" else piece.replace("\u2581", "\u2002")

    assert drawn["x"] == [(i, label(t)) for i, t in enumerate(result.source_tokens)]
    assert drawn["y"] == [(i, label(t)) for i, t in enumerate(result.target_tokens)]
    assert drawn["title"] == result.text


def test_plot_attention_checks_its_input(tmp_path):
    from translator.inference import Translation
    from translator.plotting import plot_attention

    with pytest.raises(ValueError, match="return_alignment=True"):
        plot_attention(Translation("x", 0.0), tmp_path / "a.png")
    bad = Translation("x", 0.0, source_tokens=["a"], target_tokens=["b", "c"],
                      alignment=np.ones((1, 1)))  # fmt: skip
    with pytest.raises(ValueError, match="does not match"):
        plot_attention(bad, tmp_path / "a.png")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_command_writes_a_version(tiny_run_dir, tmp_path):
    proc = cli("export", "--model", str(tiny_run_dir), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "m" / "1" / "saved_model.pb").is_file()
    proc = cli("export", "--model", str(tiny_run_dir), "--out", str(tmp_path / "m"),
               "--version", "1")  # fmt: skip
    assert proc.returncode == 2 and "exists already" in proc.stderr
