"""Decoding speed: sentences/s of greedy and beam-5 search, and single-sentence latency.

Translates Multi30k test_2016_flickr (1,000 sentences) with a model directory, through the
Python API (`translator.load`) and through the exported SavedModel (`translate` signature, the
graph TF Serving runs), at batch sizes 1, 32 and 64; the Python API also with the output
projection in bfloat16 (`projection_dtype="bfloat16"`, "Python bf16 proj") and with every matmul in
bfloat16 (`compute_dtype="bfloat16"`, "Python bf16"), and a SavedModel exported with
`compute_dtype="bfloat16"` ("SavedModel bf16") and one with `compute_dtype="adaptive"` ("SavedModel
adaptive": bfloat16 from `--bfloat16-rows` rows, default the config's, float32 below) and one
with `compute_dtype="float32"` ("SavedModel float32"); "Python API" decodes as the model
directory's config says (printed in the header; the shipped model's `auto`), "SavedModel" as its
newest version was built (the shipped one: adaptive); where the model directory has a vocabulary shortlist
(`shortlist.npz`, which the other paths use), the same two without it ("SavedModel whole vocab",
exported here with `shortlist=False`, and "Python whole vocab"). Prints sentences/s (the best of `--rounds`
interleaved runs, as the machine is shared), the beam-5 / greedy cost ratio measured in this run
(target: <= 2.5x at batch 64), and the median latency of one sentence at beam 5 (target: <= 35 ms). The peers' figures, measured on this machine type with the
21M-parameter `multi30k_lstm` architecture, are printed for context: OpenNMT-tf 2.32 beam 5 batch 32
27.3 sentences/s in its runner, 21.6 through its SavedModel, 155 ms median latency; the TensorFlow
NMT tutorial's export (5.3M parameters, greedy only) 230 sentences/s at batch 32, 25.5 ms latency.

    python bench/decode.py --model saved_models/en-fr [--sentences 1000] [--latency 100]
        [--batch-sizes 1,32,64] [--rounds 3] [--paths "SavedModel,Python bf16,SavedModel bf16"]
    python bench/decode.py --architecture configs/multi30k_lstm.yaml   # untrained, speed only
    python bench/decode.py --model saved_models/en-fr --calibrate   # bfloat16_rows of this machine

`--calibrate` times one beam-5 call of 1, 2, 4, ... 64 sentences (5 to 320 rows) in float32 and
in bfloat16 (`compute_dtype`), interleaved, and prints the ratio per size and the smallest number
of rows from which bfloat16 stays faster: the `--bfloat16-rows` for `translator export
--compute-dtype adaptive` on this machine (none where bfloat16 is emulated).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

PEERS = {
    "OpenNMT-tf 2.32 runner, beam 5, batch 32": "27.3 sentences/s",
    "OpenNMT-tf 2.32 SavedModel, beam 5, batch 32": "21.6 sentences/s, 155 ms median latency",
    "TF NMT tutorial SavedModel, greedy, batch 32": "230 sentences/s, 25.5 ms median latency",
}


PATHS = (
    "SavedModel",
    "Python API",
    "Python bf16 proj",
    "Python bf16",
    "SavedModel bf16",
    "SavedModel adaptive",
    "SavedModel float32",
    "SavedModel whole vocab",
    "Python whole vocab",
)


def load_sentences(n):
    from translator import corpora

    pairs = corpora.load_pairs("multi30k", "test_2016_flickr")
    return [source for source, _ in pairs[:n]]


def untrained_model_dir(config_path, out_dir):
    """A model directory with the architecture of `config_path` and random weights."""
    from pathlib import Path

    from translator import corpora
    from translator.config import load_config
    from translator.export import export
    from translator.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from translator.training import build_model, save_model

    config = load_config(config_path)
    run = os.path.join(out_dir, "run")
    os.makedirs(run, exist_ok=True)
    sentences = [s for pair in corpora.load_pairs("multi30k", "train")[:20000] for s in pair]
    spm_path = train_sentencepiece(
        sentences, os.path.join(run, "spm.model"), config.tokenizer.vocab_size
    )
    vocab = SentencePieceTokenizer(model_path=str(spm_path)).vocabulary_size()
    model = build_model(config, vocab, vocab)
    save_model(model, Path(run) / "model.keras")
    Path(run, "config.yaml").write_text(config.to_yaml())
    export(run, os.path.join(out_dir, "export"))
    return os.path.join(out_dir, "export")


def sentences_per_second(fn, sentences, batch_size):
    fn(sentences[:batch_size])  # warm-up (tracing, first-touch allocations)
    start = time.perf_counter()
    for i in range(0, len(sentences), batch_size):
        fn(sentences[i : i + batch_size])
    return len(sentences) / (time.perf_counter() - start)


def calibrate(args) -> int:
    """Float32 against bfloat16 per call of 5 to 320 rows; prints the crossover."""
    import tempfile

    from translator.inference import load

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or untrained_model_dir(args.architecture, tmp.name)
    # One graph call per chunk (batch_size >= the largest chunk), so the rows are as labelled.
    float32 = load(model_dir, compute_dtype="float32", batch_size=64)
    bfloat16 = load(model_dir, compute_dtype="bfloat16", batch_size=64)
    sentences = load_sentences(max(64, min(args.sentences, 256)))
    from translator.hardware import resolve_precision

    bf16_hardware = resolve_precision("auto") == "mixed_bfloat16"
    print(f"{model_dir}: beam 5, float32 against bfloat16 (compute_dtype) per call; bfloat16 "
          f"matmul hardware: {'yes' if bf16_hardware else 'no (emulated)'}")  # fmt: skip
    print("| sentences | rows | float32 ms | bfloat16 ms | bfloat16 speed-up |")
    print("|---|---|---|---|---|")
    ratios = {}
    for batch in (1, 2, 4, 8, 16, 32, 64):
        chunks = [sentences[i : i + batch] for i in range(0, len(sentences) - batch + 1, batch)]
        chunks = chunks[: max(4, 64 // batch)]
        best = {}
        for translator in (float32, bfloat16, float32, bfloat16):  # warm-up, then interleaved
            for _ in range(max(1, args.rounds)):
                start = time.perf_counter()
                for chunk in chunks:
                    translator.translate(chunk, beam_size=5, segment=False)
                took = (time.perf_counter() - start) / len(chunks) * 1e3
                key = translator.compute_dtype
                best[key] = min(best.get(key, float("inf")), took)
        ratios[batch * 5] = best["float32"] / best["bfloat16"]
        print(f"| {batch} | {batch * 5} | {best['float32']:.1f} | {best['bfloat16']:.1f} | "
              f"{ratios[batch * 5]:.2f}x |", flush=True)  # fmt: skip
    winning = [rows for rows in ratios if all(ratios[r] > 1.0 for r in ratios if r >= rows)]
    if winning:
        print(f"bfloat16 is faster from {min(winning)} rows: translator export --compute-dtype "
              f"adaptive --bfloat16-rows {min(winning)}")  # fmt: skip
    else:
        print("bfloat16 is slower at every size here: keep float32 (compute_dtype: auto does)")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory with model.keras and an export")
    parser.add_argument("--architecture", help="config: time an untrained model of this shape")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--latency", type=int, default=100, help="sentences timed one by one")
    parser.add_argument("--batch-sizes", default="1,32,64")
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved runs per figure (the best is kept)"
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"which paths to time (default: {','.join(PATHS)})",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="find the rows (sentences x beam) from which bfloat16 decoding beats float32 here",
    )
    parser.add_argument(
        "--bfloat16-rows",
        type=int,
        help="the 'SavedModel adaptive' path's threshold (default: the model config's "
        "decoding.bfloat16_rows; --calibrate measures it)",
    )
    parser.add_argument(
        "--inter-op-threads",
        type=int,
        help="TensorFlow's inter-op thread pool size (default: TensorFlow's, the core count)",
    )
    args = parser.parse_args()
    if args.inter_op_threads is not None:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    if not (args.model or args.architecture):
        parser.error("give --model DIR or --architecture CONFIG")
    if args.calibrate:
        if args.bfloat16_rows is not None:
            parser.error("--calibrate measures the threshold: leave --bfloat16-rows out")
        return calibrate(args)
    paths = args.paths.split(",")
    if args.bfloat16_rows is not None and "SavedModel adaptive" not in paths:
        parser.error("--bfloat16-rows is the 'SavedModel adaptive' path's threshold: add that path")
    if unknown := set(paths) - set(PATHS):
        parser.error(
            f"unknown --paths {', '.join(sorted(unknown))}: choose from {', '.join(PATHS)}"
        )

    import tempfile

    from translator.export import load_saved_model
    from translator.inference import load

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or untrained_model_dir(args.architecture, tmp.name)
    translator = load(model_dir)
    translator_bf16_proj = (  # float32 but for the projection, whatever the config says
        load(model_dir, projection_dtype="bfloat16", compute_dtype="float32")
        if "Python bf16 proj" in paths
        else None
    )
    translator_bf16 = load(model_dir, compute_dtype="bfloat16") if "Python bf16" in paths else None
    if translator.shortlist is None:  # nothing to compare against
        paths = [p for p in paths if "whole vocab" not in p]
    translator_whole = load(model_dir, shortlist=None) if "Python whole vocab" in paths else None
    loaded, version_dir = load_saved_model(model_dir)
    signature = loaded.signatures["translate"]
    from translator.export import export

    # The paths that time an export of their own: path -> export() options.
    exports = {
        "SavedModel bf16": {"compute_dtype": "bfloat16"},
        "SavedModel adaptive": {"compute_dtype": "adaptive", "bfloat16_rows": args.bfloat16_rows},
        "SavedModel float32": {"compute_dtype": "float32"},
        "SavedModel whole vocab": {"shortlist": False},
    }
    signatures = {}
    for path_name, options in exports.items():
        if path_name in paths:
            version = export(model_dir, os.path.join(tmp.name, path_name.split()[-1]), **options)
            signatures[path_name] = tf.saved_model.load(str(version)).signatures["translate"]
    params = translator.model.count_params()
    sentences = load_sentences(args.sentences)
    # What "Python API" decodes in: the model directory's config.yaml ("SavedModel" runs its
    # newest version as that was built, which is the same unless it was exported elsewhere).
    from translator.inference import resolve_compute_dtype

    dtype = resolve_compute_dtype(translator.compute_dtype) or "float32"
    if translator.adaptive:
        dtype += f" (bfloat16 from {translator.bfloat16_rows} rows)"
    print(f"{model_dir}: {params / 1e6:.1f}M parameters, Python API decodes in {dtype}, "
          f"shortlist {translator.shortlist}, "
          f"{len(sentences)} sentences, "
          f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}")  # fmt: skip

    def python_api(beam):
        return lambda batch: translator.translate(batch, beam_size=beam)

    def python_bf16_proj(beam):
        return lambda batch: translator_bf16_proj.translate(batch, beam_size=beam)

    def python_bf16(beam):
        return lambda batch: translator_bf16.translate(batch, beam_size=beam)

    def saved_model(beam, signature=signature):
        args_ = dict(
            beam_size=tf.constant(beam),
            n_best=tf.constant(1),
            length_penalty=tf.constant(float(translator.length_penalty)),
        )
        return lambda batch: signature(text=tf.constant(batch), **args_)["translations"].numpy()

    makers = {
        "SavedModel": saved_model,
        "Python API": python_api,
        "Python bf16 proj": python_bf16_proj,
        "Python bf16": python_bf16,
        **{name: lambda beam, name=name: saved_model(beam, signatures[name]) for name in exports},
        "Python whole vocab": lambda beam: (
            lambda batch: translator_whole.translate(batch, beam_size=beam)
        ),
    }
    rates = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        # Batch 1 over all sentences takes long; a slice gives the same rate.
        subset = sentences[: min(len(sentences), 200)] if batch_size == 1 else sentences
        for path_name in paths:
            make = makers[path_name]
            # Greedy and beam 5 interleaved, `rounds` times, the best of each kept: both
            # figures of a ratio see the same moments of a shared machine.
            for _ in range(args.rounds):
                for beam in (1, 5):
                    rate = sentences_per_second(make(beam), subset, batch_size)
                    key = path_name, beam, batch_size
                    rates[key] = max(rate, rates.get(key, 0.0))
            for beam in (1, 5):
                rate = rates[path_name, beam, batch_size]
                name = "greedy" if beam == 1 else f"beam {beam}"
                print(f"  {path_name:10s} {name:7s} batch {batch_size:3d}: "
                      f"{rate:8.1f} sentences/s", flush=True)  # fmt: skip

    def median_latency(fn):
        fn(sentences[:1])
        latencies = []
        for sentence in sentences[: args.latency]:
            start = time.perf_counter()
            fn([sentence])
            latencies.append(time.perf_counter() - start)
        return statistics.median(latencies) * 1e3

    latency = {
        (path_name, beam): median_latency(makers[path_name](beam))
        for path_name in paths
        for beam in (5, 1)
    }

    print("\nsummary")
    biggest = max(b for _, _, b in rates)
    for path_name in paths:
        cost = rates[path_name, 1, biggest] / rates[path_name, 5, biggest]
        print(f"  {path_name}: beam 5 costs {cost:.2f}x greedy at batch {biggest} (target <= "
              f"2.5x); median single-sentence latency: beam 5 {latency[path_name, 5]:.1f} ms "
              f"(target <= 35 ms), greedy {latency[path_name, 1]:.1f} ms")  # fmt: skip
    # Across paths: the fastest beam 5 against the fastest greedy, whichever paths they are.
    greedy = max(paths, key=lambda p: rates[p, 1, biggest])
    beam = max(paths, key=lambda p: rates[p, 5, biggest])
    print(f"  fastest beam 5 ({beam}) costs {rates[greedy, 1, biggest] / rates[beam, 5, biggest]:.2f}x "
          f"the fastest greedy ({greedy}) at batch {biggest}")  # fmt: skip
    for path_name in ("SavedModel", "SavedModel bf16", "SavedModel adaptive", "SavedModel float32"):
        if (path_name, 5, 32) in rates:
            rate = rates[path_name, 5, 32]
            print(f"  {path_name} beam 5 batch 32: {rate:.1f} sentences/s = {rate / 21.6:.2f}x "
                  "OpenNMT-tf's SavedModel figure (meaningful for the multi30k_lstm "
                  "architecture)")  # fmt: skip
    print("  peers (measured on this machine type, for context):")
    for name, figure in PEERS.items():
        print(f"    {name}: {figure}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
