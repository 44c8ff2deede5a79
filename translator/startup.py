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
filter process for the whole command: everything but the `NOISE` lines themselves reaches the
terminal as it comes (progress bars included, and text written before a noise line on the same
line), and since the filter is a process of its own, what a command writes just before it
crashes (a C++ ``F`` line, a Python traceback) still gets through.

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
import threading

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


# Where a TensorFlow log line starts (absl's "E0000 00:00:1796618845.591843    3397 util.cc:131] "
# header, or one of the two header-less start-up lines): text written before it on the same line
# (a progress bar's unfinished update) is not part of it.
LOG_LINE_START = re.compile(
    r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+\] "
    r"|WARNING: All log messages before absl"
    r"|To enable the following instructions: "
)

# The filter process of `live_stderr_filter`: stdin is what the command writes to descriptor 2,
# stdout the real descriptor 2. Lines (ended by "\n", "\r\n", or "\r" alone for progress bars)
# are checked against NOISE from their last log-line start (LOG_LINE_START, else from their
# start): the noise is dropped, what came before it on the line kept. An unfinished line is
# passed on once nothing more came for 50 ms (TensorFlow writes each log line in one call, so it
# is never a log line cut short). Signals that stop a service (systemd's SIGTERM to the whole
# group, a terminal's SIGHUP or Ctrl-C) are ignored: the filter ends when the command's last
# write end closes, after passing everything on. A failed write (the terminal gone, a full disk)
# makes it discard from then on, never stop reading: the command never meets a broken pipe.
_FILTER_SCRIPT = r"""
import os, re, select, signal, sys
for name in ("SIGTERM", "SIGHUP", "SIGINT", "SIGQUIT"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
noise, start = re.compile(sys.argv[1]), re.compile(sys.argv[2])
pending, broken = "", False

def kept(line):
    starts = [m.start() for m in start.finditer(line)]
    cut = starts[-1] if starts else 0
    return line[:cut] if noise.search(line[cut:]) else line

def emit(lines):
    global broken
    data = "".join(kept(line) for line in lines).encode("utf-8", "surrogateescape")
    while data and not broken:
        try:
            data = data[os.write(1, data):]
        except BlockingIOError:  # a non-blocking stderr that is full for now: wait, retry
            select.select([], [1], [], 1.0)
        except OSError:
            broken = True

while True:
    if pending and not select.select([0], [], [], 0.05)[0]:
        emit([pending])
        pending = ""
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    # surrogateescape: bytes that are not UTF-8 (or a character cut by the read) pass unchanged.
    lines = re.split(r"(?<=\n)|(?<=\r)(?=[^\n])", pending + chunk.decode("utf-8", "surrogateescape"))
    pending = lines.pop()  # unfinished (or a "\r" that may start a "\r\n")
    emit(lines)
emit([pending] if pending else [])
"""


@contextlib.contextmanager
def live_stderr_filter():
    """Within the block, descriptor 2 goes through a filter process that drops `NOISE` lines
    and passes everything else on, in order, as it is written.

    For a whole command (`translator.cli.main`, from its main thread; not nested with other
    redirections of descriptor 2 except in LIFO order): unlike `native_stderr_filter`, nothing
    is held back until the block ends, so progress bars and logs show as they happen. The filter
    is a process of its own (`-I -S`: no site packages, no module of the working directory): it
    ignores the signals that stop a command, and outlives a command killed in the block, passing
    on what was written and exiting when the last writer is gone. If it ends early anyway,
    descriptor 2 goes back to the real stderr, unfiltered. Inside the block descriptor 2 is a
    pipe (not a terminal). Off with ``TRANSLATOR_TF_LOGS=1``, on Windows, or where the filter
    cannot start (then nothing is filtered).

    Yields the filter's `subprocess.Popen`, or `None` where there is no filter.
    """
    if os.environ.get(ENV_SHOW_ALL, "") not in ("", "0") or os.name != "posix":
        yield None
        return
    saved = proc = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _FILTER_SCRIPT,
                NOISE.pattern,
                LOG_LINE_START.pattern,
            ],
            stdin=subprocess.PIPE,
            stdout=saved,
            stderr=saved,
            start_new_session=True,
        )
    except (OSError, ValueError, TypeError):  # no descriptor 2, no interpreter to run
        if saved is not None:
            os.close(saved)
        saved = None
    if saved is None:  # outside the except clause: the command's errors are not chained to this
        yield None
        return
    lock = threading.Lock()
    active = True

    def fall_back_if_it_ends():
        proc.wait()
        with lock:
            if active:  # the filter died in the block (SIGKILL): stderr unfiltered, not lost
                os.dup2(saved, 2)

    os.dup2(proc.stdin.fileno(), 2)
    threading.Thread(target=fall_back_if_it_ends, daemon=True).start()
    try:
        yield proc
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        with lock:
            active = False
            os.dup2(saved, 2)
            os.close(saved)
        with contextlib.suppress(OSError):
            proc.stdin.close()  # with descriptor 2 restored, the last write end here: EOF
        try:
            # What it still holds reaches the terminal before we return. Longer only if a
            # child process of the command still holds descriptor 2 after the command.
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
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
