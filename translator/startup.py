"""TensorFlow's native start-up noise, kept off the terminal.

Importing TensorFlow (and initializing its devices) writes lines such as
``cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used`` and
``failed call to cuInit: ... (303)`` straight to file descriptor 2, from C++, before
``TF_CPP_MIN_LOG_LEVEL`` is read (tensorflow/tensorflow#100442). On a machine without a GPU
they are all harmless, and they bury a command's own output.

`native_stderr_filter()` captures descriptor 2 while TensorFlow starts, drops the lines that
match `NOISE` (and only those), and writes every other line back unchanged, so a real error
still reaches the terminal. The dropped lines are kept in `suppressed` (`translator -v` prints
them). Setting ``TRANSLATOR_TF_LOGS=1`` turns the filter off.

`configure_output` is the CLI's set-up: log levels (ours at INFO, TensorFlow's and absl's only
when they are errors or warnings) and the device start-up, filtered the same way.

Some lines come later, while a command runs: on CPUs with AVX-512, TensorFlow's graph optimizer
logs ``util.cc:131] oneDNN supports DT_INT64 only on platforms with AVX-512. Falling back to the
default Eigen-based implementation if present.`` at ERROR level the first time it optimizes a
graph, harmless too (the op runs on Eigen). Its log level is read once, when TensorFlow loads, so
it cannot be raised afterwards; `live_stderr_filter()` instead passes descriptor 2 through a small
filter process for the whole command: every byte that is not a `NOISE` line reaches the terminal
as it comes (progress bars included), and since the filter is a process of its own, what a
command writes just before it crashes (a C++ ``F`` line, a Python traceback) still gets through.

This module imports nothing heavy: it runs before TensorFlow is imported (`configure_output`
imports it when called).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile

# Lines TensorFlow prints on every start on a CPU-only machine (one regex per known message).
NOISE = re.compile(
    "|".join(
        [
            r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
            r"cudart_stub\.cc:\d+\] Could not find cuda drivers",
            r"cuda_platform\.cc:\d+\] failed call to cuInit",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"computation placer already registered",
            r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
            r"^To enable the following instructions: .*rebuild TensorFlow",
            r"oneDNN custom operations are on",
            # Graph optimization on CPUs with AVX-512 (not start-up: see live_stderr_filter).
            r"oneDNN supports DT_\w+ only on platforms with AVX-512",
        ]
    )
)
ENV_SHOW_ALL = "TRANSLATOR_TF_LOGS"

suppressed: list[str] = []  # the lines dropped so far, in order


@contextlib.contextmanager
def native_stderr_filter():
    """Within the block, lines written to descriptor 2 that match `NOISE` are dropped.

    Everything else written in the block (Python's own stderr included) is written back to
    descriptor 2 when the block ends, in order, even when the block raises.
    """
    if os.environ.get(ENV_SHOW_ALL, "") not in ("", "0"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a daemon, a closed stream): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = []
            for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True):
                (suppressed if NOISE.search(line) else kept).append(line)
            if kept:
                os.write(2, "".join(kept).encode("utf-8"))


# The filter process of `live_stderr_filter`: stdin is what the command writes to descriptor 2,
# stdout the real descriptor 2. Complete lines (ended by "\n", or by "\r" for progress bars) are
# checked against the pattern in argv[1]; an unfinished one is passed on once nothing more came
# for 50 ms (TensorFlow writes each log line in one call, so it is never a log line cut short).
_FILTER_SCRIPT = r"""
import os, re, select, sys
noise = re.compile(sys.argv[1])
pending = b""

def emit(parts):
    kept = [p for p in parts if not noise.search(p.decode("utf-8", "replace"))]
    if kept:
        data = b"".join(kept)
        while data:
            data = data[os.write(1, data):]

try:
    while True:
        if pending and not select.select([0], [], [], 0.05)[0]:
            emit([pending])
            pending = b""
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        parts = re.split(rb"(?<=[\r\n])", pending + chunk)
        pending = parts.pop()
        emit(parts)
    emit([pending] if pending else [])
except (BrokenPipeError, KeyboardInterrupt):
    pass
"""


@contextlib.contextmanager
def live_stderr_filter():
    """Within the block, descriptor 2 goes through a filter process that drops `NOISE` lines
    and passes everything else on, in order, as it is written.

    For a whole command (`translator.cli.main`): unlike `native_stderr_filter`, nothing is held
    back until the block ends, so progress bars and logs show as they happen. The filter runs
    in a session of its own (Ctrl-C reaches the command, not it) and outlives a command killed
    in the block: it passes on what was written and exits when the last writer is gone. Off
    with ``TRANSLATOR_TF_LOGS=1``, or where the filter process cannot start (then nothing is
    filtered).
    """
    if os.environ.get(ENV_SHOW_ALL, "") not in ("", "0"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2: nothing to filter
        yield
        return
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _FILTER_SCRIPT, NOISE.pattern],
            stdin=subprocess.PIPE,
            stdout=saved,
            stderr=saved,
            start_new_session=True,
        )
    except OSError:
        os.close(saved)
        yield
        return
    os.dup2(proc.stdin.fileno(), 2)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        proc.stdin.close()  # with descriptor 2 restored, the last write end here: EOF
        try:
            proc.wait(timeout=5)  # what it still holds reaches the terminal before we return
        except subprocess.TimeoutExpired:  # a child process of the command still writes to it
            pass


def configure_output(verbose: bool, start_devices: bool = True) -> None:
    """A command's output: our own INFO lines (progress, results); TensorFlow's only when they
    are errors.

    TensorFlow's native start-up lines were filtered when the package was imported; the device
    start-up here is filtered the same way. `verbose` (`-v`) shows everything: the filtered
    lines, TensorFlow's warnings, our DEBUG lines.

    Args:
        start_devices: Initialize TensorFlow's devices now, filtered (not for `train`: a
            multi-worker strategy must configure them first; training filters its own).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    import tensorflow as tf

    # TensorFlow's Python logger has a handler of its own: through ours too, each line twice.
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.propagate = False
    tf_logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    # absl's INFO lines (e.g. "Function `_translate` contains input name(s) ..." on export).
    logging.getLogger("absl").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if start_devices:
        with native_stderr_filter():  # the CUDA probe ("failed call to cuInit") on CPU-only hosts
            tf.config.list_logical_devices()
    if verbose:
        sys.stderr.writelines(suppressed)
