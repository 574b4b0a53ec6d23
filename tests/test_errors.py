"""Every exception class of the package lives in pillow_sdlatent.errors and is exported by pillow_sdlatent."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pillow_sdlatent
from pillow_sdlatent import errors


def _package_exceptions() -> set[type]:
    found = set()
    for mod in pkgutil.walk_packages(pillow_sdlatent.__path__, "pillow_sdlatent."):
        if mod.name.endswith(("__main__", ".testing")):  # the fuzzer's verdicts (Crash, Hang) are not raised to users
            continue
        module = importlib.import_module(mod.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("pillow_sdlatent")
            ):
                found.add(value)
    return found


def test_every_exception_class_is_exported_from_one_module() -> None:
    classes = _package_exceptions()
    assert len(classes) >= 8
    for cls in classes:
        assert getattr(errors, cls.__name__) is cls, cls
        assert getattr(pillow_sdlatent, cls.__name__) is cls, cls
        assert cls.__name__ in pillow_sdlatent.__all__ and cls.__name__ in errors.__all__


def test_errors_module_imports_only_the_standard_library_and_pillow() -> None:
    # PIL: DecodeBudgetError is a DecompressionBombError; registering the plugin imports PIL.Image anyway
    tree = ast.parse(Path(errors.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert names <= set(sys.stdlib_module_names) | {"__future__", "PIL"}, names
    assert issubclass(errors.DecodeBudgetError, errors.Image.DecompressionBombError)


def test_format_error_is_both_oserror_and_valueerror() -> None:
    assert issubclass(errors.FormatError, OSError) and issubclass(errors.FormatError, ValueError)
    assert issubclass(errors.ModelNotFoundError, FileNotFoundError)
