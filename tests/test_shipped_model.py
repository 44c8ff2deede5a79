"""The shipped model (saved_models/en-fr) loads and translates the same through every public path.

Exports and `.keras` files made before a refactoring must keep loading: this reads the committed
model through `translator.load`, `keras.saving.load_model`, the SavedModel in a fresh process
(TensorFlow and TF Text only; TF2's loader and TF1's, TF Serving's path), the CLI and the REST
service, and checks they agree.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parents[1] / "saved_models" / "en-fr"
SENTENCES = ["A man is riding a bicycle.", "Two dogs are playing in the snow."]


def _run(args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def expected():
    from translator import load

    return [r.text for r in load(SHIPPED).translate(SENTENCES)]


def test_translate_is_french(expected):
    # The words any competent English->French model gets right in these two captions.
    assert "homme" in expected[0] and "vélo" in expected[0]
    assert "chiens" in expected[1] and "neige" in expected[1]


def test_keras_load_model_and_translator_from_model(expected):
    import keras

    import translator  # noqa: F401 - registers translator's Keras objects
    from translator.config import decoding_options, load_config
    from translator.inference import Translator
    from translator.shortlist import FILENAME, Shortlist

    model = keras.saving.load_model(SHIPPED / "model.keras")
    options = decoding_options(load_config(SHIPPED / "config.yaml").decoding)
    if (SHIPPED / FILENAME).is_file():  # what `load` adds from the directory
        options["shortlist"] = Shortlist.load(SHIPPED / FILENAME)
    texts = [r.text for r in Translator.from_model(model, **options).translate(SENTENCES)]
    assert texts == expected


def test_saved_model_in_a_fresh_process(expected):
    code = f"""
import json, sys
import tensorflow as tf, tensorflow_text
from pathlib import Path
base = Path({str(SHIPPED)!r})
latest = max((p for p in base.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
model = tf.saved_model.load(str(latest))
out = model.signatures["serving_default"](text=tf.constant({SENTENCES!r}))
assert not any(m == "translator" or m.startswith("translator.") for m in sys.modules)
# A source over 255 subwords is refused, never cut (the export of 2026-12-06 on).
try:
    model.signatures["serving_default"](text=tf.constant(["a " * 400]))
    sys.exit("an over-long source was translated, not refused")
except tf.errors.InvalidArgumentError as e:
    assert "over the limit of 255 subwords" in e.message, e.message
# So is a beam over 64 (the export of 2026-12-07, session 14, on).
try:
    model.signatures["translate"](text=tf.constant(["a"]), beam_size=tf.constant(65),
                                  n_best=tf.constant(1), length_penalty=tf.constant(1.0))
    sys.exit("a beam of 65 was searched, not refused")
except tf.errors.InvalidArgumentError as e:
    assert "beam_size must be at most 64" in e.message, e.message
# TF1's Session loader, the path of TF Serving's C++ server: it restores the variables through
# the SavedModel's saver, and left a Keras model's own variables uninitialized.
with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(latest))
    signature = meta.signature_def["serving_default"]
    tf1 = session.run(signature.outputs["translation"].name,
                      {{signature.inputs["text"].name: {SENTENCES!r}}})
print(json.dumps([[t.decode() for t in out["translation"].numpy()], [t.decode() for t in tf1]]))
"""
    served, tf1 = json.loads(_run([sys.executable, "-c", code]).strip().splitlines()[-1])
    assert served == expected
    assert tf1 == expected


def test_cli(expected):
    out = _run(
        [sys.executable, "-m", "translator", "translate", "--model", str(SHIPPED), *SENTENCES]
    )
    assert out.strip().splitlines() == expected


def test_rest(expected):
    from fastapi.testclient import TestClient

    from translator.server import ServerSettings, create_app

    with TestClient(create_app(settings=ServerSettings(model=str(SHIPPED)))) as client:
        deadline = time.monotonic() + 240
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # the model loads and warms up in the background
        response = client.post("/v1/translate", json={"texts": SENTENCES})
    assert response.status_code == 200, response.text
    assert [t["text"] for t in response.json()["translations"]] == expected
