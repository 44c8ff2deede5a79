"""Training: an end-to-end tiny run, exact resume after SIGKILL, broken checkpoints, bad run dirs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import tiny_overrides, write_corpus
from translator import checkpoint as ckpt
from translator.config import load_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run_cli(args, env=None, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TRANSLATOR_QUIET": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "translator.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def history(run_dir):
    latest = ckpt.list_checkpoints(Path(run_dir) / "checkpoints")[-1]
    return json.loads((latest / "state.json").read_text())["history"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    sets = [a for s in tiny_overrides(corpus) for a in ("--set", s)]
    proc = run_cli(["train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *sets])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return run_dir, out


def test_tiny_run_learns_and_writes_a_complete_run_dir(uninterrupted):
    run_dir, out = uninterrupted
    for name in ["config.yaml", "spm.model", "model.keras", "summary.json", "logs"]:
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40
    losses = [h["loss"] for h in history(run_dir)]
    assert losses[-1] < 0.75 * losses[0]  # it learns
    assert all("val_bleu" in h and "tokens_per_second" in h for h in history(run_dir))
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.training.max_steps == 40  # the resolved config, overrides included
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))  # TensorBoard


def test_translate_with_the_trained_run(uninterrupted):
    from translator.inference import load

    run_dir, _ = uninterrupted
    translator = load(run_dir)
    result = translator.translate(["red cat", "big house"], beam_size=2, n_best=2)
    assert len(result) == 2 and all(len(r.n_best) == 2 for r in result)
    assert all(isinstance(r.text, str) for r in result)


def test_sigkill_and_resume_gives_the_same_loss_curve(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    sets = [a for s in tiny_overrides(corpus) for a in ("--set", s)]
    args = ["train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *sets]
    proc = run_cli(args)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints" / "ckpt-00000020").is_dir():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model.keras").exists()
    resumed = run_cli([*args, "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    expected = [h["loss"] for h in history(uninterrupted[0])]
    got = [h["loss"] for h in history(run_dir)]
    assert len(got) == len(expected) == 4
    np.testing.assert_allclose(got, expected, rtol=2e-3)


def test_existing_run_without_resume_is_refused(uninterrupted):
    run_dir, _ = uninterrupted
    proc = run_cli(["train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir)])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "--resume" in out


def test_corrupt_checkpoint_falls_back_to_the_previous_good_one(uninterrupted, tmp_path, caplog):
    import shutil

    from translator.config import load_config as load
    from translator.training import build_model, compile_model

    run_dir, _ = uninterrupted
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", checkpoints)
    paths = ckpt.list_checkpoints(checkpoints)
    assert len(paths) >= 2
    latest, previous = paths[-1], paths[-2]
    weights = latest / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # torn write

    from translator.tokenizer import SentencePieceTokenizer

    config = load(run_dir / "config.yaml")
    vocab = SentencePieceTokenizer(model_path=str(run_dir / "spm.model")).vocabulary_size()
    model = compile_model(build_model(config, vocab, vocab), config)
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.verify_checkpoint(latest)
    path, state = ckpt.restore_latest(checkpoints, model, model.optimizer)
    assert path == previous and state["step"] == int(previous.name.split("-")[1])
    assert int(model.optimizer.iterations.numpy()) == state["step"]
    assert "skipping unusable checkpoint" in caplog.text

    (previous / "manifest.json").unlink()  # a checkpoint whose writer died before the end
    for other in paths[:-2]:
        shutil.rmtree(other)
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.restore_latest(checkpoints, model, model.optimizer)


def test_average_checkpoints_is_the_mean_of_their_weights(uninterrupted, tmp_path):
    import keras

    from translator.inference import load
    from translator.training import average_checkpoints

    run_dir, _ = uninterrupted
    paths = ckpt.list_checkpoints(run_dir / "checkpoints")[-2:]
    out = average_checkpoints(run_dir, 2, tmp_path / "avg")
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    expected = []
    for path in paths:
        model.load_weights(path / "model.weights.h5")
        expected.append(model.get_weights())
    averaged = keras.saving.load_model(out / "model.keras", compile=False).get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(*expected, strict=True))  # they differ
    for got, a, b in zip(averaged, *expected, strict=True):
        np.testing.assert_allclose(got, (a.astype(np.float64) + b) / 2, rtol=1e-6, atol=1e-7)
    record = json.loads((out / "average.json").read_text())
    assert [c["name"] for c in record["checkpoints"]] == [p.name for p in paths]
    assert load(out).translate(["one red cat"])[0].text == load(out).translate("one red cat").text

    proc = run_cli(["average", "--run-dir", str(run_dir), "--last", "99"])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "fewer than --last 99" in output, output
    assert not (run_dir / "averaged-99").exists()

    # Never over a model: not the run's own model.keras, not another model directory's.
    before = (run_dir / "model.keras").read_bytes()
    for target in (run_dir, out):
        with pytest.raises(FileExistsError, match=f"--out {target} already holds a model.keras"):
            average_checkpoints(run_dir, 1, target)
    assert (run_dir / "model.keras").read_bytes() == before


def test_average_names_a_checkpoint_pruned_after_its_verification(
    uninterrupted, tmp_path, monkeypatch
):
    import shutil

    from translator.training import average_checkpoints

    run_dir, _ = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest = ckpt.list_checkpoints(copy / "checkpoints")[-1]
    verify = ckpt.verify_checkpoint

    def verify_then_prune(path):  # a running training prunes it once it has been verified
        state = verify(path)
        if path == newest:
            shutil.rmtree(path)
        return state

    monkeypatch.setattr(ckpt, "verify_checkpoint", verify_then_prune)
    with pytest.raises(ckpt.CheckpointError, match=f"{newest.name} was removed while it was"):
        average_checkpoints(copy, 2, tmp_path / "avg")
    assert not (tmp_path / "avg").exists()  # nothing half-written

    model = copy / "model.keras"  # cut short: named as such, not Keras' "File not found"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot load {model} \\(it is not a complete .keras"):
        average_checkpoints(copy, 1, tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_time_limit_stops_at_the_step_not_at_the_next_checkpoint(corpus, tmp_path):
    from translator.training import train

    overrides = {
        "training.max_steps": "100000",
        "training.steps_per_checkpoint": "50000",  # far beyond what 15 seconds can train
        "training.time_limit_minutes": "0.25",
    }
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **overrides))
    os.environ["TRANSLATOR_QUIET"] = "1"
    summary = train(config, tmp_path / "run")
    paths = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in paths] == [f"ckpt-{summary['steps']:08d}"]
    assert 0 < summary["steps"] < 50000
    # Stopped at the first step past 15 s: the recorded training time is 15 s plus one step.
    assert 15 <= summary["train_seconds"] < 20
    state = ckpt.verify_checkpoint(paths[0])
    assert state["step"] == summary["steps"] and "val_bleu" in state["history"][-1]


def test_unwritable_run_dir_fails_before_training(tmp_path, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_cli(
        ["train", "--config", "configs/tiny.yaml", "--run-dir", str(blocker / "run"),
         *[a for s in tiny_overrides(corpus) for a in ("--set", s)]]
    )  # fmt: skip
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "not writable" in out and "--run-dir" in out


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil

    from translator.training import check_run_dir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10 << 20))
    with pytest.raises(OSError, match="MiB free"):
        check_run_dir(tmp_path / "run")


def test_rescore_scores_each_checkpoint_as_evaluate_does(uninterrupted, corpus):
    from translator.evaluation import evaluate
    from translator.inference import load
    from translator.training.rescoring import rescore_checkpoints

    run_dir, _ = uninterrupted
    before = (run_dir / "model.keras").read_bytes()
    extra = f"data.extra_validation=[{{corpus: '{corpus}', split: train, size: 12, name: t12}}]"
    result = rescore_checkpoints(run_dir, [extra], last=2, out=None)
    paths = ckpt.list_checkpoints(run_dir / "checkpoints")[-2:]
    assert [r["checkpoint"] for r in result["rows"]] == [p.name for p in paths]
    assert result["sets"] == [f"{corpus}.val", "t12"] and not result["kept"]
    # The reference: each checkpoint's weights in a freshly loaded translator, through evaluate.
    reference = load(run_dir)
    val = [line.strip() for line in open(corpus.split(":", 1)[1].split(",")[0].format(split="val"))]
    val_fr = corpus.split(",")[1].format(split="val")
    train = corpus.split(":", 1)[1].split(",")[0].format(split="train")
    train_fr = corpus.split(",")[1].format(split="train")
    sets = {
        f"{corpus}.val": (val, [[f.strip()] for f in open(val_fr)]),
        "t12": (
            [e.strip() for e in open(train)][:12],
            [[f.strip()] for f in open(train_fr)][:12],
        ),
    }
    for row, path in zip(result["rows"], paths, strict=True):
        reference.model.load_weights(path / "model.weights.h5")
        for name, (sources, references) in sets.items():
            expected = evaluate(reference, sources, references, progress=False)["bleu"]
            assert row["bleu"][name] == pytest.approx(expected, abs=0.01), (path.name, name)
        assert row["mean"] == pytest.approx(sum(row["bleu"].values()) / 2, abs=0.01)
    assert (run_dir / "model.keras").read_bytes() == before  # without --keep-best: read-only
    assert not (run_dir / "rescore.json").exists()


def test_rescore_keep_best_writes_the_best_mean_as_model_keras(uninterrupted, tmp_path):
    import shutil

    import keras

    import translator.scoring
    from translator.training import RunDirLock
    from translator.training.rescoring import rescore_checkpoints

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    paths = ckpt.list_checkpoints(run_dir / "checkpoints")
    trained_best = json.loads((run_dir / "summary.json").read_text())["best_step"]
    # Scripted BLEU: the best is a checkpoint other than the one training kept as model.keras
    # (the newest of the others), and a tie with it comes later: the older one wins ties.
    chosen = [p for p in paths if p.name != f"ckpt-{trained_best:08d}"][-1]
    values = {p.name: 10.0 for p in paths}
    values[chosen.name] = 40.0
    if chosen != paths[-1]:
        values[paths[-1].name] = 40.0
    scripted = iter([values[p.name] for p in paths])

    class Score:
        def __init__(self, value):
            self.score = value

    def bleu_chrf(hypotheses, references):
        return Score(next(scripted)), Score(0.0), "", ""

    before = (run_dir / "model.keras").read_bytes()
    training = RunDirLock(run_dir)  # a training running there: refused, nothing written
    training.acquire()
    try:
        with pytest.raises(OSError, match="in use by another training"):
            rescore_checkpoints(run_dir, keep_best=True, out=None)
    finally:
        training.release()
    assert not (run_dir / "rescore.json").exists()
    assert (run_dir / "model.keras").read_bytes() == before
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(translator.scoring, "bleu_chrf", bleu_chrf)
        result = rescore_checkpoints(run_dir, keep_best=True, out=None)
    assert result["best"]["checkpoint"] == chosen.name and result["kept"]
    assert (run_dir / "model.keras").read_bytes() != before
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    kept = model.get_weights()
    model.load_weights(chosen / "model.weights.h5")
    for got, expected in zip(kept, model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
    record = json.loads((run_dir / "rescore.json").read_text())
    assert record["best"]["checkpoint"] == chosen.name
    assert [r["mean"] for r in record["rows"]] == [values[p.name] for p in paths]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_step"] == int(chosen.name.split("-")[1])
    assert summary["best_val_bleu"] == 40.0 and "rescore" in summary["selected_by"]

    # A run without model.keras (still training, or killed) is rescored from its config.
    (run_dir / "model.keras").unlink()
    rows = rescore_checkpoints(run_dir, last=1, out=None)["rows"]
    reference = rescore_checkpoints(uninterrupted[0], last=1, out=None)["rows"]
    assert rows == reference

    proc = run_cli(["rescore", "--run-dir", str(tmp_path / "nothing")])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "is not a training run: it has no config.yaml" in out, out


def test_a_second_run_in_the_same_run_dir_is_refused_at_once(corpus, tmp_path):
    import socket

    run_dir = tmp_path / "shared"
    endless = {"training.max_steps": "100000", "training.early_stopping_patience": "0"}
    sets = [a for s in tiny_overrides(corpus, **endless) for a in ("--set", s)]
    args = ["train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *sets]
    first = run_cli(args)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "checkpoints" / "ckpt-00000010").is_dir():
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.05)
        config_before = (run_dir / "config.yaml").read_bytes()
        for extra in ([], ["--resume"]):
            assert first.poll() is None, first.communicate()[0]
            second = run_cli([*args, *extra])
            out, _ = second.communicate(timeout=300)
            assert second.returncode == 2, out
            # Names the directory, who holds it, and what to do.
            assert f"{run_dir} is in use" in out, out
            assert f"pid {first.pid}" in out and socket.gethostname() in out, out
            assert "--run-dir" in out
        assert first.poll() is None  # the first run goes on, untouched
        assert (run_dir / "config.yaml").read_bytes() == config_before
        for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointError:  # the run goes on, and may prune it before or as we read
                assert not path.exists()
    finally:
        first.kill()  # the process this test started
        first.wait()
    # Its lock went with it: the run resumes (and stops at once, at a lower max_steps).
    proc = run_cli([*args, "--resume", "--set", "training.max_steps=10"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out


def test_the_run_dir_lock_is_released_when_the_run_fails(corpus, tmp_path):
    from translator.corpora import DataError
    from translator.files import exclusive_lock
    from translator.training import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_config(
        "configs/tiny.yaml",
        tiny_overrides(
            corpus, **{"data.corpora": f"[{{name: 'files:{tmp_path}/no.en,{tmp_path}/no.fr'}}]"}
        ),
    )
    with pytest.raises(DataError, match="not found"):
        train(config, run_dir)  # fails once the lock is held (reading the corpus)
    with exclusive_lock(run_dir / ".lock"):  # free again
        pass


def test_resume_with_another_architecture_is_refused_before_writing(
    corpus, uninterrupted, tmp_path
):
    import shutil

    from translator.training import train

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)

    def files():
        return {
            str(p.relative_to(run_dir)): p.read_bytes()
            for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".lock"
        }

    before = files()
    changed = {"model.decoder_units": "48", "model.attention": "bahdanau", "model.dropout": "0.3"}
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **changed))
    with pytest.raises(ValueError, match=r"--resume") as refused:
        train(config, run_dir, resume=True)
    message = str(refused.value)
    assert "decoder_units: 32 there, 48 here" in message
    assert "attention: 'luong' there, 'bahdanau' here" in message
    assert "dropout: " not in message  # dropout may change on resume (as for init_from)
    assert files() == before  # config.yaml included: refused before anything was written
    # Only dropout changed: the run resumes (at its last step: nothing left to train).
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **{"model.dropout": "0.3"}))
    os.environ["TRANSLATOR_QUIET"] = "1"
    assert train(config, run_dir, resume=True)["steps"] == 40


def test_learning_rate_schedule_warmup_and_decay():
    from translator.training import WarmupSchedule

    schedule = WarmupSchedule(1e-3, warmup_steps=100, decay="inverse_sqrt")
    rates = [float(schedule(s)) for s in (0, 49, 99, 399)]
    np.testing.assert_allclose(rates, [1e-5, 5e-4, 1e-3, 5e-4], rtol=1e-5)
    cosine = WarmupSchedule(1e-3, 10, decay="cosine", total_steps=110, minimum=1e-5)
    np.testing.assert_allclose(float(cosine(59)), (1e-3 + 1e-5) / 2, rtol=1e-4)
    np.testing.assert_allclose(float(cosine(500)), 1e-5, rtol=1e-5)


def test_masked_cross_entropy_matches_hand_computation():
    import tensorflow as tf

    from translator.training import MaskedCrossEntropy

    logits = tf.constant([[[2.0, 0.0, 1.0], [0.5, 0.5, 0.0]]])
    labels = tf.constant([[2, 0]])  # the second token is PAD: ignored
    log_p = tf.nn.log_softmax(logits)[0, 0].numpy()
    eps = 0.1
    expected = -(1 - eps) * log_p[2] - eps * log_p.mean()
    got = MaskedCrossEntropy(label_smoothing=eps)(labels, logits)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_init_from_starts_from_the_trained_weights_and_vocabulary(corpus, uninterrupted, tmp_path):
    import keras

    from translator.training import train

    source, _ = uninterrupted
    overrides = {
        "training.max_steps": "10",
        "training.learning_rate": "1e-9",  # Adam moves each weight by at most ~1e-9 a step
        "training.min_learning_rate": "0",
        "training.seed": "3",
        "tokenizer.vocab_size": "70",  # ignored: the run reuses the source's vocabulary
        "training.init_from": str(source),
    }
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **overrides))
    os.environ["TRANSLATOR_QUIET"] = "1"
    summary = train(config, tmp_path / "ft")
    assert summary["steps"] == 10  # a fresh optimizer
    assert (tmp_path / "ft" / "spm.model").read_bytes() == (source / "spm.model").read_bytes()
    before = keras.saving.load_model(source / "model.keras", compile=False).get_weights()
    after = keras.saving.load_model(tmp_path / "ft" / "model.keras", compile=False).get_weights()
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # It starts trained: a random start predicts about uniformly over the 60 pieces (loss ln 60
    # = 4.09, and a learning rate of 1e-9 would keep it there); the source's first 10 steps
    # averaged 3.66 while it learned.
    loss = history(tmp_path / "ft")[0]["loss"]
    assert loss < 0.8 * np.log(60) and loss < history(source)[0]["loss"]


def test_init_from_refuses_another_architecture_or_vocabulary(corpus, uninterrupted, tmp_path):
    from translator.training import InitFromError, train

    source, _ = uninterrupted

    def config(**extra):
        settings = {"training.init_from": str(source), **extra}
        return load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))

    with pytest.raises(InitFromError, match=r"decoder_units: 32 there, 48 here"):
        train(config(**{"model.decoder_units": "48"}), tmp_path / "wide")
    assert not (tmp_path / "wide").exists()  # refused before writing anything
    # A .keras file is checked as strictly, also for what changes no weight shape.
    keras_file = str(source / "model.keras")
    with pytest.raises(InitFromError, match=r"residual: True there, False here"):
        train(
            config(**{"training.init_from": keras_file, "model.residual": "false"}), tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()
    with pytest.raises(InitFromError, match="does not exist"):
        train(config(**{"training.init_from": str(tmp_path / "nowhere")}), tmp_path / "none")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "spm.model").write_bytes(b"another vocabulary")
    with pytest.raises(InitFromError, match="another SentencePiece model"):
        train(config(), tmp_path / "other")
    assert (tmp_path / "other" / "spm.model").read_bytes() == b"another vocabulary"

    proc = run_cli(
        ["train", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "cli"),
         "--init-from", str(tmp_path / "no #where"),
         *[a for s in tiny_overrides(corpus) for a in ("--set", s)]]
    )  # fmt: skip
    out, _ = proc.communicate(timeout=300)
    # The path is taken as it is, not as YAML (where " #" starts a comment).
    assert proc.returncode == 2 and "training.init_from" in out and "no #where" in out, out


def test_plot_training_draws_the_run_history(uninterrupted, tmp_path):
    import matplotlib.image

    from translator.plotting import plot_training, training_history

    run_dir, _ = uninterrupted
    history = training_history(run_dir)
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    path = plot_training(run_dir, tmp_path / "curve.png", step_offset=100, baseline=("base", 1.0))
    assert matplotlib.image.imread(path).shape[:2] == (432, 1200)  # 10 x 3.6 inches at 120 dpi
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        training_history(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        plot_training([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
    with pytest.raises(ValueError, match=r"curve: end the file name with one of \.png, \.svg"):
        plot_training(history, tmp_path / "curve")  # no extension: no format
    assert not (tmp_path / "curve").exists()
    state = tmp_path / "nohistory" / "checkpoints" / "ckpt-00000010" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"step": 10}')
    with pytest.raises(ValueError, match=f"{state} holds no training history"):
        training_history(tmp_path / "nohistory")

    proc = run_cli(["plot-training", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x.png")])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "no checkpoints" in out, out


def test_max_steps_holds_to_the_step(corpus, tmp_path):
    from translator.training import train

    os.environ["TRANSLATOR_QUIET"] = "1"
    settings = {"training.max_steps": "25", "training.steps_per_checkpoint": "10"}
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 25  # not 30, the next multiple of steps_per_checkpoint
    assert [h["step"] for h in history(tmp_path / "run")] == [10, 20, 25]
    # A longer max_steps resumes from the cut-short chunk and still ends exactly on it.
    settings["training.max_steps"] = "32"
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
    assert train(config, tmp_path / "run", resume=True)["steps"] == 32
    assert [h["step"] for h in history(tmp_path / "run")] == [10, 20, 25, 32]
    # Resuming a run that is already at max_steps trains nothing.
    assert train(config, tmp_path / "run", resume=True)["steps"] == 32
    # With validation every other checkpoint, the last step is validated all the same.
    settings["training.validate_every"] = "2"
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
    train(config, tmp_path / "sparse")
    validated = [h["step"] for h in history(tmp_path / "sparse") if "val_bleu" in h]
    assert validated == [20, 32]


def test_auto_precision_and_xla_resolution(tmp_path, monkeypatch):
    from translator import hardware
    from translator.training import resolve_jit_compile

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse avx512f amx_bf16 amx_tile\n")
    assert hardware.cpu_flags(str(cpuinfo)) >= {"amx_bf16", "avx512f"}
    assert hardware.cpu_flags(str(tmp_path / "missing")) == set()

    monkeypatch.setattr(hardware, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert hardware.resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert hardware.resolve_precision("auto") == "float32"
    assert hardware.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    # With GPUs, their compute capability decides (bfloat16 tensor cores from 8.0 on).
    monkeypatch.setattr(hardware, "gpu_compute_capabilities", lambda: [(8, 0), (9, 0)])
    assert hardware.resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(hardware, "gpu_compute_capabilities", lambda: [(8, 0), (7, 5)])
    assert hardware.resolve_precision("auto") == "float32"

    resolve = resolve_jit_compile
    assert resolve("auto", "float32", distributed=False) is True
    assert resolve("auto", "mixed_bfloat16", distributed=False) is False
    assert resolve(True, "mixed_bfloat16", distributed=False) is True  # asked for: kept
    assert resolve(False, "float32", distributed=False) is False
    assert resolve(True, "float32", distributed=True) is False  # never under a strategy
    assert resolve("auto", "float32", distributed=True) is False


def test_compile_model_resolves_auto_xla_for_the_dtype_policy():
    from translator.training import build_model, compile_model, dtype_policy

    config = load_config(
        None,
        [
            "model.embedding_dim=8",
            "model.encoder_units=8",
            "model.decoder_units=8",
            "model.encoder_layers=1",
            "model.decoder_layers=1",
        ],
    )
    assert config.training.jit_compile == "auto"
    assert compile_model(build_model(config, 20, 20), config).jit_compile is True
    with dtype_policy("mixed_bfloat16"):
        model = build_model(config, 20, 20)
    assert compile_model(model, config).jit_compile is False  # the model's policy decides


def test_train_leaves_the_global_dtype_policy_as_it_found_it(corpus, tmp_path, monkeypatch):
    import keras

    from translator.training import train
    from translator.training.callback import TrainingMonitor

    os.environ["TRANSLATOR_QUIET"] = "1"
    settings = {
        "training.precision": "mixed_bfloat16",
        "training.max_steps": "2",
        "training.steps_per_checkpoint": "2",
        # Another dtype than training's: decoding it would need a copy of the model, which
        # validation must not decode (it would score the first weights for the whole run).
        "decoding.compute_dtype": "float32",
    }
    validated = []

    def score(monitor, sources, references):
        validated.append(monitor.translator.model is monitor.model)
        return 1.0

    monkeypatch.setattr(TrainingMonitor, "score", score)
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
    before = keras.config.dtype_policy().name
    summary = train(config, tmp_path / "run")
    assert validated == [True]  # validation decoded the model being trained
    assert summary["precision"] == "mixed_bfloat16" and summary["steps"] == 2
    assert keras.config.dtype_policy().name == before
    model = keras.saving.load_model(tmp_path / "run" / "model.keras", compile=False)
    assert model.dtype_policy.name == "float32"  # saved as a float32 model all the same


# -- the best checkpoint, early stopping and pruning, on a scripted validation BLEU ----------

SCRIPTED_BLEU = [10.0, 30.0, 20.0, 15.0, 12.0, 11.0, 10.0, 9.0]


@pytest.fixture(scope="module")
def scripted_run(corpus, tmp_path_factory):
    """A run whose validation BLEU goes up then down, as scripted: best at step 20."""
    from translator.training import train
    from translator.training.callback import TrainingMonitor

    scores = iter(SCRIPTED_BLEU)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingMonitor, "score", lambda self, sources, refs: next(scores))
        patch.setenv("TRANSLATOR_QUIET", "1")
        settings = {
            "training.max_steps": "200",
            "training.steps_per_checkpoint": "10",
            "training.early_stopping_patience": "3",
            "training.keep_checkpoints": "1",
        }
        config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
        run_dir = tmp_path_factory.mktemp("scripted") / "run"
        summary = train(config, run_dir)
    return run_dir, summary


def test_early_stopping_after_patience_validations_without_gain(scripted_run):
    run_dir, summary = scripted_run
    # 10, 30 (best), then 20, 15, 12: three validations without gain stop the run at step 50.
    assert summary["steps"] == 50
    assert [h["val_bleu"] for h in history(run_dir)] == SCRIPTED_BLEU[:5]
    assert summary["best_val_bleu"] == 30.0 and summary["best_step"] == 20
    state = json.loads((run_dir / "checkpoints" / "ckpt-00000050" / "state.json").read_text())
    assert state["stale"] == 3 and state["best_step"] == 20


def test_model_keras_holds_the_best_checkpoint_which_survives_pruning(scripted_run):
    import keras

    run_dir, _ = scripted_run
    # keep_checkpoints=1 keeps the newest, and the best besides it.
    paths = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in paths] == ["ckpt-00000020", "ckpt-00000050"]
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    saved = model.get_weights()
    model.load_weights(run_dir / "checkpoints" / "ckpt-00000020" / "model.weights.h5")
    best = model.get_weights()
    model.load_weights(run_dir / "checkpoints" / "ckpt-00000050" / "model.weights.h5")
    last = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(best, last, strict=True))
    for got, expected in zip(saved, best, strict=True):
        np.testing.assert_array_equal(got, expected)


# Two validation sets whose best steps differ: the first set alone would pick step 10; their
# mean (20, 30, 25, 15) picks step 20.
SCRIPTED_SETS = {"first": [30.0, 20.0, 22.0, 10.0], "second": [10.0, 40.0, 28.0, 20.0]}


def test_several_validation_sets_pick_the_best_checkpoint_by_their_mean(corpus, tmp_path):
    import tensorflow as tf

    from translator.training import train
    from translator.training.callback import TrainingMonitor

    seen = []

    def score(monitor, sources, references):
        # Which set is scored, from its size: the first set is the whole val split (24
        # sentences), the second the first 5 training pairs.
        name = "first" if len(sources) == 24 else "second"
        seen.append((name, len(sources), len(references)))
        return SCRIPTED_SETS[name][sum(n == name for n, *_ in seen) - 1]

    settings = {
        "data.extra_validation": f"[{{corpus: '{corpus}', split: train, size: 5, name: second}}]",
        "training.keep_checkpoints": "1",
    }
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingMonitor, "score", score)
        patch.setenv("TRANSLATOR_QUIET", "1")
        summary = train(config, tmp_path / "run")
    assert seen == [("first", 24, 24), ("second", 5, 5)] * 4  # both sets at every validation
    records = history(tmp_path / "run")
    assert [h["val_bleu"] for h in records] == [20.0, 30.0, 25.0, 15.0]
    first_name = f"{corpus}.val"
    assert [h["val_bleu_sets"] for h in records] == [
        {first_name: a, "second": b}
        for a, b in zip(SCRIPTED_SETS["first"], SCRIPTED_SETS["second"], strict=True)
    ]
    assert summary["best_step"] == 20 and summary["best_val_bleu"] == 30.0
    assert summary["best_val_bleu_sets"] == {first_name: 20.0, "second": 40.0}
    # keep_checkpoints=1 keeps the newest and the best by the mean, not by the first set.
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["ckpt-00000020", "ckpt-00000040"]
    # TensorBoard has each set's BLEU besides the mean.
    tags = {}
    for path in (tmp_path / "run" / "logs").glob("events.out.tfevents.*"):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(
                    float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else None
                )
    assert tags["val_bleu"] == [20.0, 30.0, 25.0, 15.0]
    assert tags["val_bleu/second"] == SCRIPTED_SETS["second"]
    assert tags[f"val_bleu/{first_name}"] == SCRIPTED_SETS["first"]


def test_resume_with_other_validation_sets_starts_the_best_afresh(corpus, tmp_path, caplog):
    import logging

    from translator.training import train
    from translator.training.callback import TrainingMonitor

    first = iter([30.0, 20.0])
    config = load_config(
        "configs/tiny.yaml", tiny_overrides(corpus, **{"training.max_steps": "20"})
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingMonitor, "score", lambda self, sources, refs: next(first))
        patch.setenv("TRANSLATOR_QUIET", "1")
        assert train(config, tmp_path / "run")["best_step"] == 10
        # Resumed with a second set: means of 10 (steps 30 and 40) must not lose to the one-set
        # 30 of step 10, a figure of another measure.
        more = f"[{{corpus: '{corpus}', split: train, size: 5, name: second}}]"
        settings = {"training.max_steps": "40", "data.extra_validation": more}
        config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
        second = iter([5.0, 15.0, 8.0, 12.0])
        patch.setattr(TrainingMonitor, "score", lambda self, sources, refs: next(second))
        with caplog.at_level(logging.WARNING, logger="translator.training.callback"):
            summary = train(config, tmp_path / "run", resume=True)
    assert "the validation sets changed" in caplog.text
    assert summary["best_step"] == 30 and summary["best_val_bleu"] == 10.0


def test_validation_sets_with_the_same_name_are_refused(corpus):
    from translator.config import ConfigError

    twice = f"[{{corpus: '{corpus}', split: val}}]"
    with pytest.raises(ConfigError, match=r"two validation sets are named .*give it another split"):
        load_config("configs/tiny.yaml", tiny_overrides(corpus, **{"data.extra_validation": twice}))


def test_an_empty_extra_validation_set_is_refused_before_training(corpus, tmp_path):
    from translator.training import train

    (tmp_path / "empty.en").write_text("")
    (tmp_path / "empty.fr").write_text("")
    empty = f"files:{tmp_path}/empty.en,{tmp_path}/empty.fr"
    more = f"[{{corpus: '{empty}', split: val, name: empty}}]"
    config = load_config(
        "configs/tiny.yaml", tiny_overrides(corpus, **{"data.extra_validation": more})
    )
    with pytest.raises(ValueError, match=r"empty\.en .*: no usable sentence pairs"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plot_training_draws_each_validation_set(tmp_path):
    from translator.plotting import plot_training

    records = [
        {"step": s, "loss": 3.0 - s / 100, "val_bleu": m, "val_bleu_sets": {"a": a, "b": b}}
        for s, m, a, b in ((10, 20.0, 30.0, 10.0), (20, 30.0, 20.0, 40.0))
    ]
    import matplotlib.pyplot as plt

    drawn = []
    original = plt.Axes.plot

    def plot(ax, *args, **kwargs):
        drawn.append((kwargs.get("label"), [list(a) for a in args[:2]]))
        return original(ax, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Axes, "plot", plot)
        plot_training(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    bleu_lines = {label: xy for label, xy in drawn if label is not None}
    assert bleu_lines == {
        "mean of the sets": [[10, 20], [20.0, 30.0]],
        "a": [[10, 20], [30.0, 20.0]],
        "b": [[10, 20], [10.0, 40.0]],
    }


# -- the loss against NumPy ------------------------------------------------------------------


def numpy_masked_cross_entropy(labels, logits, eps, pad_id=0):
    """Label-smoothed cross-entropy per real token, in float64: the smoothed target puts
    1 - eps + eps/V on the label and eps/V on every other piece (as Keras' label_smoothing)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # (B, T, V)
    vocab = logits.shape[-1]
    target = np.full(log_p.shape, eps / vocab)
    np.put_along_axis(target, labels[..., None], 1 - eps + eps / vocab, axis=-1)
    per_token = -(target * log_p).sum(-1)  # (B, T)
    mask = labels != pad_id
    return per_token[mask].sum() / mask.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_cross_entropy_is_the_mean_over_real_tokens(eps):
    import keras
    import tensorflow as tf

    from translator.training import MaskedCrossEntropy

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(3, 6, 11)).astype(np.float32)
    labels = rng.integers(1, 11, size=(3, 6))
    labels[0, 4:] = 0  # 4 real tokens, then PAD
    labels[1, 1:] = 0  # 1 real token
    # the third sequence has 6 real tokens: 11 in all, out of 18 positions
    got = float(MaskedCrossEntropy(label_smoothing=eps)(tf.constant(labels), tf.constant(logits)))
    expected = numpy_masked_cross_entropy(labels, logits, eps)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Keras' own smoothed cross-entropy, summed over the real tokens, divided by their count.
    keras_loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=eps, reduction="sum"
    )
    mask = (labels != 0).astype(np.float32)
    total = keras_loss(np.eye(11)[labels], logits, sample_weight=mask)
    np.testing.assert_allclose(got, float(total) / mask.sum(), rtol=1e-5)
    # PAD logits do not matter; PAD labels would.
    changed = logits.copy()
    changed[labels == 0] += rng.normal(0, 5, size=changed[labels == 0].shape)
    again = MaskedCrossEntropy(label_smoothing=eps)(tf.constant(labels), tf.constant(changed))
    np.testing.assert_allclose(float(again), got, rtol=1e-6)


# -- checkpoint atomicity --------------------------------------------------------------------


class Crash(Exception):
    """The process dying at this point."""


class Module:
    """A stand-in for a module imported by the code under test, with some names replaced."""

    def __init__(self, module, **replaced):
        self.module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self.module, name)


@pytest.mark.parametrize("crash_in", ["write", "rename"])
def test_a_crash_while_checkpointing_leaves_no_checkpoint(crash_in, tmp_path, monkeypatch):
    import shutil

    import keras

    from translator import files

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(directory, 10, model, optimizer, {"history": []})
    saved = model.get_weights()

    def crash(*args, **kwargs):
        raise Crash(f"killed in the {crash_in}")

    # The process dies writing the optimizer state (after the weights), or in the rename that
    # ends the write: nothing after it runs, so nothing is cleaned up.
    if crash_in == "write":
        monkeypatch.setattr(ckpt, "np", Module(np, savez=crash))
    else:
        monkeypatch.setattr(files, "os", Module(os, replace=crash))
    monkeypatch.setattr(files, "shutil", Module(shutil, rmtree=lambda *a, **k: None))
    model.set_weights([w + 1 for w in saved])
    with pytest.raises(Crash):
        ckpt.save_checkpoint(directory, 20, model, optimizer, {"history": []})
    monkeypatch.undo()

    assert not (directory / "ckpt-00000020").exists()
    leftovers = [p for p in directory.iterdir() if p.name != "ckpt-00000010"]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")
    # After the rename's crash the leftover is complete, but under its temporary name.
    assert (leftovers[0] / "manifest.json").is_file() == (crash_in == "rename")
    assert ckpt.list_checkpoints(directory) == [directory / "ckpt-00000010"]
    path, state = ckpt.restore_latest(directory, model, optimizer)
    assert path == directory / "ckpt-00000010" and state["step"] == 10
    for got, expected in zip(model.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(got, expected)
    # The next checkpoint cleans the leftover up.
    ckpt.save_checkpoint(directory, 20, model, optimizer, {"history": []})
    assert sorted(p.name for p in directory.iterdir()) == ["ckpt-00000010", "ckpt-00000020"]


def test_pruning_renames_a_checkpoint_away_before_deleting_it(tmp_path, monkeypatch):
    import shutil

    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(directory, 10, model, optimizer, {"history": []}, keep=1)
    first = directory / "ckpt-00000010"

    # A reader (`translator average` on a running training) is half-way through verifying the
    # first checkpoint when the run prunes it, and the deletion dies half-way: the name
    # `ckpt-00000010` never shows a half-deleted directory, and the reader is told what happened.
    removed = []

    def half_rmtree(path, ignore_errors=False):
        assert not Path(path).name.startswith("ckpt-"), "deleted under its checkpoint name"
        (Path(path) / "model.weights.h5").unlink()
        removed.append(Path(path))
        raise Crash("killed while deleting")

    real_sha256 = ckpt._sha256
    pruning = []

    def pruned_while_read(file):
        if file == first / "optimizer.npz" and not pruning:
            pruning.append(file)
            monkeypatch.setattr(ckpt, "shutil", Module(shutil, rmtree=half_rmtree))
            with pytest.raises(Crash):
                ckpt.save_checkpoint(directory, 20, model, optimizer, {"history": []}, keep=1)
            monkeypatch.setattr(ckpt, "shutil", shutil)
        return real_sha256(file)

    monkeypatch.setattr(ckpt, "_sha256", pruned_while_read)
    with pytest.raises(ckpt.CheckpointError, match="was removed while it was being read"):
        ckpt.verify_checkpoint(first)
    monkeypatch.undo()
    assert removed and removed[0].name.startswith(".ckpt-00000010.") and removed[0].is_dir()
    assert ckpt.list_checkpoints(directory) == [directory / "ckpt-00000020"]
    ckpt.verify_checkpoint(directory / "ckpt-00000020")
    # The next save sweeps the leftover; a path that never existed is not "removed".
    ckpt.save_checkpoint(directory, 30, model, optimizer, {"history": []}, keep=1)
    assert sorted(p.name for p in directory.iterdir()) == ["ckpt-00000030"]
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is missing"):
        ckpt.verify_checkpoint(directory / "ckpt-00000099")
