"""A tiny raster canvas and PNG writer (numpy + zlib), so the demo can draw its
loss curve where matplotlib is not installed: lines, dashed vertical markers,
filled boxes and upper-case text in a 5x7 bitmap font."""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

import numpy as np

Color = tuple[int, int, int]

# 5x7 glyphs: seven rows of five pixels, "#" on, rows split by "/".
_GLYPHS = {
    "0": ".###./#...#/#..##/#.#.#/##..#/#...#/.###.",
    "1": "..#../.##../..#../..#../..#../..#../.###.",
    "2": ".###./#...#/....#/...#./..#../.#.../#####",
    "3": "####./....#/....#/.###./....#/....#/####.",
    "4": "...#./..##./.#.#./#..#./#####/...#./...#.",
    "5": "#####/#..../####./....#/....#/#...#/.###.",
    "6": "..##./.#.../#..../####./#...#/#...#/.###.",
    "7": "#####/....#/...#./..#../.#.../.#.../.#...",
    "8": ".###./#...#/#...#/.###./#...#/#...#/.###.",
    "9": ".###./#...#/#...#/.####/....#/...#./.##..",
    "A": ".###./#...#/#...#/#####/#...#/#...#/#...#",
    "B": "####./#...#/#...#/####./#...#/#...#/####.",
    "C": ".###./#...#/#..../#..../#..../#...#/.###.",
    "D": "####./#...#/#...#/#...#/#...#/#...#/####.",
    "E": "#####/#..../#..../####./#..../#..../#####",
    "F": "#####/#..../#..../####./#..../#..../#....",
    "G": ".###./#...#/#..../#.###/#...#/#...#/.####",
    "H": "#...#/#...#/#...#/#####/#...#/#...#/#...#",
    "I": ".###./..#../..#../..#../..#../..#../.###.",
    "J": "..###/...#./...#./...#./...#./#..#./.##..",
    "K": "#...#/#..#./#.#../##.../#.#../#..#./#...#",
    "L": "#..../#..../#..../#..../#..../#..../#####",
    "M": "#...#/##.##/#.#.#/#.#.#/#...#/#...#/#...#",
    "N": "#...#/#...#/##..#/#.#.#/#..##/#...#/#...#",
    "O": ".###./#...#/#...#/#...#/#...#/#...#/.###.",
    "P": "####./#...#/#...#/####./#..../#..../#....",
    "Q": ".###./#...#/#...#/#...#/#.#.#/#..#./.##.#",
    "R": "####./#...#/#...#/####./#.#../#..#./#...#",
    "S": ".####/#..../#..../.###./....#/....#/####.",
    "T": "#####/..#../..#../..#../..#../..#../..#..",
    "U": "#...#/#...#/#...#/#...#/#...#/#...#/.###.",
    "V": "#...#/#...#/#...#/#...#/#...#/.#.#./..#..",
    "W": "#...#/#...#/#...#/#.#.#/#.#.#/#.#.#/.#.#.",
    "X": "#...#/#...#/.#.#./..#../.#.#./#...#/#...#",
    "Y": "#...#/#...#/.#.#./..#../..#../..#../..#..",
    "Z": "#####/....#/...#./..#../.#.../#..../#####",
    ".": "...../...../...../...../...../.##../.##..",
    "-": "...../...../...../.###./...../...../.....",
    ":": "...../.##../.##../...../.##../.##../.....",
    "/": "....#/....#/...#./..#../.#.../#..../#....",
    "(": "...#./..#../.#.../.#.../.#.../..#../...#.",
    ")": ".#.../..#../...#./...#./...#./..#../.#...",
    "=": "...../...../#####/...../#####/...../.....",
    "+": "...../..#../..#../#####/..#../..#../.....",
    ",": "...../...../...../...../.##../..#../.#...",
    "x": "...../...../#...#/.#.#./..#../.#.#./#...#",
    "%": "##.../##..#/...#./..#../.#.../#..##/...##",
}
_FONT = {c: np.array([[ch == "#" for ch in row] for row in rows.split("/")], dtype=bool)
         for c, rows in _GLYPHS.items()}
_BLANK = np.zeros((7, 5), dtype=bool)


class Canvas:
    """An RGB image; (0, 0) is the top-left pixel."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.pixels = np.empty((height, width, 3), dtype=np.uint8)
        self.pixels[:] = background

    def box(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 < x1 and y0 < y1:
            self.pixels[y0:y1, x0:x1] = color

    def line(self, p0: tuple[float, float], p1: tuple[float, float], color: Color,
             width: int = 1) -> None:
        (x0, y0), (x1, y1) = p0, p1
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        half = width // 2
        for t in np.linspace(0.0, 1.0, steps + 1):
            x = round(x0 + (x1 - x0) * t)
            y = round(y0 + (y1 - y0) * t)
            self.box(x - half, y - half, x - half + width, y - half + width, color)

    def polyline(self, points: list[tuple[float, float]], color: Color, width: int = 1) -> None:
        for p0, p1 in itertools.pairwise(points):
            self.line(p0, p1, color, width)

    def dashed_vline(self, x: int, y0: int, y1: int, color: Color, dash: int = 4) -> None:
        for y in range(min(y0, y1), max(y0, y1), 2 * dash):
            self.box(x, y, x + 1, min(y + dash, max(y0, y1)), color)

    def text(self, x: int, y: int, text: str, color: Color = (0, 0, 0), scale: int = 1) -> int:
        """Draw ``text`` (upper-cased; unknown characters as blanks) with its top-left
        at (x, y); returns the x after it."""
        for ch in text if text.isupper() else text.upper().replace("X", "x"):
            glyph = _FONT.get(ch, _BLANK)
            for r, c in zip(*np.nonzero(glyph), strict=True):
                self.box(x + c * scale, y + r * scale, x + (c + 1) * scale,
                         y + (r + 1) * scale, color)
            x += 6 * scale
        return x

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return 6 * scale * len(text)

    def to_png(self) -> bytes:
        raw = b"".join(b"\x00" + row.tobytes() for row in self.pixels)  # filter 0 per row

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_png())
        return path
