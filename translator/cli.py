"""`translator train | average | evaluate | scorecard | shortlist | translate | export | serve`: parse arguments, load the config, call one function."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from translator.startup import configure_output, live_stderr_filter


def cmd_train(args) -> int:
    from translator.config import load_config
    from translator.training import train

    overrides = list(args.set or [])
    if args.strategy:
        overrides.append(f"training.strategy={args.strategy}")
    if args.init_from:
        # Quoted: a path is a string even when YAML would read it otherwise (no, null, a #b).
        overrides.append(f"training.init_from={json.dumps(args.init_from)}")
    config = load_config(args.config, overrides)
    run_dir = args.run_dir or os.path.join("runs", config.name)
    summary = train(config, run_dir, resume=args.resume)
    if not summary["chief"]:
        print(f"trained {summary['steps']} steps; the chief wrote the run directory {run_dir}")
        return 0
    sets = summary.get("best_val_bleu_sets")
    detail = f" (mean of {', '.join(f'{k} {v:.2f}' for k, v in sets.items())})" if sets else ""
    print(
        f"trained {summary['steps']} steps in {summary['train_seconds'] / 60:.1f} min; "
        f"best validation BLEU {_bleu(summary['best_val_bleu'])}{detail}; "
        f"model: {run_dir}/model.keras"
    )
    return 0


def _bleu(value) -> str:
    return "none (no validation ran)" if value is None else f"{value:.2f}"


def cmd_average(args) -> int:
    from translator.training import average_checkpoints

    out = average_checkpoints(args.run_dir, args.last, args.out)
    print(f"averaged the last {args.last} checkpoints of {args.run_dir} into {out}/model.keras")
    return 0


def cmd_rescore(args) -> int:
    from translator.training.rescoring import rescore_checkpoints

    result = rescore_checkpoints(args.run_dir, args.set or (), args.last, args.keep_best)
    names = result["sets"]
    print("| checkpoint | step | " + " | ".join(names) + " | mean | recorded in training |")
    print("|---|---|" + "---|" * len(names) + "---|---|")
    for row in result["rows"]:
        best = row is result["best"]
        mean = f"**{row['mean']:.2f}**" if best else f"{row['mean']:.2f}"
        recorded = "" if row["recorded"] is None else f"{row['recorded']:.2f}"
        cells = " | ".join(f"{row['bleu'][n]:.2f}" for n in names)
        print(f"| {row['checkpoint']} | {row['step']} | {cells} | {mean} | {recorded} |")
    best = result["best"]
    kept = "; it is now the run's model.keras" if result["kept"] else " (--keep-best keeps it)"
    print(f"best by the mean of {len(names)} set(s): {best['checkpoint']}{kept}")
    return 0


def cmd_plot_training(args) -> int:
    from translator.plotting import plot_training

    baseline = None
    if args.baseline is not None:
        baseline = (args.baseline_label, args.baseline)
    path = plot_training(
        args.run_dir, args.out, title=args.title, step_offset=args.step_offset, baseline=baseline
    )
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args) -> int:
    from translator.evaluation import evaluate, load_test_set, write_hypotheses
    from translator.inference import load

    # The test set first: a missing or misaligned file fails before the model loads.
    sources, references, label = load_test_set(
        args.corpus, args.split, args.data_dir, args.source, args.reference
    )
    translator = load(args.model, **decoding_overrides(args))
    beam = args.beam_size if args.beam_size is not None else translator.beam_size
    result = evaluate(translator, sources, references, args.beam_size, args.length_penalty)
    # The score first: nothing that can fail comes between the translations and it.
    print(f"{label}, beam {beam}: BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}")
    print(f"  {result['bleu_detail']}")
    print(f"  BLEU signature: {result['bleu_signature']}")
    print(f"  chrF signature: {result['chrf_signature']}", flush=True)
    summary = {k: v for k, v in result.items() if k != "hypotheses"}
    summary.update(label=label, beam_size=beam)
    logging.getLogger("translator.evaluation").debug(json.dumps(summary))
    # Never into the model directory by default (it may be read-only, or a shared export).
    output = args.output or default_hypotheses_path(args.model, label, beam)
    try:
        write_hypotheses(output, result["hypotheses"])
    except OSError as e:
        raise OSError(
            f"cannot write the hypotheses to {output} ({e.strerror or e}); the score is above. "
            "Choose another file with --output"
        ) from None
    print(f"  hypotheses: {output}")
    return 0


def cmd_scorecard(args) -> int:
    import datetime

    from translator.evaluation import (
        SCORECARD_SETS,
        format_scorecard,
        load_test_set,
        parse_test_sets,
        scorecard,
    )
    from translator.files import atomic_write
    from translator.inference import MAX_BEAM_SIZE, load

    try:
        beam_sizes = [int(b) for b in args.beam_sizes.split(",")]
    except ValueError:
        raise ValueError(
            f"--beam-sizes {args.beam_sizes!r}: give integers separated by commas, e.g. 1,5"
        ) from None
    if not beam_sizes or min(beam_sizes) < 1 or max(beam_sizes) > MAX_BEAM_SIZE:
        raise ValueError(
            f"--beam-sizes {args.beam_sizes!r}: every beam size must be between 1 and "
            f"{MAX_BEAM_SIZE}"
        )
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    # Every test set first: a missing corpus fails before the model loads and anything runs.
    test_sets = []
    sets = ",".join(SCORECARD_SETS) if args.sets is None else args.sets
    for corpus, split in parse_test_sets(sets):
        sources, references, label = load_test_set(corpus, split, args.data_dir)
        if args.limit is not None:
            sources, references = sources[: args.limit], references[: args.limit]
        test_sets.append((label, sources, references))
    translator = load(args.model, **decoding_overrides(args))
    total = len(test_sets) * len(beam_sizes)

    def report(row):
        report.done += 1
        print(
            f"[{report.done}/{total}] {row['test_set']}, beam {row['beam_size']}: BLEU "
            f"{row['bleu']:.2f}  chrF {row['chrf']:.2f} ({row['sentences']} sentences, "
            f"{row['sentences_per_second']:.1f}/s)",
            file=sys.stderr,
            flush=True,
        )

    report.done = 0
    rows = scorecard(translator, test_sets, beam_sizes, report=report)
    print(format_scorecard(rows), flush=True)
    if args.json:
        record = {
            "model": args.model,
            "date": datetime.date.today().isoformat(),
            "decoding": {k: v for k, v in translator.options().items() if k != "beam_size"},
            "limit": args.limit,
            "rows": rows,
        }
        try:
            atomic_write(args.json, json.dumps(record, indent=1, default=str) + "\n")
        except OSError as e:
            raise OSError(
                f"cannot write {args.json} ({e.strerror or e}); the scores are above"
            ) from None
        print(f"scores: {args.json}")
    return 0


def default_hypotheses_path(model: str, label: str, beam: int) -> str:
    """`evaluate`'s default hypotheses file: `hyp.<model>.<test set>.beam<N>.txt` in the
    current directory, `<model>` the model directory's name (of a `.keras` file: its folder's),
    and characters other than letters, digits, `.`, `-` and `_` made `_` (`tfds:a/b` names)."""
    import re

    model_dir = os.path.abspath(model)
    if model_dir.endswith(".keras"):
        model_dir = os.path.dirname(model_dir)
    name = f"hyp.{os.path.basename(model_dir)}.{label}.beam{beam}.txt"
    return re.sub(r"[^\w.-]+", "_", name)


def cmd_shortlist(args) -> int:
    from pathlib import Path

    from translator import corpora
    from translator.config import load_config
    from translator.files import version_dirs
    from translator.inference import load
    from translator.shortlist import FILENAME, build

    if args.top_k < 1 or args.frequent < 0 or args.iterations < 1 or args.max_pairs < 1:
        raise ValueError(
            "--top-k, --iterations and --max-pairs must be at least 1 and --frequent at least 0"
        )
    model_dir = Path(args.model)
    if model_dir.suffix == ".keras":
        model_dir = model_dir.parent
    if not (model_dir / "model.keras").is_file():
        raise FileNotFoundError(f"{model_dir} has no model.keras: give a run or model directory")
    config = (
        load_config(model_dir / "config.yaml") if (model_dir / "config.yaml").is_file() else None
    )
    if args.corpora:
        mixture = [(name.strip(), 1.0) for name in args.corpora.split(",") if name.strip()]
    elif config is not None:
        mixture = [(c.name, c.weight) for c in config.data.corpora]
    else:
        raise ValueError(
            f"{model_dir} has no config.yaml to read its training corpora from: name them with "
            "--corpora (e.g. multi30k,tatoeba)"
        )
    data_dir = args.data_dir or (config.data.data_dir if config is not None else None)
    # The corpora first: a missing one fails before the model loads.
    pairs = corpora.load_mixture(mixture, "train", data_dir)
    translator = load(model_dir, shortlist=None)
    max_length = config.data.max_length if config is not None else 100
    print(
        f"learning the lexical table from up to {args.max_pairs:,} of {len(pairs):,} pairs "
        f"({', '.join(f'{c} x{w:g}' for c, w in mixture)}; both sides <= {max_length} subwords)",
        file=sys.stderr,
        flush=True,
    )

    def progress(done, total):
        print(f"\rIBM Model 1: EM iteration {done}/{total}", end="", file=sys.stderr, flush=True)

    shortlist = build(
        pairs,
        translator.source_tokenizer,
        translator.target_tokenizer,
        top_k=args.top_k,
        frequent=args.frequent,
        iterations=args.iterations,
        max_pairs=args.max_pairs,
        max_length=max_length,
        progress=progress,
    )
    print(file=sys.stderr)
    if config is not None and config.data.validation_corpus:
        held_out = corpora.load_pairs(
            config.data.validation_corpus, config.data.validation_split, data_dir
        )
        import sentencepiece as spm

        source = spm.SentencePieceProcessor(model_proto=translator.source_tokenizer.proto)
        target = spm.SentencePieceProcessor(model_proto=translator.target_tokenizer.proto)
        covered, size = shortlist.coverage(
            source.encode([e for e, _ in held_out]), target.encode([f for _, f in held_out])
        )
        print(
            f"{config.data.validation_corpus} {config.data.validation_split}: {covered:.1%} of "
            f"the reference pieces are in their sentence's shortlist (mean size {size:.0f} of "
            f"{shortlist.target_vocab:,})"
        )
    shortlist.save(model_dir / FILENAME)
    print(
        f"wrote {model_dir / FILENAME} (top {shortlist.top_k} per source piece, "
        f"{len(shortlist.frequent)} frequent): `translator.load` and `translator export` of "
        f"{model_dir} now use it; delete it, or pass --no-shortlist, to decode over the whole "
        "vocabulary"
    )
    versions = [str(version) for version, _ in version_dirs(model_dir)]
    if versions:
        print(
            f"note: the SavedModel version(s) {', '.join(versions)} in {model_dir} were exported "
            "before it and do not use it (TF Serving, `translator serve`): export a new version "
            f"with it: translator export --model {model_dir} --out {model_dir}",
            file=sys.stderr,
        )
    return 0


def cmd_export(args) -> int:
    from translator.export import export

    path = export(
        args.model,
        args.out,
        version=args.version,
        weights_dtype=args.weights_dtype,
        projection_dtype=args.projection_dtype,
        compute_dtype=args.compute_dtype,
        bfloat16_rows=args.bfloat16_rows,
        shortlist=not args.no_shortlist,
        warmup=args.warmup,
    )
    print(f"exported {args.model} to {path} (TF Serving model base path: {args.out})")
    return 0


def _choices(name: str) -> list[str]:
    from translator.config import DecodingConfig, field_choices

    return field_choices(DecodingConfig, name)


def add_decoding_arguments(parser) -> None:
    """The decoding options of `translate` and `evaluate` that override the model's config."""
    parser.add_argument(
        "--early-stopping",
        choices=_choices("early_stopping"),
        default=None,
        help="when beam search stops a sentence (default: the model's config.yaml): heuristic "
        "once a beam ending now could not win; exact once none could win at the maximum length",
    )
    parser.add_argument(
        "--projection-dtype",
        choices=_choices("projection_dtype"),
        default=None,
        help="dtype of the output projection, a decoding step's largest matmul (default: the "
        "model's config.yaml, else the model's dtype); bfloat16 is faster on CPUs with bfloat16 "
        "matrix units (AMX)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=_choices("compute_dtype"),
        default=None,
        help="dtype of every decoding matmul (default: the model's config.yaml, else the "
        "model's dtype); bfloat16 decodes with the model rebuilt under mixed_bfloat16, faster on "
        "CPUs with AMX for many sentences, slower for few; adaptive chooses per call (bfloat16 "
        "from decoding.bfloat16_rows rows); auto is adaptive where the hardware has bfloat16 "
        "matmuls, else float32",
    )
    parser.add_argument(
        "--no-shortlist",
        action="store_true",
        help="decode over the whole target vocabulary even when the model directory has a "
        "shortlist.npz (see `translator shortlist`)",
    )


def decoding_overrides(args) -> dict:
    """`translator.load` overrides from the arguments of `add_decoding_arguments`."""
    names = ("early_stopping", "projection_dtype", "compute_dtype")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.no_shortlist:
        overrides["shortlist"] = None
    return overrides


def cmd_translate(args) -> int:
    from translator.inference import load

    translator = load(args.model, **decoding_overrides(args))
    kwargs = dict(
        beam_size=args.beam_size,
        n_best=args.n_best,
        length_penalty=args.length_penalty,
        segment=not args.no_segment,
        protect=not args.no_protect,
    )
    if args.text:
        results = translator.translate(
            args.text, return_alignment=bool(args.plot_attention), **kwargs
        )
        for result in results:
            _print_result(result, args)
        if args.plot_attention:
            from translator.plotting import plot_attention

            plot_attention(results[0], args.plot_attention)
            print(f"attention plot written to {args.plot_attention}", file=sys.stderr)
        return 0
    # Standard input: batches of lines, streamed in order; empty lines stay empty lines, and
    # each line is one text (cut into sentences, rejoined on one line).
    batch = []
    for number, line in enumerate(_stdin_lines(), 1):
        if isinstance(line, UnicodeDecodeError):
            if batch:  # the lines before it are translated: nothing read is lost
                _translate_lines(translator, batch, args, kwargs)
            raise ValueError(
                f"standard input, line {number}, is not UTF-8 ({line.reason} at its byte "
                f"{line.start + 1}); the lines before it are translated above. Convert the input "
                "first, e.g. `iconv -f latin1 -t utf-8`"
            )
        batch.append(line)
        if len(batch) >= translator.batch_size:
            _translate_lines(translator, batch, args, kwargs)
            batch = []
    if batch:
        _translate_lines(translator, batch, args, kwargs)
    return 0


def _stdin_lines():
    """Standard input's lines without their line ending (a `\\n` or `\\r\\n`), decoded as UTF-8
    (a byte-order mark opening the input, as Windows editors write, is not text: it is dropped);
    a line that is not UTF-8 comes as its `UnicodeDecodeError`, and ends the lines."""
    first = True
    for line in _raw_stdin_lines():
        if first and isinstance(line, str):
            line = line.removeprefix("\ufeff")
        first = False
        yield line


def _raw_stdin_lines():
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream put in place of stdin (tests, embedding)
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    for raw in stream:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield e
            return
        line = line[:-1] if line.endswith("\n") else line
        yield line[:-1] if line.endswith("\r") else line


def cmd_serve(args) -> int:
    from translator.server import ServerSettings, serve

    # ServerSettings fields given as flags of the same name (build_parser's serve section).
    fields = [name for name in ServerSettings.model_fields if hasattr(args, name)]
    settings = ServerSettings(**{name: getattr(args, name) for name in fields})
    return serve(
        settings, host=args.host, port=args.port, workers=args.workers, access_log=args.access_log
    )


def _translate_lines(translator, lines, args, kwargs):
    todo = [i for i, line in enumerate(lines) if line.strip()]
    results = translator.translate([lines[i] for i in todo], **kwargs) if todo else []
    by_index = dict(zip(todo, results, strict=True))
    for i in range(len(lines)):
        if i in by_index:
            _print_result(by_index[i], args)
        else:
            print()
    sys.stdout.flush()


def _print_result(result, args):
    if args.n_best > 1:
        for text, score in result.n_best:
            print(f"{score:.4f}\t{text}" if args.scores else text)
    else:
        print(f"{result.score:.4f}\t{result.text}" if args.scores else result.text)


def build_parser() -> argparse.ArgumentParser:
    from translator.config import WARMUP_CHOICES, WEIGHT_DTYPES

    parser = argparse.ArgumentParser(prog="translator", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a translator from a YAML config")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a key")
    p.add_argument("--run-dir", help="output directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="start from this trained model's weights and vocabulary (fine-tuning; "
        "training.init_from)",
    )
    p.add_argument(
        "--strategy",
        choices=["auto", "default", "mirrored", "multi_worker"],
        help="tf.distribute strategy (default: training.strategy of the config); multi_worker "
        "reads the cluster from TF_CONFIG",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot-training", help="draw a run's loss and validation BLEU by step")
    p.add_argument("--run-dir", required=True, help="training run directory")
    p.add_argument("--out", required=True, help="image file (.png, .svg or .pdf)")
    p.add_argument("--title", help="figure title (default: the run directory's name)")
    p.add_argument(
        "--step-offset",
        type=int,
        default=0,
        help="added to every step (runs made with --init-from)",
    )
    p.add_argument("--baseline", type=float, help="a validation BLEU to draw as a line")
    p.add_argument("--baseline-label", default="baseline", help="its label")
    p.set_defaults(func=cmd_plot_training)

    p = sub.add_parser("evaluate", help="score a model with sacreBLEU BLEU and chrF")
    p.add_argument("--model", required=True, help="run directory or shipped model directory")
    p.add_argument("--corpus", help="corpus name (multi30k, tatoeba, ...)")
    p.add_argument("--split", default="test", help="split of --corpus (default: test)")
    p.add_argument("--source", help="plain-text source file (instead of --corpus)")
    p.add_argument("--reference", action="append", help="reference file (repeat for several)")
    p.add_argument("--data-dir", help="local corpus directory (else $TRANSLATOR_DATA_DIR)")
    p.add_argument("--beam-size", type=int, default=None)
    p.add_argument("--length-penalty", type=float, default=None)
    add_decoding_arguments(p)
    p.add_argument(
        "--output",
        help="write the hypotheses here, one per line, after the score is printed (default: "
        "hyp.<model name>.<corpus>.<split>.beam<N>.txt in the current directory; never into "
        "the model directory)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "scorecard",
        help="BLEU and chrF on several test sets at several beam sizes (a model card's table)",
    )
    p.add_argument("--model", required=True, help="run directory or shipped model directory")
    p.add_argument(
        "--sets",
        help="test sets, corpus:split separated by commas (default: the model card's, "
        "multi30k:val, multi30k:test_2016_flickr, tatoeba:test, news:newstest2013, "
        "python-docs-fr:test)",
    )
    p.add_argument("--beam-sizes", default="1,5", help="beam sizes, 1 = greedy (default: 1,5)")
    p.add_argument("--limit", type=int, help="only the first N sentences of each set")
    p.add_argument("--data-dir", help="local corpus directory (else $TRANSLATOR_DATA_DIR)")
    add_decoding_arguments(p)
    p.add_argument("--json", help="also write the scores, signatures and options to this file")
    p.set_defaults(func=cmd_scorecard)

    p = sub.add_parser(
        "average", help="average the weights of a run's last checkpoints into a model directory"
    )
    p.add_argument("--run-dir", required=True, help="training run directory")
    p.add_argument("--last", type=int, default=4, help="newest checkpoints to average (4)")
    p.add_argument("--out", help="output directory (default: <run-dir>/averaged-<last>)")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser(
        "rescore",
        help="score a run's checkpoints on its validation sets; optionally keep the best",
        description="Scores each kept checkpoint of a run on the validation sets of its "
        "config.yaml (the first set and data.extra_validation), or on others given with --set, "
        "and prints each one's BLEU and their mean. --keep-best makes the checkpoint with the "
        "best mean the run's model.keras and writes the table to rescore.json.",
    )
    p.add_argument("--run-dir", required=True, help="training run directory")
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a key of the run's config, e.g. "
        "'data.extra_validation=[{corpus: tatoeba, split: validation}]' or "
        "decoding.length_penalty=1.0",
    )
    p.add_argument("--last", type=int, help="score only the newest N checkpoints (default: all)")
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="write the best checkpoint by the mean BLEU as the run's model.keras",
    )
    p.set_defaults(func=cmd_rescore)

    p = sub.add_parser(
        "shortlist",
        help="learn a vocabulary shortlist (lexical table) that makes decoding faster",
        description="Learns, from the model's training corpora, the target pieces each source "
        "piece makes likely (IBM Model 1), and writes <model>/shortlist.npz: `translator.load` "
        "and `translator export` then decode each call over the pieces of its sources instead "
        "of the whole vocabulary.",
    )
    p.add_argument("--model", required=True, help="run directory or model directory")
    p.add_argument(
        "--corpora",
        help="training corpora, separated by commas (default: the model's config.yaml "
        "data.corpora, with their weights)",
    )
    p.add_argument("--data-dir", help="local corpus directory (else $TRANSLATOR_DATA_DIR)")
    p.add_argument("--top-k", type=int, default=20, help="target pieces per source piece (20)")
    p.add_argument("--frequent", type=int, default=300, help="most frequent pieces kept (300)")
    p.add_argument("--iterations", type=int, default=5, help="EM iterations (5)")
    p.add_argument(
        "--max-pairs", type=int, default=200_000, help="pairs sampled for learning (200,000)"
    )
    p.set_defaults(func=cmd_shortlist)

    p = sub.add_parser("export", help="write a TF Serving SavedModel and a .keras model")
    p.add_argument("--model", required=True, help="training run directory or model directory")
    p.add_argument("--out", required=True, help="export directory, e.g. saved_models/en-fr")
    p.add_argument("--version", type=int, help="SavedModel version (default: next integer)")
    p.add_argument(
        "--weights-dtype",
        default="float32",
        choices=WEIGHT_DTYPES,
        help="storage type of the weights (float16 halves the export; compute stays float32)",
    )
    p.add_argument(
        "--projection-dtype",
        choices=_choices("projection_dtype"),
        default=None,
        help="dtype of the decoder's output projection in the export (default: the model's "
        "config.yaml); bfloat16 is faster on CPUs with bfloat16 matrix units (AMX), slower "
        "on CPUs without them",
    )
    p.add_argument(
        "--compute-dtype",
        choices=_choices("compute_dtype"),
        default=None,
        help="dtype of every matmul of the export's graph (default: the model's config.yaml); "
        "bfloat16 is faster on CPUs with AMX for many sentences, slow where bfloat16 is "
        "emulated; adaptive chooses per call, bfloat16 from --bfloat16-rows rows (batch x beam "
        "size), float32 below; auto (adaptive with bfloat16 matmuls, else float32) builds the "
        "graph for this machine and stays auto in the export's config.yaml, so translator.load "
        "of the export resolves it where it runs",
    )
    p.add_argument(
        "--bfloat16-rows",
        type=int,
        default=None,
        metavar="N",
        help="with --compute-dtype adaptive or auto: the rows (sentences x beam size) from which a call "
        "decodes in bfloat16 (default: the model's config.yaml, 64; `python bench/decode.py "
        "--calibrate` measures this machine's)",
    )
    p.add_argument(
        "--no-shortlist",
        action="store_true",
        help="export without the model directory's shortlist.npz (decode over the whole "
        "vocabulary)",
    )
    p.add_argument(
        "--warmup",
        choices=list(WARMUP_CHOICES),
        default="all",
        help="the signatures TF Serving's warm-up file (assets.extra/tf_serving_warmup_requests) "
        "calls when it loads the version; serving_default for TF Serving with --enable_batching, "
        "which refuses translate's scalar inputs and then fails to load the version",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("translate", help="translate English text (arguments or stdin lines)")
    p.add_argument("--model", default="saved_models/en-fr", help="model directory")
    p.add_argument("--beam-size", type=int, default=None)
    p.add_argument("--n-best", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=None)
    add_decoding_arguments(p)
    p.add_argument("--scores", action="store_true", help="print the score before each translation")
    p.add_argument(
        "--plot-attention", metavar="FILE.png", help="attention heatmap of the first text"
    )
    p.add_argument(
        "--no-segment",
        action="store_true",
        help="translate each text (argument or line) as one sentence instead of cutting it into "
        "sentences (for input segmented already); over-long ones are still cut at clauses",
    )
    p.add_argument(
        "--no-protect",
        action="store_true",
        help="let the model translate numbers, URLs, e-mail addresses and code itself instead of "
        "copying them verbatim through placeholders",
    )
    p.add_argument(
        "text",
        nargs="*",
        help="texts to translate, each cut into sentences (default: stdin, one text per line)",
    )
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser(
        "serve",
        help="REST service: /v1/translate and TF Serving's REST API (FastAPI on uvicorn)",
        description="Serves the TF Serving export in-process (default), or forwards to a TF "
        "Serving deployment with --backend. Docs at /docs once running.",
    )
    from translator.server.settings import ServerSettings

    default = ServerSettings.default
    p.add_argument("--model", default=default("model"), help="export directory")
    p.add_argument("--model-name", help="model name in URLs (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="processes, each with the model")
    p.add_argument("--backend", metavar="URL", help="forward to TF Serving, e.g. http://host:8501")
    for option, kind, text in (
        ("max_batch_size", int, "texts per model call"),
        ("max_wait_ms", float, "wait to fill a batch after a call of one request (ms)"),
        ("max_wait_busy_ms", float, "wait to fill a batch after a merged call (ms, >= max-wait)"),
        ("max_queue", int, "waiting requests before 503s"),
        ("max_text_chars", int, "characters per text"),
        ("max_texts", int, "texts per request"),
        ("max_body_bytes", int, "request body limit"),
        ("max_beam_size", int, "largest beam_size accepted"),
        ("max_request_cost", int, "decoding steps per request (texts x beam x output length)"),
        ("max_batch_cost", int, "decoding steps per model call"),
        (
            "express_cost",
            int,
            "heavy above this (a request, or its part in a call): cheaper run beside (0: off)",
        ),
        ("max_alignment_values", int, "attention weights per response"),
        ("request_timeout", float, "seconds a request may wait and run (504 after)"),
        ("header_timeout", float, "seconds to receive a request's headers"),
        ("body_timeout", float, "seconds to receive a request's body (408 after)"),
        ("max_connections", int, "open connections per process"),
        ("shutdown_timeout", float, "seconds to finish running work at shutdown"),
    ):
        flag = "--" + option.replace("_", "-")
        p.add_argument(flag, type=kind, default=default(option), help=text)
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(args.verbose, start_devices=args.command != "train")
    from translator.checkpoint import CheckpointError
    from translator.config import ConfigError

    # TensorFlow's later noise (graph optimization) filtered out; everything with -v.
    quiet = contextlib.nullcontext() if args.verbose else live_stderr_filter()
    try:
        with quiet:
            return args.func(args)
    except (
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        OSError,
    ) as e:
        print(f"translator {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
