"""Session fixtures: one tiny trained run and its export, shared by the export/serving tests."""

import os

import pytest
from tiny import tiny_overrides, write_corpus

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """A run directory trained in-process for a few steps on the generated corpus."""
    from translator.config import load_config
    from translator.training import train

    corpus = write_corpus(tmp_path_factory.mktemp("tiny_corpus"))
    config = load_config(
        "configs/tiny.yaml", tiny_overrides(corpus, **{"training.max_steps": "30"})
    )
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    os.environ["TRANSLATOR_QUIET"] = "1"
    train(config, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_run_dir, tmp_path_factory):
    """`translator export` of the tiny run: model.keras, config.yaml, spm.model and version 1/."""
    from translator.export import export

    out = tmp_path_factory.mktemp("tiny_export") / "tiny"
    export(tiny_run_dir, out, weights_dtype="float16")
    return out
