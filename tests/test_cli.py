"""The ``sdlatent`` command line, run as users run it: in a subprocess, on a folder of small images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pillow_sdlatent  # noqa: F401  (registers the format)
from pillow_sdlatent import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _model(monkeypatch: pytest.MonkeyPatch, taesd_dir: Path) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))  # for decoding in this process too


@pytest.fixture
def env(taesd_dir: Path) -> dict[str, str]:
    e = dict(os.environ, SDLATENT_MODEL=str(taesd_dir), SDLATENT_DEVICE="cpu", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def sdlatent(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pillow_sdlatent", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.fixture
def images(tmp_path: Path, kodak_crop: Image.Image) -> Path:
    """imgs/a.png (RGB), imgs/sub/b.jpg (RGB), imgs/c.png (RGBA), imgs/broken.png (corrupt): 48x40 each."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    kodak_crop.crop((0, 0, 48, 40)).save(folder / "a.png")
    kodak_crop.crop((40, 10, 88, 50)).save(folder / "sub" / "b.jpg", quality=95)
    rgba = kodak_crop.crop((20, 20, 68, 60)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((48, 40)))
    rgba.save(folder / "c.png")
    (folder / "broken.png").write_bytes((folder / "a.png").read_bytes()[:60])  # a cut PNG
    return folder


def test_convert_both_ways_with_a_corrupt_input(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    r = sdlatent(["convert", str(images), "-o", str(out), "--batch-size", "2"], env)
    assert r.returncode == 1, r.stderr  # one file failed
    assert "broken.png" in r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.sdl", "c.sdl", "sub", "sub/b.sdl"]
    assert "3 converted, 0 skipped, 1 failed" in r.stdout and ":1 smaller)" in r.stdout
    with Image.open(out / "c.sdl") as im:
        assert im.format == "SDL" and im.mode == "RGBA" and im.size == (48, 40)
    # the same chunks as Image.save writes, the model-free preview included
    assert "prVw" in [c["type"] for c in cli.file_info(out / "a.sdl")["chunks"]]

    back = tmp_path / "back"
    r = sdlatent(["convert", str(out), "-o", str(back)], env)
    assert r.returncode == 0, r.stderr
    assert "3 converted, 0 skipped, 0 failed" in r.stdout
    for name, mode in (("a.png", "RGB"), ("c.png", "RGBA"), ("sub/b.png", "RGB")):
        with Image.open(back / name) as im:
            assert im.format == "PNG" and im.mode == mode and im.size == (48, 40)
    # the decoded PNG is the image the plugin decodes from the .sdl
    with Image.open(out / "a.sdl") as sdl, Image.open(back / "a.png") as png:
        assert np.array_equal(np.asarray(sdl), np.asarray(png))
    with Image.open(images / "c.png") as src, Image.open(back / "c.png") as png:
        assert np.array_equal(np.asarray(src.getchannel("A")), np.asarray(png.getchannel("A")))


def test_skip_existing_unless_overwrite(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    (images / "broken.png").unlink()
    src = images / "a.png"
    dst = tmp_path / "a.sdl"
    dst.write_bytes(b"placeholder")
    r = sdlatent(["convert", str(src), "-o", str(dst)], env)
    assert r.returncode == 0 and "0 converted, 1 skipped" in r.stdout
    assert dst.read_bytes() == b"placeholder"
    r = sdlatent(["convert", str(src), "-o", str(dst), "--overwrite", "--quality", "50"], env)
    assert r.returncode == 0 and "1 converted, 0 skipped" in r.stdout, r.stderr
    with Image.open(dst) as im:
        assert im.format == "SDL"


INTERRUPT = textwrap.dedent(
    """
    import os, signal, sys
    from pillow_sdlatent import _atomic, cli

    def die(fd):  # the process dies after writing its data, before the rename
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt

    _atomic.os.fsync = die
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def _interrupted(how: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INTERRUPT, how, "convert", *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_killed_write_leaves_no_partial_file(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "a.sdl"
    r = _interrupted("kill", [str(images / "a.png"), "-o", str(dst)], env)
    assert r.returncode == -9 and not dst.exists()
    # at most a hidden temporary file remains, which folder conversion ignores
    assert all(p.name.startswith(".a.sdl.") and p.name.endswith(".tmp") for p in out.iterdir())
    assert cli.collect_jobs([str(out)], None, None)[0] == []
    # an existing output survives a killed --overwrite intact
    dst.write_bytes(b"previous version")
    r = _interrupted("kill", [str(images / "a.png"), "-o", str(dst), "--overwrite"], env)
    assert r.returncode == -9 and dst.read_bytes() == b"previous version"


def test_ctrl_c_removes_the_temporary_file(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    dst = tmp_path / "a.sdl"
    dst.write_bytes(b"previous version")
    r = _interrupted("ctrl-c", [str(images / "a.png"), "-o", str(dst), "--overwrite"], env)
    assert r.returncode == 130 and "interrupted" in r.stderr
    assert dst.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["a.sdl"]


BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from pillow_sdlatent import cli
    rc = cli.main(sys.argv[1:])
    sys.exit(rc)
    """
)


def test_info_json_without_torch(tmp_path: Path, kodak_crop: Image.Image, env: dict[str, str]) -> None:
    from pillow_sdlatent.models import load_model

    path = tmp_path / "k.sdl"
    kodak_crop.save(path, quality=60)
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "info", "--json", str(path)], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (d,) = json.loads(r.stdout)
    model = load_model(env["SDLATENT_MODEL"], "cpu")
    assert d["file"] == str(path) and d["file_size"] == path.stat().st_size
    assert (d["width"], d["height"], d["mode"]) == (96, 64, "RGB")
    assert d["model_id"] == "taesd" and d["fingerprint"] == model.fingerprint.hex()
    assert d["latent_shape"] == [4, 8, 12] and d["downscale"] == 8
    assert d["quantizer"] == "transform" and d["coder"] == "transform"  # the default method
    assert len(d["levels"]) == 4 and d["palette_size"] == 0
    types = [c["type"] for c in d["chunks"]]
    assert types[0] == "HEAD" and types[-1] == "SEND" and "LDAT" in types
    assert sum(c["length"] + 12 for c in d["chunks"]) + 8 == d["file_size"]
    assert d["bpp"] == pytest.approx(d["file_size"] * 8 / (96 * 64))

    # text output, and a non-.sdl file in the list: reported, exit status 1, the others still shown
    not_sdl = tmp_path / "x.png"
    kodak_crop.save(not_sdl)
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "info", str(path), str(not_sdl)], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1
    assert "96x64 RGB" in r.stdout and model.fingerprint.hex() in r.stdout
    assert "x.png: not an SDL file" in r.stderr


def test_info_through_python_m_does_not_import_torch(tmp_path: Path, kodak_crop: Image.Image, env) -> None:
    path = tmp_path / "k.sdl"
    kodak_crop.save(path)
    code = (
        "import runpy, sys; sys.argv = ['sdlatent', 'info', sys.argv[1]]\n"
        "try:\n    runpy.run_module('pillow_sdlatent', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'info imported torch'\nprint('OK')"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr


# ---------------------------------------------------------------- in-process: planning, bench, entry points


def _plan(sources: list[Path], out: Path | None = None, to: str | None = None):
    jobs, errors = cli.collect_jobs([str(s) for s in sources], str(out) if out else None, cli._normalize_to(to))
    return {(j.src.name, str(j.dst)) for j in jobs}, errors


def test_output_paths(tmp_path: Path, images: Path) -> None:
    jobs, errors = _plan([images], tmp_path / "o")
    assert ("b.jpg", str(tmp_path / "o" / "sub" / "b.sdl")) in jobs and len(jobs) == 4 and not errors
    jobs, _ = _plan([images / "a.png"])
    assert jobs == {("a.png", str(images / "a.sdl"))}
    jobs, _ = _plan([Path(str(images / "**" / "*.jpg"))], tmp_path / "o")  # a glob keeps the structure below it
    assert jobs == {("b.jpg", str(tmp_path / "o" / "sub" / "b.sdl"))}
    jobs, errors = _plan([images / "a.png", tmp_path / "missing.png"], to="webp")
    assert not jobs
    assert errors == [
        (str(tmp_path / "missing.png"), "no such file or folder"),
        (str(images / "a.png"), "neither input nor output (.webp) is .sdl"),
    ]
    with pytest.raises(ValueError, match="cannot write"):
        cli._normalize_to("nosuchformat")


def test_never_overwrites_an_input(tmp_path: Path, images: Path) -> None:
    # a.png -> a.sdl and a.sdl -> a.png in one folder: each output is the other's input
    (images / "a.sdl").write_bytes(b"\x89SDL\r\n\x1a\n")
    jobs, errors = _plan([images / "a.png", images / "a.sdl"])
    assert not any(src in ("a.png", "a.sdl") for src, _ in jobs)
    assert len([m for _, m in errors if "would overwrite an input" in m]) == 2
    # two inputs with one output name
    Image.new("RGB", (8, 8)).save(images / "c.jpg")
    jobs, errors = _plan([images / "c.png", images / "c.jpg"])
    assert not jobs  # neither is converted, and both are reported, each naming the other
    assert sorted(errors) == [
        (str(images / "c.jpg"), f"output {(images / 'c.sdl').resolve()} is also the output of {images / 'c.png'}; "
         "convert them separately"),
        (str(images / "c.png"), f"output {(images / 'c.sdl').resolve()} is also the output of {images / 'c.jpg'}; "
         "convert them separately"),
    ]  # fmt: skip


def test_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(cli, "find_benchmark", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "benchmarks/rd.py not found" in capfd.readouterr().err
    monkeypatch.undo()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "rd.py").write_text("import sys; print(sys.argv[1:]); sys.exit(3)")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--images", "3", "--help"]) == 3  # its exit status, arguments passed through
    assert "['--images', '3', '--help']" in capfd.readouterr().out


def test_console_script_entry() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["sdlatent"] == "pillow_sdlatent.cli:main"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "x.png", "--batch-size", "0"])
    assert exc.value.code == 2


def test_an_image_that_breaks_its_batch_fails_alone(tmp_path: Path, images: Path, monkeypatch, capsys) -> None:
    from pillow_sdlatent import pipeline

    real = pipeline.encode_batch

    def flaky(model, rgbs, batch_size=8, refine=None):  # as if one image ran out of memory
        if any(np.array_equal(rgb, rgb_b) for rgb in rgbs):
            raise RuntimeError("out of memory")
        return real(model, rgbs, batch_size, refine)

    with Image.open(images / "sub" / "b.jpg") as im:
        rgb_b = np.asarray(im.convert("RGB"))
    monkeypatch.setattr(pipeline, "encode_batch", flaky)
    (images / "broken.png").unlink()
    rc = cli.main(["convert", str(images), "-o", str(tmp_path / "out"), "--quiet", "--batch-size", "8"])
    captured = capsys.readouterr()
    assert rc == 1 and "b.jpg: RuntimeError: out of memory" in captured.err
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.sdl")) == ["a.sdl", "c.sdl"]
    assert "2 converted, 0 skipped, 1 failed" in captured.out


def _sdl_files(folder: Path, n: int) -> list[str]:
    from pillow_sdlatent.core.settings import QuantSettings
    from pillow_sdlatent.testing import build_file

    folder.mkdir(exist_ok=True)
    paths = [folder / f"f{i}.sdl" for i in range(n)]
    for i, path in enumerate(paths):
        path.write_bytes(build_file(16, 16, "RGB", 4, QuantSettings("scalar", 16), i))
    return [str(p) for p in paths]


def test_info_into_a_closed_pipe_is_quiet(tmp_path: Path, env: dict[str, str]) -> None:
    files = " ".join(_sdl_files(tmp_path / "many", 60))
    r = subprocess.run(f"{sys.executable} -m pillow_sdlatent info {files} | head -1", shell=True, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.stdout.startswith(str(tmp_path)) and r.stdout.count("\n") == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_output_file_with_several_inputs_is_a_usage_error(tmp_path: Path, images: Path, capsys) -> None:
    existing = tmp_path / "x.sdl"
    existing.write_bytes(b"keep")
    assert cli.main(["convert", str(images / "a.png"), str(images / "c.png"), "-o", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"-o {existing} is an existing file" in err
    assert existing.read_bytes() == b"keep"


def test_summary_texts() -> None:
    assert cli.summary(cli.Stats(), 0.4) == "sdlatent: 0 converted, 0 skipped, 0 failed"
    decoded = cli.summary(cli.Stats(converted=2, bytes_in=2_000, bytes_out=100_000), 4.0)
    assert (
        decoded
        == "sdlatent: 2 converted, 0 skipped, 0 failed in 4.0 s (0.50 images/s); 2.0 kB in, 100.0 kB out (50.0x larger)"
    )
    encoded = cli.summary(cli.Stats(converted=1, bytes_in=100_000, bytes_out=4_000), 1.0)
    assert encoded.endswith("100.0 kB in, 4.0 kB out (25.0:1 smaller)")


def test_each_error_is_printed_once(tmp_path: Path, images: Path, capsys) -> None:
    assert cli.main(["convert", str(images / "broken.png"), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("broken.png") == 1, captured.err
    assert "0 converted, 0 skipped, 1 failed" in captured.out


def test_interrupted_summary_goes_where_the_normal_one_does(tmp_path: Path, images: Path, monkeypatch,
                                                            capsys) -> None:  # fmt: skip
    def interrupted(self, jobs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Converter, "encode", interrupted)
    assert cli.main(["convert", str(images / "a.png"), "-o", str(tmp_path / "out"), "--quiet"]) == 130
    captured = capsys.readouterr()
    assert captured.out.startswith("sdlatent: 0 converted") and "interrupted" in captured.err


def test_bench_help_names_no_issue() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rd.py"), "--help"], capture_output=True, text=True,
                       timeout=60, check=True)  # fmt: skip
    assert "issue" not in r.stdout.lower()


def test_cpu_batch_defaults_to_one_and_the_option_still_batches(tmp_path: Path, images: Path, monkeypatch) -> None:
    from pillow_sdlatent import pipeline

    real, sizes = pipeline.encode_batch, []

    def counting(model, rgbs, batch_size=8, refine=None):
        sizes.append(len(rgbs))
        return real(model, rgbs, batch_size, refine)

    monkeypatch.setattr(pipeline, "encode_batch", counting)
    (images / "broken.png").unlink()
    assert cli.main(["convert", str(images), "-o", str(tmp_path / "one"), "--quiet", "--device", "cpu"]) == 0
    assert sizes == [1, 1, 1]
    sizes.clear()
    assert cli.main(["convert", str(images), "-o", str(tmp_path / "two"), "--quiet", "-b", "2", "--device", "cpu"]) == 0
    assert sizes == [2, 1]


def test_info_system_says_what_runs_and_why(capsys, monkeypatch) -> None:
    monkeypatch.setenv("SDLATENT_BACKEND", "torch")
    monkeypatch.setenv("SDLATENT_DEVICE", "cpu")
    monkeypatch.delenv("SDLATENT_DTYPE", raising=False)
    assert cli.main(["info", "--system", "--json"]) == 0
    system = json.loads(capsys.readouterr().out)
    assert system["device"] == "cpu" and system["backend"] == "torch"
    assert system["backend_reason"] == "asked for (SDLATENT_BACKEND=torch)"
    amx = system["amx"] == "yes"
    assert system["precision"].startswith("bfloat16" if amx else "float32")
    assert ("with AMX" if amx else "without AMX") in system["precision_reason"]
    assert cli.main(["info"]) == 2  # neither files nor --system
