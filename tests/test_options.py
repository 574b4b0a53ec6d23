"""One resolver for settings: argument > pillow_sdlatent.options > SDLATENT_* > default, for every setting."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import pillow_sdlatent
from pillow_sdlatent import options

PKG = Path(pillow_sdlatent.__file__).parent


@pytest.mark.parametrize(
    ("name", "env_text", "option", "argument", "default"),
    [
        ("REFINE", "7", 3, 5, 0),
        ("TILE_SIZE", "128", 0, 64, None),
        ("DENOISE", "0.5", 0.25, 0.125, 0.0),
        ("MODEL", "env-model", "option-model", "arg-model", None),
        ("DEVICE", "cuda:1", "cpu", "mps", None),
        ("DENOISE_MODEL", "env-unet", "option-unet", "arg-unet", None),
    ],
)
def test_precedence(monkeypatch: pytest.MonkeyPatch, name, env_text, option, argument, default) -> None:
    env = options.SETTINGS[name][0]
    monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(options, name, None)
    assert options.resolve(name) == default
    monkeypatch.setenv(env, env_text)
    assert options.resolve(name) == type(option)(env_text)
    monkeypatch.setattr(options, name, option)  # the option beats the environment
    assert options.resolve(name) == option
    assert options.resolve(name, argument) == argument  # the argument beats both


def test_bad_values_name_their_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "REFINE", None)
    monkeypatch.setenv("SDLATENT_REFINE", "many")
    with pytest.raises(ValueError, match="SDLATENT_REFINE must be a number of steps >= 0, got 'many'"):
        options.resolve("REFINE")
    monkeypatch.setattr(options, "REFINE", -2)
    with pytest.raises(ValueError, match=r"pillow_sdlatent\.options\.REFINE must be"):
        options.resolve("REFINE")
    with pytest.raises(ValueError, match="refine must be"):
        options.resolve("REFINE", "3")  # text counts only from the environment


def test_empty_environment_value_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "TILE_SIZE", None)
    monkeypatch.setenv("SDLATENT_TILE_SIZE", " ")
    assert options.resolve("TILE_SIZE") is None


def test_model_path_splits_on_pathsep(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(options, "MODEL_PATH", None)
    monkeypatch.setenv("SDLATENT_MODEL_PATH", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert options.resolve("MODEL_PATH") == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_every_setting_has_an_attribute_and_a_table_row() -> None:
    for name, (env, _, _) in options.SETTINGS.items():
        assert hasattr(options, name) and getattr(options, name) is None
        assert name in options.__doc__ and (env is None or env in options.__doc__)


def test_only_the_options_module_reads_sdlatent_variables() -> None:
    """No module but options.py reads SDLATENT_* from the environment (all go through options.resolve)."""
    pattern = re.compile(r"(environ|getenv)\W[^\n]*SDLATENT_")
    readers = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if pattern.search(p.read_text())]
    assert readers == []


def test_allow_model_mismatch_option_reaches_open(monkeypatch: pytest.MonkeyPatch, gradient, taesd_dir: Path,
                                                  taesdxl_dir: Path) -> None:  # fmt: skip
    import io

    buf = io.BytesIO()
    gradient.save(buf, "SDL", model=str(taesd_dir), quality=30)
    with pytest.raises(pillow_sdlatent.ModelMismatchError):
        pillow_sdlatent.open(io.BytesIO(buf.getvalue()), model=str(taesdxl_dir)).load()
    monkeypatch.setattr(options, "ALLOW_MODEL_MISMATCH", True)  # no argument given: the option decides
    im = pillow_sdlatent.open(io.BytesIO(buf.getvalue()), model=str(taesdxl_dir))
    im.load()
    assert im.size == gradient.size
    with pytest.raises(pillow_sdlatent.ModelMismatchError):  # the argument beats the option
        pillow_sdlatent.open(io.BytesIO(buf.getvalue()), model=str(taesdxl_dir), allow_model_mismatch=False).load()
