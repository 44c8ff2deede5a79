"""`training.init_from`: starting a run from the weights and vocabulary of a trained model."""

from __future__ import annotations

import re
from pathlib import Path

from translator.config import Config
from translator.files import atomic_write


class InitFromError(ValueError):
    """`training.init_from` names a model this run cannot start from; the message says why."""


def load_init_model(config: Config, run_dir: Path):
    """The model named by `training.init_from`, checked against `config` (for fine-tuning).

    Reads only: the SentencePiece model(s) the run must use are returned, for
    `write_init_vocabulary` to put into the run directory once everything is checked.

    Returns:
        `(translator, {file name: SentencePiece model bytes})`.

    Raises:
        InitFromError: the path cannot be loaded, its architecture differs from the config's
            model section (dropout aside), or the run directory holds another vocabulary.
    """
    from translator.inference import load

    source = Path(config.training.init_from)
    try:
        init = load(source)
    except (FileNotFoundError, ValueError) as e:
        raise InitFromError(f"training.init_from: {e}") from e
    theirs = init.model.get_config()  # the whole architecture, whatever the path named
    ours = config.model.model_dump(exclude={"dropout"})
    different = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    joint = init.source_tokenizer is init.target_tokenizer or (
        init.source_tokenizer.proto == init.target_tokenizer.proto
    )
    if joint != config.tokenizer.joint:
        different["tokenizer.joint"] = (joint, config.tokenizer.joint)
    if different:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in different.items())
        raise InitFromError(
            f"training.init_from={source} was trained with another architecture ({listed}); "
            "copy its model section into your config (only dropout may differ)"
        )
    if joint:
        wanted = {"spm.model": init.source_tokenizer.proto}
    else:
        wanted = {
            "spm.source.model": init.source_tokenizer.proto,
            "spm.target.model": init.target_tokenizer.proto,
        }
    for name, proto in wanted.items():
        path = run_dir / name
        if path.exists() and path.read_bytes() != proto:
            raise InitFromError(
                f"{path} is another SentencePiece model than the one of training.init_from="
                f"{source}: use a new --run-dir"
            )
    return init, wanted


def write_init_vocabulary(run_dir: Path, wanted: dict) -> None:
    """Writes the SentencePiece model(s) of `load_init_model` that the run directory lacks."""
    for name, proto in wanted.items():
        path = run_dir / name
        if not path.exists():
            atomic_write(path, proto)


def _weight_name(variable) -> str:
    # Keras numbers layer names per process (gru_cell, gru_cell_2, ...): compare without that.
    return "/".join(re.sub(r"_\d+$", "", part) for part in variable.path.split("/"))


def init_weights_from(model, init, source) -> None:
    """Copies the weights of `init.model` into `model`, variable by variable, checking shapes."""
    ours, theirs = model.weights, init.model.weights
    if len(ours) != len(theirs):
        raise InitFromError(
            f"training.init_from={source}: its model has {len(theirs)} weights, this config's "
            f"{len(ours)}; the model sections differ"
        )
    for a, b in zip(ours, theirs, strict=True):
        if _weight_name(a) != _weight_name(b) or tuple(a.shape) != tuple(b.shape):
            raise InitFromError(
                f"training.init_from={source}: weight {b.path} {tuple(b.shape)} would go into "
                f"{a.path} {tuple(a.shape)}; the model sections or vocabularies differ"
            )
    model.set_weights(init.model.get_weights())
