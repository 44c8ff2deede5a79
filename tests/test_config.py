"""Config loading: defaults, extends, overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest

from translator.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_base_yaml_lists_every_key_with_its_default():
    assert load_config(CONFIGS / "base.yaml") == Config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_merged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extends: %s\nmodel: {cell_type: gru}\n" % (CONFIGS / "tiny.yaml"))
    config = load_config(path, ["training.max_steps=7", "decoding.length_penalty=1.0"])
    assert config.model.cell_type == "gru"
    assert config.model.encoder_units == 32  # from tiny.yaml
    assert config.training.max_steps == 7
    assert config.decoding.length_penalty == 1.0


def test_unknown_key_names_key_file_and_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "model.hidden_size" in message and str(path) in message
    assert "unknown key" in message and "encoder_units" in message


def test_wrong_type_and_out_of_range_values(tmp_path):
    with pytest.raises(ConfigError, match=r"training.max_steps.*(integer|int)"):
        load_config(None, ["training.max_steps=lots"])
    with pytest.raises(ConfigError, match=r"model.dropout.*less than 1"):
        load_config(None, ["model.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"model.cell_type.*'lstm' or 'gru'.*'rnn'"):
        load_config(None, ["model.cell_type=rnn"])
    with pytest.raises(ConfigError, match=r"decoding.early_stopping.*'heuristic' or 'exact'"):
        load_config(None, ["decoding.early_stopping=never"])


def test_jit_compile_takes_auto_or_a_boolean():
    assert Config().training.jit_compile == "auto"
    assert load_config(None, ["training.jit_compile=false"]).training.jit_compile is False
    assert load_config(None, ["training.jit_compile=true"]).training.jit_compile is True
    with pytest.raises(ConfigError, match=r"training.jit_compile.*'auto'"):
        load_config(None, ["training.jit_compile=sometimes"])


def test_inconsistent_settings_are_explained():
    with pytest.raises(ConfigError, match="share_embeddings needs tokenizer.joint"):
        load_config(None, ["tokenizer.joint=false"])
    with pytest.raises(ConfigError, match="tie_embeddings"):
        load_config(None, ["model.tie_embeddings=true"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["training.max_steps"])
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
