"""Seeing the result: thumbnails, a paginated HTML gallery, and side-by-side images.

People judge a quantizer by looking at it. Each processed image gets an original and
a quantized thumbnail; ``index.html`` (plus ``index-2.html``, ... pages of 100) shows
them side by side with the palette as swatches, the bytes before and after and the
PSNR. Entries persist in ``entries.jsonl`` so a resumed run still shows every image.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .imagefiles import write_atomic

__all__ = ["Gallery", "side_by_side", "thumbnail_pair"]

THUMB_SIZE = 256
PAGE_SIZE = 100
ENTRIES = "entries.jsonl"


def _thumb(pixels: np.ndarray) -> Image.Image:
    img = Image.fromarray(pixels, "RGBA" if pixels.shape[2] == 4 else "RGB")
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    return img


def _save(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    if img.mode == "RGBA":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=90)
    write_atomic(path, buf.getvalue())


def thumbnail_pair(original: np.ndarray, quantized: np.ndarray, preview_dir: Path, ident: str) -> dict[str, str]:
    """Write the two thumbnails of one image; returns their paths relative to ``preview_dir``.

    ``ident`` names the image uniquely in the run (its output path: task keys are not unique,
    ``d1/img.png d2/img.png`` share one); surrogate escapes of non-UTF-8 names are kept.
    """
    stem = hashlib.blake2b(ident.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()
    ext = "png" if original.shape[2] == 4 else "jpg"
    names = {"original": f"thumbs/{stem}.orig.{ext}", "quantized": f"thumbs/{stem}.quant.{ext}"}
    _save(_thumb(original), preview_dir / names["original"])
    _save(_thumb(quantized), preview_dir / names["quantized"])
    return names


def side_by_side(original: np.ndarray, quantized: np.ndarray, path: Path) -> None:
    """Write the original and the quantized image next to each other (one PNG)."""
    h, w = original.shape[:2]
    mode = "RGBA" if original.shape[2] == 4 or quantized.shape[2] == 4 else "RGB"
    canvas = Image.new(mode, (2 * w + 8, h), (255, 255, 255, 255) if mode == "RGBA" else (255, 255, 255))
    canvas.paste(Image.fromarray(original).convert(mode), (0, 0))
    canvas.paste(Image.fromarray(quantized).convert(mode), (w + 8, 0))
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    write_atomic(path, buf.getvalue())


class Gallery:
    """Collects preview entries (thread-safe, persisted) and renders the HTML pages."""

    def __init__(self, preview_dir: Path) -> None:
        self.dir = preview_dir
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, entry: dict[str, Any]) -> None:
        with self._lock, open(self.dir / ENTRIES, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        """Every entry recorded so far, the latest one per input, in input order."""
        latest: dict[str, dict[str, Any]] = {}
        path = self.dir / ENTRIES
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a killed run
                    continue
                latest[entry["input"]] = entry
        return [latest[k] for k in sorted(latest)]

    def render(self, title: str = "gpu_kquant preview") -> Path:
        """Write ``index.html`` and further pages; returns the first page."""
        entries = self.entries()
        pages = max(1, -(-len(entries) // PAGE_SIZE))
        for page in range(pages):
            chunk = entries[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            write_atomic(self.dir / _page_name(page), _page(title, chunk, page, pages, len(entries)).encode())
        return self.dir / _page_name(0)


def _page_name(page: int) -> str:
    return "index.html" if page == 0 else f"index-{page + 1}.html"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MB"


def _card(entry: dict[str, Any]) -> str:
    esc = html.escape
    swatches = "".join(f'<i style="background:{esc(c)}" title="{esc(c)}"></i>' for c in entry.get("palette", []))
    saving = ""
    if entry.get("input_bytes") and entry.get("output_bytes") is not None:
        saving = f" ({100 * (1 - entry['output_bytes'] / entry['input_bytes']):.0f}% smaller)"
    psnr = entry.get("psnr")
    psnr_text = "lossless" if psnr in (None, "inf") or psnr == float("inf") else f"{psnr:.2f} dB"
    return (
        '<figure class="card">'
        f'<figcaption title="{esc(entry["input"])}">{esc(entry.get("name", entry["input"]))}</figcaption>'
        '<div class="pair">'
        f'<img src="{esc(entry["original"])}" alt="original" width="{entry.get("tw", THUMB_SIZE)}">'
        f'<img src="{esc(entry["quantized"])}" alt="quantized" width="{entry.get("tw", THUMB_SIZE)}">'
        "</div>"
        f'<div class="swatches">{swatches}</div>'
        f"<p>{entry.get('colors', '?')} colours · PSNR {psnr_text} · "
        f"{_size(entry.get('input_bytes'))} → {_size(entry.get('output_bytes'))}{saving}</p>"
        "</figure>"
    )


def _page(title: str, entries: list[dict[str, Any]], page: int, pages: int, total: int) -> str:
    nav = " ".join(f'<a href="{_page_name(p)}"{" class=here" if p == page else ""}>{p + 1}</a>' for p in range(pages))
    cards = "\n".join(_card(e) for e in entries)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} ({page + 1}/{pages})</title>
<style>
body{{font:14px system-ui,sans-serif;margin:16px;background:#f4f4f4}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}}
.card{{background:#fff;margin:0;padding:8px;border-radius:6px;box-shadow:0 1px 3px #0002;
  max-width:{2 * THUMB_SIZE + 12}px}}
.pair{{display:flex;gap:4px;background:repeating-conic-gradient(#ddd 0 25%,#fff 0 50%) 0 0/16px 16px}}
.pair img{{height:auto;max-width:{THUMB_SIZE}px}}
figcaption{{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}}
.swatches{{display:flex;flex-wrap:wrap;margin-top:4px}}
.swatches i{{width:10px;height:10px;display:inline-block}}
nav a{{margin-right:6px}} nav a.here{{font-weight:700}}
</style></head><body>
<h1>{html.escape(title)}</h1><p>{total} images · left: original, right: quantized</p>
<nav>{nav}</nav>
<div class="grid">
{cards}
</div>
<nav>{nav}</nav>
<script>
for (const img of document.images) {{
  const mark = () => {{ img.dataset.loaded = img.complete && img.naturalWidth > 0 ? "ok" : "broken"; }};
  if (img.complete) mark(); else {{ img.addEventListener("load", mark); img.addEventListener("error", mark); }}
}}
</script>
</body></html>
"""
