"""Steps/s of two MultiWorkerMirroredStrategy workers on loopback against one worker.

Trains the tiny config (Multi30k, from `TRANSLATOR_DATA_DIR`) for a few chunks with `translator
train`: one worker with the default strategy, with XLA as the config says and without it (the
distributed strategies train without XLA), then two workers on 127.0.0.1 with the config's
batch per replica (twice the tokens per step) and with half of it (the same tokens per step as
one worker). Prints the median steps/s and target tokens/s over the chunks after the first (which
includes tracing), and their ratio to one worker without XLA. On a machine with fewer cores than
workers need, two workers are slower: the figure is the overhead of the all-reduce and of the
second process.

    python bench/multi_worker.py [--steps 150] [--chunk 30] [--data-dir ../shared/data]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(run_dir, sets, workers=1, timeout=1800):
    """Runs `translator train` (`workers` processes with TF_CONFIG when > 1); returns its rates."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TRANSLATOR_QUIET": "1"}
    command = [sys.executable, "-m", "translator.cli", "train", "--config", "configs/tiny.yaml"]
    command += ["--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    procs = []
    if workers == 1:
        procs.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
        )
    else:
        from translator.training import loopback_cluster

        for tf_config in loopback_cluster(workers):
            procs.append(
                subprocess.Popen(
                    [*command, "--strategy", "multi_worker"],
                    cwd=ROOT,
                    env={**env, "TF_CONFIG": json.dumps(tf_config)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes != [0] * workers:
        raise RuntimeError(f"training in {run_dir} failed: exit codes {codes}")
    latest = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    history = json.loads((latest / "state.json").read_text())["history"][1:]
    return (
        statistics.median(h["steps_per_second"] for h in history),
        statistics.median(h["tokens_per_second"] for h in history),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--chunk", type=int, default=30, help="steps per checkpoint")
    parser.add_argument("--data-dir", default=os.environ.get("TRANSLATOR_DATA_DIR"))
    args = parser.parse_args()
    sets = [f"training.max_steps={args.steps}", f"training.steps_per_checkpoint={args.chunk}"]
    sets += ["training.validate_every=1000000"]  # no validation BLEU: time the steps only
    if args.data_dir:
        sets.append(f"data.data_dir={os.path.abspath(args.data_dir)}")
    batch = 1024  # configs/tiny.yaml's data.batch_tokens
    runs = [
        ("one worker, XLA", 1, []),
        ("one worker, no XLA", 1, ["training.jit_compile=false"]),
        (f"two workers, {batch} tokens per replica", 2, []),
        (f"two workers, {batch // 2} tokens per replica", 2, [f"data.batch_tokens={batch // 2}"]),
    ]
    with tempfile.TemporaryDirectory() as folder:
        results = {}
        for i, (name, workers, extra) in enumerate(runs):
            results[name] = train(Path(folder) / f"run{i}", sets + extra, workers)
    base_steps, base_tokens = results["one worker, no XLA"]
    print(f"{'':40s} {'steps/s':>8s} {'tokens/s':>9s}   ratios to one worker without XLA")
    for name, (steps, tokens) in results.items():
        print(
            f"{name:40s} {steps:8.2f} {tokens:9.0f}   "
            f"{steps / base_steps:.2f}x steps/s, {tokens / base_tokens:.2f}x tokens/s"
        )


if __name__ == "__main__":
    main()
