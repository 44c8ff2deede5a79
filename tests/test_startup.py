"""Quiet by default: TensorFlow's native start-up lines are filtered, nothing else is."""

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from translator.startup import ENV_SHOW_ALL, NOISE, native_stderr_filter

NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796544428.592041   17944 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n",
    "E0000 00:00:1796544465.647649   17944 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
]


def _run_filtered(script: str, env=None) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter (its descriptor 2 is a pipe we read)."""
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


WRITER = f"""
import os, sys
from translator.startup import native_stderr_filter, suppressed
noise = {NOISE_LINES!r}
before = len(suppressed)  # importing translator filtered TensorFlow's own start-up lines
try:
    with native_stderr_filter():
        os.write(2, noise[0].encode())
        os.write(2, b"a real error from C++\\n")
        os.write(2, (noise[1] + noise[2]).encode())
        sys.stderr.write("python's own warning\\n")
        raise KeyError("boom")
except KeyError:
    pass
os.write(2, b"after the block\\n")
print(suppressed[before:] == noise)
"""


def test_filter_drops_only_known_noise_and_keeps_the_rest_in_order():
    proc = _run_filtered(WRITER)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "a real error from C++\npython's own warning\nafter the block\n"
    assert proc.stdout.strip() == "True"  # the noise lines, kept for `translator -v`


def test_filter_is_off_when_asked():
    proc = _run_filtered(WRITER, env={ENV_SHOW_ALL: "1"})
    assert proc.returncode == 0
    for line in NOISE_LINES:
        assert line in proc.stderr
    assert "a real error from C++\n" in proc.stderr


def test_filter_restores_descriptor_2(capfd):
    with native_stderr_filter():
        os.write(2, NOISE_LINES[1].encode())
    os.write(2, b"visible\n")
    assert capfd.readouterr().err == "visible\n"


# On CPUs with AVX-512, TensorFlow's graph optimizer logs this at ERROR level while a command runs.
RUNTIME_NOISE = (
    "E0000 00:00:1796618845.591843    3397 util.cc:131] oneDNN supports DT_INT64 only on "
    "platforms with AVX-512. Falling back to the default Eigen-based implementation if present.\n"
)

STARTUP_PY = Path(__file__).resolve().parents[1] / "translator" / "startup.py"
# startup.py alone, not the package (which imports TensorFlow: seconds per process).
LIVE_WRITER = f"""
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("startup", {str(STARTUP_PY)!r})
startup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(startup)
with startup.live_stderr_filter():
    os.write(2, {RUNTIME_NOISE!r}.encode())
    os.write(2, b"a real error from C++\\n")
    os.write(2, b"\\rprogress 1/2")  # a progress bar: no newline until the end
    os.write(2, b"\\rprogress 2/2" + {RUNTIME_NOISE!r}.encode())  # noise right after it
    os.write(2, b"caf\\xe9 in latin-1\\r\\n")  # not UTF-8, and a CRLF line
    os.write(2, {RUNTIME_NOISE[:-1] + chr(13) + chr(10)!r}.encode())  # noise ending in CRLF
    sys.stderr.write("python's own warning\\n")
    if sys.argv[1:] == ["crash"]:
        os.write(2, b"last words\\n")
        os.kill(os.getpid(), signal.SIGKILL)  # no code of ours runs after this
os.write(2, b"after the block\\n")
"""


def test_runtime_noise_is_a_noise_line():
    assert NOISE.search(RUNTIME_NOISE)
    assert not NOISE.search("E0000 util.cc:131] oneDNN failed to allocate a buffer")


@pytest.mark.parametrize("crash", [False, True])
def test_live_filter_passes_everything_but_noise_even_when_killed(crash):
    proc = subprocess.run(
        [sys.executable, "-c", LIVE_WRITER, *(["crash"] if crash else [])],
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != ENV_SHOW_ALL},
        timeout=120,
    )
    # Only the noise goes: the progress text before it on its line, bytes that are not UTF-8
    # and line endings stay as they were written.
    kept = (
        b"a real error from C++\n\rprogress 1/2\rprogress 2/2"
        b"caf\xe9 in latin-1\r\npython's own warning\n"
    )
    if crash:  # the filter is a process of its own: the command's last words still get out
        assert proc.returncode == -9
        assert proc.stderr == kept + b"last words\n"
    else:
        assert proc.returncode == 0
        assert proc.stderr == kept + b"after the block\n"


def test_live_filter_passes_text_on_as_it_comes():
    """A progress bar's update shows while the command still runs (the filter holds nothing
    back until the end): the writer waits for us before it goes on."""
    writer = LIVE_WRITER.split("with startup")[0] + (
        "with startup.live_stderr_filter():\n"
        "    os.write(2, b'\\rtranslated 1/2')\n"
        "    sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != ENV_SHOW_ALL},
    )
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"translated 1/2" not in seen and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 1)[0]:
                seen += os.read(proc.stderr.fileno(), 1024)
        assert seen == b"\rtranslated 1/2" and proc.poll() is None  # shown, still running
        proc.stdin.write(b"go on\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_stderr_falls_back_to_unfiltered_if_the_filter_dies():
    writer = LIVE_WRITER.split("with startup")[0] + (
        "import time\n"
        "terminal = os.fstat(2).st_ino\n"
        "with startup.live_stderr_filter() as filt:\n"
        "    os.write(2, b'through the filter\\n')\n"
        "    os.kill(filt.pid, signal.SIGKILL)\n"
        "    deadline = time.monotonic() + 60\n"
        "    while os.fstat(2).st_ino != terminal and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    os.write(2, b'after it died\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", writer],
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != ENV_SHOW_ALL},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.endswith(b"after it died\n")  # not lost in a dead pipe, no BrokenPipe


def test_live_filter_is_off_when_asked():
    proc = subprocess.run(
        [sys.executable, "-c", LIVE_WRITER],
        capture_output=True,
        env={**os.environ, ENV_SHOW_ALL: "1"},
        timeout=120,
    )
    assert proc.returncode == 0
    assert RUNTIME_NOISE.encode() in proc.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_prints_only_the_translation_unless_verbose(tiny_export_dir, verbose):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", ENV_SHOW_ALL)}
    args = ["-v"] if verbose else []
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "translator",
            *args,
            "translate",
            "--model",
            str(tiny_export_dir),
            "one red cat",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 1
    if verbose:
        assert "cuda" in proc.stderr.lower()  # what was filtered is shown with -v
    else:
        assert proc.stderr == ""
