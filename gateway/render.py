"""Renderer for the built-in ``local`` provider.

It fakes a video-generation model by drawing a small but real, playable H.264
video from the prompt, plus a thumbnail and a spritesheet.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, ImageDraw, ImageFont, ImageOps

VIDEO_NAME = "video.mp4"
THUMBNAIL_NAME = "thumbnail.webp"
SPRITESHEET_NAME = "spritesheet.jpg"

SPRITE_TILE_WIDTH = 160
SPRITE_COLUMNS = 10

_TEXT_COLOUR = (255, 255, 255)
_STROKE_COLOUR = (0, 0, 0)

Colour = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class RenderedAssets:
    video: Path
    thumbnail: Path
    spritesheet: Path


@dataclass(frozen=True)
class _Palette:
    background: Colour
    shape: Colour


def render_video(
    out_dir: Path,
    *,
    prompt: str,
    width: int,
    height: int,
    seconds: int,
    reference_image: Path | None = None,
    fps: int = 12,
) -> RenderedAssets:
    """Render ``video.mp4``, ``thumbnail.webp`` and ``spritesheet.jpg`` into ``out_dir``.

    Blocking and CPU-bound: run it in a worker thread. Every file is published
    with ``os.replace`` and the video goes last, so once ``video.mp4`` exists
    the other assets are complete too.
    """
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"width and height must be positive even numbers, got {width}x{height}")
    if seconds < 1 or fps < 1:
        raise ValueError(f"seconds and fps must be at least 1, got seconds={seconds} fps={fps}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total_frames = seconds * fps
    thumbnail_index = total_frames // 2
    palette = _palette(prompt)
    background = _draw_background(prompt, width, height, palette, reference_image)
    counter_font = _font(max(12, height // 24))
    tile_size = (SPRITE_TILE_WIDTH, max(1, round(SPRITE_TILE_WIDTH * height / width)))

    tiles: list[Image.Image] = []
    thumbnail: Image.Image | None = None
    with ExitStack() as stack:
        video_tmp = stack.enter_context(_temp_path(out_dir, VIDEO_NAME))
        thumbnail_tmp = stack.enter_context(_temp_path(out_dir, THUMBNAIL_NAME))
        sprite_tmp = stack.enter_context(_temp_path(out_dir, SPRITESHEET_NAME))

        with av.open(
            str(video_tmp),
            mode="w",
            format="mp4",
            container_options={"movflags": "+faststart"},
        ) as container:
            stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            time_base = Fraction(1, fps)
            for index in range(total_frames):
                image = _draw_frame(background, index, total_frames, fps, palette, counter_font)
                if index % fps == 0:
                    tiles.append(image.resize(tile_size, Image.Resampling.BILINEAR))
                if index == thumbnail_index:
                    thumbnail = image
                frame = av.VideoFrame.from_image(image).reformat(format="yuv420p")
                frame.pts = index
                frame.time_base = time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))

        assert thumbnail is not None
        thumbnail.save(thumbnail_tmp, format="WEBP", quality=80, method=0)
        os.replace(thumbnail_tmp, out_dir / THUMBNAIL_NAME)
        _spritesheet(tiles, tile_size).save(sprite_tmp, format="JPEG", quality=80)
        os.replace(sprite_tmp, out_dir / SPRITESHEET_NAME)
        os.replace(video_tmp, out_dir / VIDEO_NAME)

    return RenderedAssets(
        video=out_dir / VIDEO_NAME,
        thumbnail=out_dir / THUMBNAIL_NAME,
        spritesheet=out_dir / SPRITESHEET_NAME,
    )


def probe_video(path: Path) -> tuple[int, int, float] | None:
    """Width, height and duration in seconds of a video file; None when it holds no readable video."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if container.duration:
                duration = container.duration / av.time_base
            elif stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            else:
                return None
            return stream.codec_context.width, stream.codec_context.height, duration
    except (av.FFmpegError, OSError, ValueError):
        return None


@contextmanager
def _temp_path(out_dir: Path, name: str) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``name``; remove it if it was never published."""
    path = out_dir / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _palette(prompt: str) -> _Palette:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 0xFFFF
    saturation = 0.45 + digest[2] / 255 * 0.35
    value = 0.30 + digest[3] / 255 * 0.20
    return _Palette(
        background=_hsv(hue, saturation, value),
        shape=_hsv((hue + 0.5) % 1.0, 0.75, 0.95),
    )


def _hsv(hue: float, saturation: float, value: float) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        # Pillow < 10.1 or built without FreeType: fixed-size bitmap font.
        return ImageFont.load_default()


def _wrap(text: str, font: Font, max_width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and font.getlength(current + char) > max_width:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    return lines


# The most pixels the renderer decodes of a reference image. A JPEG is decoded at a fraction of its
# size (draft), so a 108-megapixel photo costs little; a PNG of a few hundred KiB can claim
# 13000×13000, which takes over a GiB to decode (Pillow only warns below 179 million pixels).
MAX_DECODED_PIXELS = 40_000_000
_DRAFT_BOX = (1920, 1920)  # a reference is drawn at most this large (half a video's side, or less)


def reference_problem(data: bytes) -> str | None:
    """Why the renderer cannot draw from ``data``, in words for the client; None when it can. Read
    from the image's headers and structure, not its pixels."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            opened.draft("RGB", _DRAFT_BOX)
            decoded = opened.width * opened.height
            opened.verify()
    except Image.DecompressionBombError:
        return "has too many pixels to draw from"
    except (OSError, ValueError, SyntaxError):
        return "is not an image the local provider can read (PNG, JPEG, WebP, GIF...)"
    if decoded > MAX_DECODED_PIXELS:
        limit = MAX_DECODED_PIXELS // 1_000_000
        return (
            f"is {width}x{height} pixels; the local provider draws from images of up to {limit} million "
            "(a JPEG: any size)"
        )
    return None


def _load_reference(path: Path, max_size: tuple[int, int]) -> Image.Image | None:
    """Open the reference image, or return None if Pillow cannot read it or it is too large to."""
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", max_size)
            if opened.width * opened.height > MAX_DECODED_PIXELS:
                return None
            image = ImageOps.exif_transpose(opened)
            image.thumbnail(max_size, Image.Resampling.LANCZOS)
            return image.convert("RGBA")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _draw_background(
    prompt: str,
    width: int,
    height: int,
    palette: _Palette,
    reference_image: Path | None,
) -> Image.Image:
    """Draw everything that does not move: colour, prompt text and reference image."""
    image = Image.new("RGB", (width, height), palette.background)
    margin = max(8, width // 40)

    if reference_image is not None:
        reference = _load_reference(reference_image, (width // 2, height // 2))
        if reference is not None:
            position = (width - margin - reference.width, height - margin - reference.height)
            image.paste(reference, position, reference)

    draw = ImageDraw.Draw(image)
    font_size = max(14, height // 14)
    font = _font(font_size)
    stroke = max(1, font_size // 12)
    line_height = round(font_size * 1.25)
    max_lines = max(1, (height // 2 - margin) // line_height)
    lines = _wrap(prompt, font, width - 2 * margin) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _truncate(lines[-1] + "...", font, width - 2 * margin)
    for number, line in enumerate(lines):
        draw.text(
            (margin, margin + number * line_height),
            line,
            font=font,
            fill=_TEXT_COLOUR,
            stroke_width=stroke,
            stroke_fill=_STROKE_COLOUR,
        )
    return image


def _truncate(line: str, font: Font, max_width: int) -> str:
    while len(line) > 3 and font.getlength(line) > max_width:
        line = line[:-4] + "..."
    return line


def _draw_frame(
    background: Image.Image,
    index: int,
    total_frames: int,
    fps: int,
    palette: _Palette,
    font: Font,
) -> Image.Image:
    image = background.copy()
    draw = ImageDraw.Draw(image)
    width, height = image.size
    seconds = index / fps

    # A circle that bounces horizontally (one crossing every two seconds) and bobs vertically.
    radius = max(8, min(width, height) // 10)
    phase = (seconds / 2.0) % 2.0
    sweep = phase if phase <= 1.0 else 2.0 - phase
    cx = radius + sweep * (width - 2 * radius)
    cy = height / 2 + math.sin(seconds * math.pi) * (height / 2 - radius) * 0.5
    draw.ellipse(
        (cx - radius, cy - radius, cx + radius, cy + radius),
        fill=palette.shape,
        outline=_STROKE_COLOUR,
        width=max(1, radius // 12),
    )

    margin = max(8, width // 40)
    bar_height = max(4, height // 90)
    progress = (index + 1) / total_frames
    draw.rectangle((0, height - bar_height, round(width * progress), height), fill=_TEXT_COLOUR)

    label = f"{_timestamp(seconds)}  frame {index + 1}/{total_frames}"
    size = font.size if isinstance(font, ImageFont.FreeTypeFont) else 11
    draw.text(
        (margin, height - bar_height - margin - round(size * 1.2)),
        label,
        font=font,
        fill=_TEXT_COLOUR,
        stroke_width=max(1, size // 12),
        stroke_fill=_STROKE_COLOUR,
    )
    return image


def _timestamp(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes):02d}:{rest:05.2f}"


def _spritesheet(tiles: list[Image.Image], tile_size: tuple[int, int]) -> Image.Image:
    columns = min(SPRITE_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * tile_size[0], rows * tile_size[1]))
    for number, tile in enumerate(tiles):
        row, column = divmod(number, columns)
        sheet.paste(tile, (column * tile_size[0], row * tile_size[1]))
    return sheet
