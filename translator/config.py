"""Typed configuration: YAML files validated into pydantic models, with dotted overrides.

A config file may name a parent with `extends: other.yaml` (resolved next to it); the child is
deep-merged over the parent, `--set section.key=value` overrides are merged last, and the result
is validated: an unknown key, a wrong type or an out-of-range value is an error that names the
key, the file and what is allowed.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# How `translator export` may store the weights (the computation stays float32).
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
# `export(warmup=...)`: the signatures the warm-up file calls. TF Serving's batching
# (`--enable_batching`) refuses `translate`'s scalar inputs, in warm-up too, and a failed
# warm-up fails the version's load: export for it with "serving_default".
WARMUP_CHOICES = {
    "all": ("serving_default", "translate"),
    "serving_default": ("serving_default",),
    "none": (),
}


class ConfigError(ValueError):
    """A config file or override that does not validate; the message says what and where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusSpec(_Section):
    name: str = Field(description="multi30k | tatoeba | tfds:<name> | files:<src>,<tgt>")
    weight: Annotated[float, Field(gt=0)] = 1.0  # sampling weight in a mixture


class ValidationSet(_Section):
    corpus: str = Field(description="a corpus name, as in data.corpora")
    split: str
    # At most this many sentences of the split are translated at each validation (0: all).
    size: Annotated[int, Field(ge=0)] = 0
    # How the set is named in the log, the history and TensorBoard (default: corpus.split).
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.corpus}.{self.split}"


class DataConfig(_Section):
    # Training corpora; several make a weighted mixture.
    corpora: list[CorpusSpec] = [CorpusSpec(name="multi30k")]
    # Local directory holding multi30k/ and tatoeba/ (else $TRANSLATOR_DATA_DIR, else download).
    data_dir: str | None = None
    # Corpus and split scored for early stopping and model selection.
    validation_corpus: str = "multi30k"
    validation_split: str = "val"
    # At most this many validation sentences are translated at each evaluation (0: all).
    validation_size: Annotated[int, Field(ge=0)] = 0
    # More sets scored at each validation, e.g. one per domain of a mixture. With any, the
    # validation BLEU that picks the best checkpoint (model.keras) and drives early stopping is
    # the mean of every set's BLEU, the set above included; each set's own BLEU goes to the log,
    # the checkpoints' history and TensorBoard (val_bleu/<name>).
    extra_validation: list[ValidationSet] = []

    def validation_sets(self) -> list[ValidationSet]:
        """Every set a validation scores: `validation_corpus`'s split first, then the extras."""
        first = ValidationSet(
            corpus=self.validation_corpus, split=self.validation_split, size=self.validation_size
        )
        return [first, *self.extra_validation]

    @model_validator(mode="after")
    def _check_validation_names(self):
        labels = [v.label for v in self.validation_sets()]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(
                f"two validation sets are named {twice[0]!r} (data.validation_corpus/split and "
                "data.extra_validation): drop one, or give it another split or a `name`"
            )
        return self

    # Pairs with a side longer than this many subwords are dropped (and counted in the log).
    max_length: Annotated[int, Field(ge=2, le=1024)] = 80
    # Tokens per batch (source + target padded lengths drive the bucket sizes).
    batch_tokens: Annotated[int, Field(ge=16)] = 2048
    # SentencePiece subword regularization (Kudo, 2018) for the training pairs: each epoch every
    # training sentence (both sides) is tokenized by sampling a segmentation (unigram models:
    # nbest_size=-1 and this alpha; a smaller alpha gives more varied segmentations; a BPE model
    # reads it as the BPE-dropout probability). 0 = off (the best segmentation, as before). Which
    # pairs max_length keeps is decided on the best segmentation; a sample over max_length falls
    # back to it. Validation, evaluation and inference never sample. Samples are not seeded.
    subword_alpha: Annotated[float, Field(ge=0, le=1)] = 0.0


class TokenizerConfig(_Section):
    # SentencePiece vocabulary size (of each side when not joint).
    vocab_size: Annotated[int, Field(ge=16, le=256_000)] = 8000
    model_type: Literal["unigram", "bpe"] = "unigram"
    # One vocabulary for English and French (enables shared/tied embeddings).
    joint: bool = True
    character_coverage: Annotated[float, Field(gt=0.9, le=1.0)] = 1.0
    # Sentences sampled (with the seed) to train SentencePiece.
    input_sentence_size: Annotated[int, Field(ge=100)] = 1_000_000


class ModelConfig(_Section):
    embedding_dim: Annotated[int, Field(ge=1)] = 256
    share_embeddings: bool = True  # needs tokenizer.joint
    tie_embeddings: bool = False  # needs embedding_dim == decoder_units
    cell_type: Literal["lstm", "gru"] = "lstm"
    encoder_units: Annotated[int, Field(ge=1)] = 256  # per direction
    encoder_layers: Annotated[int, Field(ge=1, le=16)] = 1
    bidirectional: Literal["all", "first", "none"] = "all"
    decoder_units: Annotated[int, Field(ge=1)] = 512
    decoder_layers: Annotated[int, Field(ge=1, le=16)] = 1
    attention: Literal["luong", "bahdanau"] = "luong"
    attention_score: Literal["general", "dot"] = "general"
    input_feeding: bool = True
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    residual: bool = True


class TrainingConfig(_Section):
    seed: int = 0
    # Stop after this many optimizer steps (0: no step limit).
    max_steps: Annotated[int, Field(ge=0)] = 0
    # Stop after this many minutes of training (0: no time limit).
    time_limit_minutes: Annotated[float, Field(ge=0)] = 0
    # Steps between checkpoints (and validation); also the Keras progress-bar "epoch".
    steps_per_checkpoint: Annotated[int, Field(ge=1)] = 500
    # Validation BLEU every this many checkpoints.
    validate_every: Annotated[int, Field(ge=1)] = 1
    # Stop when validation BLEU has not improved for this many validations (0: never).
    early_stopping_patience: Annotated[int, Field(ge=0)] = 5
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 500
    # After warmup: inverse square root decay, cosine decay to `min_learning_rate` at max_steps,
    # or constant.
    decay: Literal["inverse_sqrt", "cosine", "constant"] = "inverse_sqrt"
    min_learning_rate: Annotated[float, Field(ge=0)] = 1e-5
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    clip_norm: Annotated[float, Field(gt=0)] = 5.0
    # auto: mixed_bfloat16 on a CPU with AMX-BF16/AVX512-BF16 or a GPU of compute capability
    # >= 8.0, else float32.
    precision: Literal["auto", "float32", "mixed_bfloat16"] = "float32"
    # XLA-compile the training step; auto: on in float32, off under mixed_bfloat16 (where XLA's
    # step is slower on CPU). Always off under a distribution strategy.
    jit_compile: bool | Literal["auto"] = "auto"
    # Checkpoints kept besides the best one.
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    # tf.distribute strategy: default (one device), mirrored (this machine's GPUs, or its logical
    # CPU devices), multi_worker (the machines in $TF_CONFIG), or auto (multi_worker when TF_CONFIG
    # names several tasks, else mirrored when there are several local devices, else default).
    strategy: Literal["auto", "default", "mirrored", "multi_worker"] = "default"
    # With N replicas a step takes one batch of data.batch_tokens per replica (N times the tokens)
    # and the peak learning rate is multiplied by sqrt(N) (Adam's square-root rule), by N (the
    # linear rule) or by 1 (none). Warmup, decay and max_steps still count optimizer steps.
    learning_rate_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    # Start from the weights of a trained model (a run directory or a shipped model such as
    # saved_models/en-fr) instead of random ones: fine-tuning, or continuing a finished training
    # with a new schedule. The model section must describe the same architecture (dropout may
    # differ) and the run reuses that model's SentencePiece vocabulary; the optimizer starts
    # afresh at step 0. Ignored when the run resumes from its own checkpoints.
    init_from: str | None = None


class DecodingConfig(_Section):
    beam_size: Annotated[int, Field(ge=1, le=64)] = 5
    # GNMT length penalty alpha: ((5 + len) / 6) ** alpha.
    length_penalty: Annotated[float, Field(ge=0, le=5)] = 0.6
    coverage_penalty: Annotated[float, Field(ge=0, le=5)] = 0.0
    # When beam search stops a sentence: "heuristic" once no alive beam ending at the next step
    # would win (fast), "exact" once none could win even at the maximum length (with a length
    # penalty it usually runs to the maximum length). See translator.search.beam_search.
    early_stopping: Literal["heuristic", "exact"] = "heuristic"
    # Maximum output length = ratio * source length + offset (subwords).
    max_length_ratio: Annotated[float, Field(gt=0, le=10)] = 2.0
    max_length_offset: Annotated[int, Field(ge=1)] = 10
    # Sentences per batch when translating many.
    batch_size: Annotated[int, Field(ge=1)] = 64
    # The output projection's dtype when decoding: null (the model's compute dtype), float32 or
    # bfloat16 (faster on CPUs with bfloat16 matrix units; see the README's Benchmarks).
    projection_dtype: Literal["float32", "bfloat16"] | None = None
    # The dtype every decoding matmul runs in: null (the model's), float32, bfloat16 (the model
    # rebuilt under mixed_bfloat16 for decoding), adaptive (per call: bfloat16 when the call
    # decodes at least `bfloat16_rows` rows, batch x beam size, else float32; one graph, the
    # weights stored once) or auto (adaptive where the CPU has AMX-BF16 or AVX512-BF16 or the
    # GPU is sm_80+, else float32).
    compute_dtype: Literal["float32", "bfloat16", "adaptive", "auto"] | None = None
    # Rows (sentences x beam size) from which `adaptive` decodes in bfloat16: bfloat16 matmuls
    # of a few rows are slower than float32 ones even with AMX (one sentence at beam 5: 20.4
    # against 21.8 sentences/s), of 160 rows faster (1.23x, batch 32 at beam 5; 2026-12-06).
    # `python bench/decode.py --calibrate` measures the crossover of a machine.
    bfloat16_rows: Annotated[int, Field(ge=1)] = 64


class Config(_Section):
    name: str = "translator"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    decoding: DecodingConfig = DecodingConfig()

    @model_validator(mode="after")
    def _check_consistency(self):
        if self.model.share_embeddings and not self.tokenizer.joint:
            raise ValueError(
                "model.share_embeddings needs tokenizer.joint: true (one vocabulary for both "
                "sides); set one of them differently"
            )
        if self.model.tie_embeddings and self.model.embedding_dim != self.model.decoder_units:
            raise ValueError(
                "model.tie_embeddings needs model.embedding_dim == model.decoder_units, got "
                f"{self.model.embedding_dim} and {self.model.decoder_units}"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`; nested dicts merge, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} extends itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e}): save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent:
        data = deep_merge(_read_yaml(path.parent / parent, (*seen, path.resolve())), data)
    return data


def parse_override(text: str) -> dict:
    """`"training.max_steps=100"` -> `{"training": {"max_steps": 100}}` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has no key before '='")
    value: Any = yaml.safe_load(raw) if raw.strip() else None
    for key in reversed(keys):
        value = {key: value}
    return value


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            section = Config
            for part in item["loc"][:-1]:
                field = section.model_fields.get(str(part)) if isinstance(part, str) else None
                annotation = getattr(field, "annotation", None)
                section = annotation if isinstance(annotation, type) else None
                if section is None or not issubclass(section, BaseModel):
                    break
            if section is not None and issubclass(section, BaseModel):
                message += f"; allowed keys here: {', '.join(section.model_fields)}"
        elif item["type"] == "literal_error":
            message = f"{message} (got {item.get('input')!r})"
        elif "input" in item and item["type"] != "value_error":
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Reads, merges and validates a config.

    Args:
        path: A YAML file (may `extends:` another), or None for the defaults.
        overrides: `section.key=value` strings, applied in order.

    Returns:
        A validated `Config`.

    Raises:
        ConfigError: naming the key, the file and what is allowed.
    """
    data = _read_yaml(Path(path)) if path else {}
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    source = str(path) if path else "defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def field_bounds(section: type[BaseModel], name: str) -> tuple[float | None, float | None]:
    """The (lower, upper) bounds a config field declares (`ge`/`gt`, `le`/`lt`), None if open.

    Decoding options are defined once, in `DecodingConfig`; the CLI, `Translator`, the export
    signature and the REST request models take their bounds from here.

    Example:

    >>> field_bounds(DecodingConfig, "length_penalty")
    (0, 5)
    """
    lower = upper = None
    for item in section.model_fields[name].metadata:
        for attribute in ("ge", "gt"):
            if getattr(item, attribute, None) is not None:
                lower = getattr(item, attribute)
        for attribute in ("le", "lt"):
            if getattr(item, attribute, None) is not None:
                upper = getattr(item, attribute)
    return lower, upper


def field_choices(section: type[BaseModel], name: str) -> list:
    """The values a `Literal` config field allows (None left out), e.g. for argparse `choices`.

    Example:

    >>> field_choices(DecodingConfig, "compute_dtype")
    ['float32', 'bfloat16', 'adaptive', 'auto']
    """
    annotation = section.model_fields[name].annotation
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    choices = []
    for option in typing.get_args(annotation):
        choices.extend(typing.get_args(option) if typing.get_origin(option) is Literal else [])
    return choices


def decoding_options(decoding: DecodingConfig | None = None) -> dict:
    """`Translator` keyword arguments from a config's decoding section (default: the defaults
    of `DecodingConfig`)."""
    return (decoding or DecodingConfig()).model_dump()
