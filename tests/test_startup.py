"""Quiet by default: TensorFlow's native start-up lines are filtered, nothing else is."""

import os
import subprocess
import sys

import pytest

from translator.startup import ENV_SHOW_ALL, native_stderr_filter

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
