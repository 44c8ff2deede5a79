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


def test_early_stopping_is_a_translator_option(tiny_export_dir):
    from translator.inference import load

    texts = ["one red cat", "big house", "two small dogs"]
    exact = load(tiny_export_dir, early_stopping="exact").translate(texts, length_penalty=0.0)
    heuristic = load(tiny_export_dir).translate(texts, length_penalty=0.0)
    assert load(tiny_export_dir).early_stopping == "heuristic"  # the config default
    # Without a length penalty both rules stop at the same step (test_decoding shows the rest).
    assert [r.n_best for r in heuristic] == [r.n_best for r in exact]
    with pytest.raises(ValueError, match="early_stopping must be one of exact, heuristic"):
        load(tiny_export_dir, early_stopping="never")


def test_projection_dtype_is_a_translator_option(tiny_export_dir):
    from translator.inference import load

    texts = ["one red cat", "big house", "two small dogs"]
    assert load(tiny_export_dir).projection_dtype is None  # the config default: the model's
    exact = load(tiny_export_dir, projection_dtype="float32").translate(texts, beam_size=3)
    rounded = load(tiny_export_dir, projection_dtype="bfloat16").translate(texts, beam_size=3)
    # bfloat16 rounding moves scores by little (whether a near-tie flips is the model's business).
    for a, b in zip(exact, rounded, strict=True):
        if a.text == b.text:
            assert abs(a.score - b.score) < 0.05
    assert [a.score for a in exact] != [b.score for b in rounded]  # bfloat16 did run
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
    from translator.inference import load

    texts = ["one red cat", "big house", "two small dogs"]
    exact_translator = load(tiny_export_dir)
    assert exact_translator.compute_dtype is None  # the config default: the model's
    assert exact_translator.model.decoder.compute_dtype == "float32"
    fast_translator = load(tiny_export_dir, compute_dtype="bfloat16")
    assert fast_translator.model.decoder.compute_dtype == "bfloat16"
    exact = exact_translator.translate(texts, beam_size=3)
    fast = fast_translator.translate(texts, beam_size=3)
    for a, b in zip(exact, fast, strict=True):
        if a.text == b.text:
            assert abs(a.score - b.score) < 0.05
    assert [a.score for a in exact] != [b.score for b in fast]  # bfloat16 did run
    # auto: bfloat16 only where the CPU has bfloat16 matmuls.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert load(tiny_export_dir, compute_dtype="auto").model.decoder.compute_dtype == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert load(tiny_export_dir, compute_dtype="auto").model.decoder.compute_dtype == "float32"
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
