"""The README's "Use it from your own Keras code" example runs as written, in a fresh process."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Use it from your own Keras code"


def readme_example():
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the section should hold exactly one python example"
    return blocks[0]


def test_readme_keras_import_example_runs_on_an_export(tiny_export_dir):
    code = readme_example()
    assert 'keras.saving.load_model("saved_models/en-fr/model.keras")' in code
    # The same example on the tiny test model's export, in a process that imports it afresh.
    code = code.replace("saved_models/en-fr", str(tiny_export_dir))
    code += (
        "\nassert logits.shape == (1, 1, model.target_vocab_size), logits.shape"
        "\nassert tuple(constants['memory'].shape[:2]) == tuple(ids.shape), constants['memory'].shape"
        "\nprint('EXAMPLE OK')\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.rstrip("\n").split("\n")
    assert lines[-1] == "EXAMPLE OK"
    # The printed translation is what translator.load gives for the same sentence.
    import translator

    # Translator.from_model has no training config, so no split_length: load() without it too
    # (the tiny model's data.max_length, 16, would cut this sentence into pieces).
    loaded = translator.load(tiny_export_dir, split_length=None)
    expected = loaded.translate("A dog runs on the beach.").text
    assert lines[-2] == expected
