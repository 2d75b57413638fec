from __future__ import annotations

import os
from pathlib import Path

import av
import pytest
from PIL import Image, ImageChops

from gateway.render import RenderedAssets, probe_video, render_video

WIDTH = 320
HEIGHT = 240
SECONDS = 2
FPS = 12
PROMPT = "A red fox trotting through fresh snow at dawn"


def _render(out_dir: Path, **overrides: object) -> RenderedAssets:
    kwargs: dict[str, object] = {
        "prompt": PROMPT,
        "width": WIDTH,
        "height": HEIGHT,
        "seconds": SECONDS,
        "fps": FPS,
    }
    kwargs.update(overrides)
    return render_video(out_dir, **kwargs)  # type: ignore[arg-type]


def _decode(path: Path) -> tuple[str, float, list[Image.Image]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        assert container.duration is not None
        duration = container.duration / av.time_base
        frames = [frame.to_image() for frame in container.decode(stream)]
    return codec, duration, frames


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> RenderedAssets:
    return _render(tmp_path_factory.mktemp("render") / "job")


def test_writes_the_three_assets_and_no_temp_files(assets: RenderedAssets) -> None:
    out_dir = assets.video.parent
    assert assets.video == out_dir / "video.mp4"
    assert assets.thumbnail == out_dir / "thumbnail.webp"
    assert assets.spritesheet == out_dir / "spritesheet.jpg"
    assert sorted(os.listdir(out_dir)) == ["spritesheet.jpg", "thumbnail.webp", "video.mp4"]


def test_video_is_h264_with_exact_frames_size_and_duration(assets: RenderedAssets) -> None:
    codec, duration, frames = _decode(assets.video)
    assert codec == "h264"
    assert len(frames) == SECONDS * FPS
    assert all(frame.size == (WIDTH, HEIGHT) for frame in frames)
    assert duration == pytest.approx(SECONDS, abs=0.2)


def test_video_frames_change_over_time(assets: RenderedAssets) -> None:
    _, _, frames = _decode(assets.video)
    difference = ImageChops.difference(frames[0], frames[len(frames) // 2]).convert("L")
    changed = sum(difference.point(lambda value: 255 if value > 40 else 0).histogram()[255:])
    assert changed > 0.01 * WIDTH * HEIGHT


def test_video_is_faststart(assets: RenderedAssets) -> None:
    head = assets.video.read_bytes()
    assert head.index(b"moov") < head.index(b"mdat")


def test_thumbnail_is_webp_of_video_size(assets: RenderedAssets) -> None:
    with Image.open(assets.thumbnail) as image:
        assert image.format == "WEBP"
        assert image.size == (WIDTH, HEIGHT)


def test_spritesheet_is_jpeg_with_one_tile_per_second(assets: RenderedAssets) -> None:
    with Image.open(assets.spritesheet) as image:
        assert image.format == "JPEG"
        assert image.size == (160 * SECONDS, 120)


def test_same_prompt_gives_same_background_colour(tmp_path: Path) -> None:
    first = _render(tmp_path / "a", seconds=1)
    second = _render(tmp_path / "b", seconds=1)
    other = _render(tmp_path / "c", seconds=1, prompt="Something else entirely")
    pixels = []
    for assets in (first, second, other):
        with Image.open(assets.thumbnail) as image:
            pixels.append(image.convert("RGB").getpixel((WIDTH // 2, HEIGHT - 40)))
    assert pixels[0] == pixels[1]
    assert pixels[0] != pixels[2]


def test_unreadable_reference_image_is_ignored(tmp_path: Path) -> None:
    junk = tmp_path / "reference.png"
    junk.write_bytes(os.urandom(4096))
    assets = _render(tmp_path / "job", seconds=1, reference_image=junk)
    _, _, frames = _decode(assets.video)
    assert len(frames) == FPS


def test_missing_reference_image_is_ignored(tmp_path: Path) -> None:
    assets = _render(tmp_path / "job", seconds=1, reference_image=tmp_path / "missing.png")
    assert assets.video.exists()


def test_png_reference_image_is_drawn(tmp_path: Path) -> None:
    reference = tmp_path / "reference.png"
    Image.new("RGB", (400, 300), (0, 255, 0)).save(reference)
    plain = _render(tmp_path / "plain", seconds=1)
    with_reference = _render(tmp_path / "ref", seconds=1, reference_image=reference)
    _, _, frames = _decode(with_reference.video)
    assert len(frames) == FPS
    # The reference is pasted in the bottom-right corner.
    corner = (WIDTH - 30, HEIGHT - 40)
    with Image.open(plain.thumbnail) as image:
        r, g, b = image.convert("RGB").getpixel(corner)
        assert not (g > 200 and r < 60 and b < 60)
    with Image.open(with_reference.thumbnail) as image:
        r, g, b = image.convert("RGB").getpixel(corner)
        assert g > 200 and r < 60 and b < 60


@pytest.mark.parametrize("size", [(321, 240), (320, 0)])
def test_rejects_odd_or_empty_sizes(tmp_path: Path, size: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        _render(tmp_path / "job", width=size[0], height=size[1])


def test_probe_video_reads_size_and_duration(assets: RenderedAssets) -> None:
    width, height, duration = probe_video(assets.video) or (0, 0, 0.0)
    assert (width, height) == (WIDTH, HEIGHT)
    assert duration == pytest.approx(SECONDS, abs=0.2)


def test_probe_video_is_none_for_what_is_no_video(tmp_path: Path, assets: RenderedAssets) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    assert probe_video(junk) is None
    assert probe_video(assets.thumbnail) is None
    assert probe_video(tmp_path / "missing.mp4") is None
