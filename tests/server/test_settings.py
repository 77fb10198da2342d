"""Settings come from the config dataclasses: one flag and one PACKSERVE_* variable per field,
the field's default and validation, the command line over the environment, loud errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from packserve.engine.config import EngineConfig
from packserve.server.settings import (
    Settings,
    add_config_flags,
    config_from_args,
    env_name,
    flag_name,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACKSERVE_") and name != "PACKSERVE_CACHE_DIR":
            monkeypatch.delenv(name)


def parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)
    return config_from_args(Settings, parser.parse_args(list(argv)))


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert parse() == Settings()
    assert parse().engine == EngineConfig()


def test_every_field_has_a_flag_and_a_variable() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)
    options = {o for a in parser._actions for o in a.option_strings}
    for cls in (Settings, EngineConfig):
        for f in fields(cls):
            if f.name == "engine":
                continue
            assert f"--{flag_name(f)}" in options, f.name
            assert f.metadata.get("help") or f.name == "api_key", f"{f.name} has no help"
            assert env_name(f) == "PACKSERVE_" + flag_name(f).upper().replace("-", "_")


def test_flags_and_variables_set_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKSERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("PACKSERVE_BATCH_INVARIANT", "true")
    monkeypatch.setenv("PACKSERVE_SHUTDOWN_TIMEOUT", "4.5")
    monkeypatch.setenv("PACKSERVE_PORT", "9000")
    settings = parse("--port", "9100", "--prefill-mode", "padded", "--no-log-prompts")
    assert settings.engine.max_num_seqs == 7
    assert settings.engine.batch_invariant is True
    assert settings.engine.prefill_mode == "padded"
    assert settings.shutdown_timeout_s == 4.5
    assert settings.port == 9100  # the command line wins
    monkeypatch.setenv("PACKSERVE_MAX_MODEL_LEN", "")  # empty: unset, the default
    assert parse().engine.max_model_len is None


def test_lora_modules_take_several_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """--lora-modules name=path [name=path ...], or the variable's values split on spaces;
    malformed or repeated names are refused."""
    settings = parse("--lora-modules", "a=/x/a", "b=/x/b=c", "--max-loras", "2")
    assert settings.engine.lora_paths == {"a": "/x/a", "b": "/x/b=c"}
    assert settings.engine.max_loras == 2 and settings.engine.lora_enabled
    monkeypatch.setenv("PACKSERVE_LORA_MODULES", "c=/y/c d=/y/d")
    assert parse().engine.lora_modules == ("c=/y/c", "d=/y/d")
    assert parse("--lora-modules", "e=/z").engine.lora_modules == ("e=/z",)  # the flag wins
    for bad in (("a",), ("=/x",), ("a=",), ("a=/x", "a=/y")):
        with pytest.raises(ValueError):
            parse("--lora-modules", *bad)
    assert not parse("--lora-modules").engine.lora_enabled


def test_api_key_never_shows(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PACKSERVE_API_KEY", "sekrit-123")
    settings = parse()
    assert settings.api_key == "sekrit-123"
    assert "sekrit" not in repr(settings)
    with pytest.raises(SystemExit):
        parse("--help")
    assert "sekrit" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({"PACKSERVE_PORT": "eighty"}, [], "PACKSERVE_PORT='eighty'"),
        ({"PACKSERVE_BATCH_INVARIANT": "maybe"}, [], "PACKSERVE_BATCH_INVARIANT='maybe'"),
        ({"PACKSERVE_DTYPE": "float8"}, [], "PACKSERVE_DTYPE='float8'"),
        ({}, ["--dtype", "float8"], "invalid choice"),
        ({}, ["--block-size", "0"], "block_size must be positive"),
        ({}, ["--port", "70000"], "port must be in 1..65535"),
        ({}, ["--packing-window-ms", "-5"], "packing_window_ms"),
    ],
)
def test_bad_values_stop_the_command_with_their_name(
    env: dict[str, str], argv: list[str], message: str
) -> None:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_")}
    run_env.update(env)
    result = subprocess.run(
        [sys.executable, "-m", "packserve.server.cli", "serve", *argv],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
