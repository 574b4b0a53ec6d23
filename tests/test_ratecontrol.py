"""Rate control: save(target_size=..., target_bpp=...) picks the highest quality that fits."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

import pillow_sdlatent  # noqa: F401  (registers the format)
from pillow_sdlatent.core import ratecontrol
from pillow_sdlatent.core.container import Chunk
from pillow_sdlatent.core.settings import QuantSettings, settings_for

# ---------------------------------------------------------------- model-free search


def test_file_size_counts_signature_and_chunk_framing() -> None:
    chunks = [Chunk(b"HEAD", b"abc"), Chunk(b"SEND", b"")]
    assert ratecontrol.file_size(chunks) == 8 + (12 + 3) + 12


@pytest.mark.parametrize(
    ("size", "bpp", "expected"), [(1000, None, 1000), (None, 0.5, 600), (None, 1e-9, 1), (None, None, None)]
)
def test_budget_bytes(size, bpp, expected) -> None:
    assert ratecontrol.budget_bytes(120, 80, size, bpp) == expected


@pytest.mark.parametrize(
    ("size", "bpp", "match"),
    [(10, 0.5, "not both"), (0, None, "target_size"), (1.5, None, "target_size"), (True, None, "target_size"),
     (None, -1, "target_bpp"), (None, "1", "target_bpp"), (None, float("inf"), "finite")],
)  # fmt: skip
def test_budget_bytes_rejects_bad_values(size, bpp, match) -> None:
    with pytest.raises(ValueError, match=match):
        ratecontrol.budget_bytes(120, 80, size, bpp)


def _synthetic(sizes: dict[int, int]) -> tuple:
    """settings_for/build pair whose file at scalar levels L is sizes[L] bytes; counts builds."""
    calls: list[int] = []

    def build(s: QuantSettings) -> list[Chunk]:
        calls.append(s.levels)
        return [Chunk(b"LDAT", bytes(sizes[s.levels] - 8 - 12))]

    return (lambda q: settings_for(q, method="scalar")), build, calls


@pytest.mark.parametrize("budget", [500, 1234, 2000, 5000, 10_000])
def test_search_finds_the_highest_fitting_quality(budget: int) -> None:
    levels = {settings_for(q, method="scalar").levels for q in range(101)}
    sizes = {lv: 300 + 40 * lv for lv in levels}  # monotone in levels, so in quality
    settings, build, calls = _synthetic(sizes)
    quality, chunks = ratecontrol.fit_budget(settings, build, budget)
    best = max(q for q in range(101) if sizes[settings_for(q, method="scalar").levels] <= budget)
    assert quality == best
    assert ratecontrol.file_size(chunks) == sizes[settings_for(best, method="scalar").levels] <= budget
    assert len(calls) == len(set(calls)) <= 9  # each distinct setting built once, a bisection's worth


def test_search_raises_when_quality_zero_does_not_fit() -> None:
    levels = {settings_for(q, method="scalar").levels for q in range(101)}
    settings, build, _ = _synthetic({lv: 1000 + lv for lv in levels})
    with pytest.raises(ratecontrol.BudgetError, match=r"even quality 0 makes a 1002-byte file.*budget of 999 bytes"):
        ratecontrol.fit_budget(settings, build, 999)


def test_search_with_a_setting_quality_does_not_change() -> None:
    calls: list[QuantSettings] = []

    def build(s: QuantSettings) -> list[Chunk]:
        calls.append(s)
        return [Chunk(b"LDAT", bytes(100))]

    quality, _ = ratecontrol.fit_budget(lambda q: settings_for(q, method="palette"), build, 10_000)
    assert quality == 100 and len(calls) == 1


# ---------------------------------------------------------------- through Pillow, with TAESD


@pytest.fixture(scope="module")
def latents_and_sizes(kodak_dir: Path, taesd_dir: Path) -> tuple:
    """The crop, its latents (encoded once) and the file size at every quality."""
    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.pipeline import encode_latents, latents_to_chunks, split_image

    with Image.open(kodak_dir / "kodim23.png") as im:
        crop = im.convert("RGB").crop((300, 100, 396, 164))
    model = load_model(str(taesd_dir), "cpu")
    stored, rgb, alpha = split_image(crop)
    z = encode_latents(model, rgb)
    sizes = {}
    for q in range(101):
        s = settings_for(q)
        sizes[q] = ratecontrol.file_size(latents_to_chunks(z, model, s, crop.size, stored, alpha, preview_of=rgb))
    return crop, sizes


def _save(im: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "SDL", **options)
    return buf.getvalue()


def test_target_size_gives_the_best_fitting_file(latents_and_sizes, taesd_dir: Path) -> None:
    crop, sizes = latents_and_sizes
    assert sizes[0] < sizes[100], "file size must grow with quality for a budget to mean anything"
    for budget in (sizes[0], (sizes[0] + sizes[100]) // 2, sizes[100] - 1, sizes[100] + 500):
        data = _save(crop, model=str(taesd_dir), target_size=budget)
        assert len(data) <= budget
        # The range coder writes whole 32-bit words, so size is monotone in quality only up to a
        # few bytes; the bisection's promise: the chosen quality fits and the next one does not.
        chosen = [q for q in range(101) if sizes[q] == len(data)]
        assert any(q == 100 or sizes[q + 1] > budget for q in chosen)
        assert len(data) >= max(s for s in sizes.values() if s <= budget) - 8
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (12, 8))
            im.load()  # a valid file, with its preview
            assert im.size == (12, 8)


def test_target_bpp(latents_and_sizes, taesd_dir: Path) -> None:
    crop, sizes = latents_and_sizes
    bpp = (sizes[0] + sizes[100]) / 2 * 8 / (crop.width * crop.height)
    data = _save(crop, model=str(taesd_dir), target_bpp=bpp)
    assert len(data) * 8 / (crop.width * crop.height) <= bpp


def test_budget_too_small_writes_nothing(latents_and_sizes, taesd_dir: Path, tmp_path: Path) -> None:
    crop, sizes = latents_and_sizes
    buf = io.BytesIO()
    with pytest.raises(ValueError, match=f"even quality 0 makes a {sizes[0]}-byte file"):
        crop.save(buf, "SDL", model=str(taesd_dir), target_size=sizes[0] - 1)
    assert buf.getvalue() == b""
    path = tmp_path / "small.sdl"
    with pytest.raises(ValueError, match="over the budget"):
        crop.save(path, model=str(taesd_dir), target_bpp=0.01)
    assert not path.exists()


def test_quality_and_budget_conflict(gradient: Image.Image) -> None:
    with pytest.raises(ValueError, match="not both"):
        _save(gradient, quality=50, target_size=1000)
    with pytest.raises(ValueError, match="not both"):
        _save(gradient, target_size=1000, target_bpp=1.0)


@pytest.mark.parametrize(("shrink", "expect"), [(0.8, "higher"), (1.0, "same"), (1.3, "lower"), (20.0, "plain")])
def test_budget_with_search_chooses_quality_and_search_together(shrink: float, expect: str) -> None:
    # The search (refinement) changes the bytes by a ratio: where it saves bytes, the budget buys a higher quality
    # than the unrefined files' bisection found; where it spends bytes, a lower one; where no refined file fits,
    # the unrefined one is kept. The result always fits, and no search repeats a setting.
    from pillow_sdlatent.pipeline import BUDGET_SEARCHES, refined_within

    levels = {settings_for(q, method="scalar").levels for q in range(101)}
    sizes = {lv: 300 + 40 * lv for lv in levels}
    settings, build, _ = _synthetic(sizes)
    searched: list[int] = []

    def refined(s: QuantSettings) -> list[Chunk]:
        searched.append(s.levels)
        return [Chunk(b"LDAT", b"r" * (int(sizes[s.levels] * shrink) - 8 - 12))]

    budget = 3000
    found, plain = ratecontrol.fit_budget(settings, build, budget)
    out = refined_within(budget, found, plain, settings, build, refined)
    assert ratecontrol.file_size(out) <= budget and len(searched) == len(set(searched)) <= BUDGET_SEARCHES
    if expect == "plain":
        assert out is plain
        return
    assert out[0].payload[:1] == b"r"  # a refined file, of the highest levels whose refined file fits
    best = max(lv for lv in levels if int(sizes[lv] * shrink) <= budget)
    assert ratecontrol.file_size(out) == int(sizes[best] * shrink)
    at_found = settings(found).levels
    assert {"higher": best > at_found, "same": best == at_found, "lower": best < at_found}[expect]


@pytest.mark.parametrize("budget", [3000, 6000])
def test_budget_with_search_follows_a_drifting_ratio(budget: int) -> None:
    # The search saves fewer bytes at higher qualities (as at the top effort): the ratio measured at the first
    # quality overshoots, the second search's file is over the budget, and a third search between the two spends
    # the bytes the second left; the file still fits, and no search repeats a setting.
    from pillow_sdlatent.pipeline import BUDGET_SEARCHES, refined_within

    levels = {settings_for(q, method="scalar").levels for q in range(101)}
    sizes = {lv: 300 + 40 * lv for lv in levels}
    settings, build, _ = _synthetic(sizes)
    top = max(levels)

    def refined_size(lv: int) -> int:
        return int(sizes[lv] * (0.6 + 0.3 * lv / top))

    def run(searches: int) -> tuple[list[int], list[Chunk]]:
        searched: list[int] = []

        def refined(s: QuantSettings) -> list[Chunk]:
            searched.append(s.levels)
            return [Chunk(b"LDAT", b"r" * (refined_size(s.levels) - 8 - 12))]

        found, plain = ratecontrol.fit_budget(settings, build, budget)
        return searched, refined_within(budget, found, plain, settings, build, refined, searches)

    two = ratecontrol.file_size(run(2)[1])
    searched, out = run(BUDGET_SEARCHES)
    assert BUDGET_SEARCHES == 3 and len(searched) == len(set(searched)) == 3
    assert out[0].payload[:1] == b"r" and two < ratecontrol.file_size(out) <= budget
    assert ratecontrol.file_size(out) > 0.9 * max(refined_size(lv) for lv in levels if refined_size(lv) <= budget)
