"""What a run reads: its run directory, SentencePiece models, training batches, validation set."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from translator import corpora
from translator import data as data_lib
from translator.config import Config
from translator.files import LockedError, exclusive_lock
from translator.tokenizer import SentencePieceTokenizer, train_sentencepiece

log = logging.getLogger(__name__)


def check_run_dir(run_dir: Path, needed_bytes: int = 200 << 20) -> None:
    """Fails before training if the run directory cannot be written or the disk is nearly full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"run directory {run_dir} is not writable ({e.strerror or e}); choose another with "
            "--run-dir"
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise OSError(
            f"only {free >> 20} MiB free under {run_dir}; checkpoints need about "
            f"{needed_bytes >> 20} MiB. Free some space or choose another --run-dir."
        )


class RunDirLock:
    """The exclusive lock of a run directory, `<run_dir>/.lock`: one training writes it at a time.

    Two runs in one directory would destroy each other (one's clean-up deleting the other's
    checkpoint in progress, config.yaml and checkpoints overwritten). `acquire` takes the lock
    or fails at once, naming the process (PID and host) that holds it; it is held until
    `release` or the end of the `with` block, and the kernel releases it when the process
    ends, however it ends, so there is never a stale lock to remove.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self._held = None

    def acquire(self) -> None:
        """Takes the lock (creating the run directory); a no-op when held already.

        Raises:
            OSError: another process holds it, or the directory is not writable.
        """
        if self._held is not None:
            return
        held = contextlib.ExitStack()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive_lock(self.run_dir / LOCK_FILE))
        except LockedError as e:
            raise OSError(
                f"run directory {self.run_dir} is in use by another training ({e.holder}): "
                "two runs in one directory would overwrite each other's checkpoints. Wait for "
                "it to end (or stop that process), or choose another --run-dir"
            ) from None
        except OSError as e:
            raise OSError(
                f"run directory {self.run_dir} is not writable ({e.strerror or e}); choose "
                "another with --run-dir"
            ) from None
        self._held = held

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# The lock file in a run directory (see RunDirLock); it stays when released.
LOCK_FILE = ".lock"


def prepare_tokenizers(config: Config, train_pairs, run_dir: Path, train_missing: bool = True):
    """Trains (or reuses, when the run already has them) the SentencePiece model(s).

    With `train_missing=False` (a multi-worker run's other workers, which read the chief's), a
    missing model is an error instead.

    Returns:
        `(source_tokenizer, target_tokenizer)`, one object twice with `tokenizer.joint`.
    """
    t = config.tokenizer
    kwargs = dict(
        vocab_size=t.vocab_size,
        model_type=t.model_type,
        character_coverage=t.character_coverage,
        input_sentence_size=t.input_sentence_size,
        seed=config.training.seed,
    )
    sources = [s for s, _ in train_pairs]
    targets = [f for _, f in train_pairs]
    if t.joint:
        path = run_dir / "spm.model"
        if not path.exists():
            _check_shared(path, train_missing)
            log.info("training a joint SentencePiece model (%d pieces)", t.vocab_size)
            train_sentencepiece(sources + targets, path, **kwargs)
        tokenizer = SentencePieceTokenizer(model_path=str(path))
        return tokenizer, tokenizer
    tokenizers = []
    for side, texts in (("source", sources), ("target", targets)):
        path = run_dir / f"spm.{side}.model"
        if not path.exists():
            _check_shared(path, train_missing)
            log.info("training the %s SentencePiece model (%d pieces)", side, t.vocab_size)
            train_sentencepiece(texts, path, **kwargs)
        tokenizers.append(SentencePieceTokenizer(model_path=str(path)))
    return tuple(tokenizers)


def _check_shared(path: Path, train_missing: bool) -> None:
    if not train_missing:
        raise FileNotFoundError(
            f"{path} is missing: in a multi-worker run every worker reads the chief's run "
            "directory, so --run-dir must be on storage all workers share (NFS, a shared volume)"
        )


def load_training_pairs(config: Config):
    """The (English, French) training pairs of the mixture of `data.corpora`."""
    d = config.data
    mixture = [(c.name, c.weight) for c in d.corpora]
    return corpora.load_mixture(mixture, "train", data_dir=d.data_dir, seed=config.training.seed)


def batch_maker(config: Config, source_tokenizer, target_tokenizer):
    """`training_batches(pairs)`: the shuffled, repeated `(inputs, target_out_ids)` batches.

    The data order is a pure function of `training.seed`, so a resumed run skips the batches it
    consumed already and goes on with exactly those it would have seen. With
    `data.subword_alpha > 0` the sampled segmentations are not seeded (tensorflow-text takes no
    seed), so a resumed run goes on with the same pair order but other samples, and other batches.
    """

    def training_batches(pairs):
        return data_lib.make_dataset(
            pairs,
            source_tokenizer,
            target_tokenizer,
            batch_tokens=config.data.batch_tokens,
            max_length=config.data.max_length,
            shuffle=True,
            seed=config.training.seed,
            repeat=True,
            pad_to_bucket=config.training.jit_compile,  # one XLA program per bucket, not per batch shape
            subword_alpha=config.data.subword_alpha,  # training only: validation never samples
        ).map(lambda inputs, target_out, _: (inputs, target_out))  # the loss masks PAD itself

    return training_batches


def load_validation(config: Config) -> list[tuple[str, list[str], list[list[str]]]]:
    """`(name, sources, reference lists)` of every validation set, each cut to its size.

    The set of `data.validation_corpus`/`validation_split` comes first, then
    `data.extra_validation`'s, in their order.
    """
    sets = []
    for spec in config.data.validation_sets():
        pairs = corpora.load_references(spec.corpus, spec.split, data_dir=config.data.data_dir)
        if spec.size:
            pairs = pairs[: spec.size]
        if not pairs:
            raise ValueError(
                f"validation set {spec.label} ({spec.corpus} split {spec.split}) has no "
                "sentences: check the corpus files, or name another split"
            )
        sets.append((spec.label, [s for s, _ in pairs], [r for _, r in pairs]))
    return sets
