"""Session fixtures: tiny trained runs and their exports, shared by the export/serving tests."""

import os

import numpy as np
import pytest

from tests.tiny import SEPARATE_VOCABULARIES, tiny_overrides, write_corpus

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _train_tiny(tmp_path_factory, name, **overrides):
    from translator.config import load_config
    from translator.training import train

    corpus = write_corpus(tmp_path_factory.mktemp(f"{name}_corpus"))
    # 90 steps at a high learning rate, validated every 30: enough for the model to translate
    # (validation BLEU ~40). Fewer steps gave a model that ends every sentence at once (BLEU 0,
    # best checkpoint the first): every translation "", so every parity test compared "" with "".
    settings = {
        "training.max_steps": "90",
        "training.steps_per_checkpoint": "30",
        "training.learning_rate": "0.02",
        **overrides,
    }
    config = load_config("configs/tiny.yaml", tiny_overrides(corpus, **settings))
    run_dir = tmp_path_factory.mktemp(name) / "run"
    os.environ["TRANSLATOR_QUIET"] = "1"
    train(config, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """A run directory trained in-process for a few steps on the generated corpus."""
    return _train_tiny(tmp_path_factory, "tiny_run")


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_run_dir, tmp_path_factory):
    """`translator export` of the tiny run: model.keras, config.yaml, spm.model and version 1/."""
    from translator.export import export

    out = tmp_path_factory.mktemp("tiny_export") / "tiny"
    export(tiny_run_dir, out, weights_dtype="float16")
    return out


@pytest.fixture(scope="session")
def tiny_separate_run_dir(tmp_path_factory):
    """A tiny run with one SentencePiece model per language (spm.source.model and
    spm.target.model, of different sizes) and unshared embeddings."""
    return _train_tiny(tmp_path_factory, "tiny_separate_run", **SEPARATE_VOCABULARIES)


@pytest.fixture(scope="session")
def tiny_tied_run_dir(tmp_path_factory):
    """A tiny run whose output projection is its (shared) embedding matrix, transposed: the
    shipped model's architecture. It trains for 10 steps, then gets random weights (trained,
    this small tied model ends every sentence at once): its translations are long strings of
    pieces, which every weight changes."""
    import keras

    import translator  # noqa: F401 - registers translator's Keras objects
    from tests.tiny import randomize_weights
    from translator.tokenizer import EOS_ID
    from translator.training import save_model

    run_dir = _train_tiny(
        tmp_path_factory,
        "tiny_tied_run",
        **{
            "model.share_embeddings": "true",
            "model.tie_embeddings": "true",
            "model.embedding_dim": "32",  # = model.decoder_units
            "training.max_steps": "10",
            "training.steps_per_checkpoint": "10",
        },
    )
    model = randomize_weights(keras.saving.load_model(run_dir / "model.keras"), seed=1, scale=0.3)
    # Random weights put the end token's log-probability near everyone's (-4.5): beam search
    # would end every sentence at once. An unlikely end makes it search to the length limit.
    bias = model.decoder.output_bias_tied
    bias.assign(bias.numpy() - 30.0 * (np.arange(bias.shape[0]) == EOS_ID))
    save_model(model, run_dir / "model.keras")
    return run_dir


@pytest.fixture(scope="session")
def tiny_separate_export_dir(tiny_separate_run_dir, tmp_path_factory):
    """`translator export` of the separate-vocabulary run (float32 weights)."""
    from translator.export import export

    out = tmp_path_factory.mktemp("tiny_separate_export") / "separate"
    export(tiny_separate_run_dir, out)
    return out
