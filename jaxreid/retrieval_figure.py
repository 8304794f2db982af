"""A picture of ranked lists, like Figure 5 of the ABMT paper: each query, then its top-k gallery
images framed green (true match) or red (false match).

It is assembled pixel by pixel with numpy / PIL, not with matplotlib, so that its geometry is
exact and documented (`RetrievalLayout`: every frame at known pixels, images scaled by whole
factors, never resampled). `jaxreid-search --out=...` draws it (`jaxreid.tools.search`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

MATCH_COLOR = (0, 170, 0)  # true match (same identity)
MISMATCH_COLOR = (220, 0, 0)  # false match
NEUTRAL_COLOR = (150, 150, 150)  # identity unknown
QUERY_COLOR = (30, 80, 220)  # the query's frame
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class RetrievalLayout:
  """Pixel geometry of a retrieval figure (all boxes are (top, left, bottom, right), bottom /
  right exclusive, in pixels of the output image).

  Column 0 holds the query, columns 1..k the gallery ranks 1..k. Each cell is the image scaled by
  `scale` (nearest neighbour), framed by `border` pixels of colour on every side; under it, when
  any text is drawn, a band of `text_height` pixels. Around everything and between cells there
  are `pad` background pixels, except between the query column and rank 1, which are `gap`
  pixels apart:

    x(col 0) = pad,  x(col j >= 1) = pad + cell_w + gap + (j - 1) * (cell_w + pad)
    y(row r) = pad + r * (cell_h + text_height + pad)
    cell_w = W * scale + 2 * border,  cell_h = H * scale + 2 * border
    width = pad + cell_w + gap + k * (cell_w + pad),  height = pad + rows * (cell_h +
    text_height + pad)
  """

  rows: int
  k: int
  image_height: int  # of the source images (before scaling)
  image_width: int
  scale: int
  border: int
  pad: int
  gap: int
  text_height: int

  @property
  def cell_height(self) -> int:
    return self.image_height * self.scale + 2 * self.border

  @property
  def cell_width(self) -> int:
    return self.image_width * self.scale + 2 * self.border

  @property
  def size(self) -> tuple[int, int]:
    """(height, width) of the whole figure."""
    return (
        self.pad + self.rows * (self.cell_height + self.text_height + self.pad),
        self.pad + self.cell_width + self.gap + self.k * (self.cell_width + self.pad),
    )

  def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
    """Image plus its border, for query `row` and column `col` (0 = query, j = rank j)."""
    if not (0 <= row < self.rows and 0 <= col <= self.k):
      raise IndexError(f'cell ({row}, {col}) outside {self.rows} rows x {self.k + 1} columns')
    top = self.pad + row * (self.cell_height + self.text_height + self.pad)
    left = (
        self.pad
        if col == 0
        else self.pad + self.cell_width + self.gap + (col - 1) * (self.cell_width + self.pad)
    )
    return top, left, top + self.cell_height, left + self.cell_width

  def image_box(self, row: int, col: int) -> tuple[int, int, int, int]:
    """The scaled image inside the border."""
    t, l, b, r = self.cell_box(row, col)
    return t + self.border, l + self.border, b - self.border, r - self.border

  def text_box(self, row: int, col: int) -> tuple[int, int, int, int]:
    """The text band under a cell (empty when text_height is 0)."""
    t, l, b, r = self.cell_box(row, col)
    return b, l, b + self.text_height, r


def retrieval_layout(
    rows: int,
    k: int,
    image_hw: tuple[int, int],
    *,
    with_text: bool = True,
    scale: int | None = None,
    border: int = 4,
    pad: int = 4,
    gap: int = 24,
    text_height: int = 14,
    min_image_height: int = 128,
) -> RetrievalLayout:
  """The layout `retrieval_figure` uses; `scale=None` picks the smallest integer factor that
  makes images at least `min_image_height` pixels tall (64x32 crops -> x2)."""
  h, w = int(image_hw[0]), int(image_hw[1])
  if scale is None:
    scale = max(1, math.ceil(min_image_height / max(h, 1)))
  return RetrievalLayout(
      rows=int(rows),
      k=int(k),
      image_height=h,
      image_width=w,
      scale=int(scale),
      border=int(border),
      pad=int(pad),
      gap=int(gap),
      text_height=int(text_height) if with_text else 0,
  )


def _as_images(images, what: str) -> np.ndarray:
  arr = np.asarray(images) if not isinstance(images, (list, tuple)) else None
  if arr is None:
    shapes = {np.shape(im) for im in images}
    if len(shapes) > 1:
      raise ValueError(
          f'retrieval_figure: {what} have different sizes {sorted(shapes)}; '
          'resize them to one size first'
      )
    arr = np.stack([np.asarray(im) for im in images]) if len(images) else np.zeros((0, 1, 1, 3))
  if arr.ndim == 3:  # grayscale (N, H, W)
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise ValueError(f'retrieval_figure: {what} must be (N, H, W, 3) RGB, got {arr.shape}')
  if arr.dtype != np.uint8:
    raise ValueError(f'retrieval_figure: {what} must be uint8, got {arr.dtype}')
  return arr


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font
    return ImageFont.load_default()


def _fit_text(draw, text: str, font, max_width: int) -> str:
  """Shortens `text` in the middle to fit, keeping both ends (a Market name's identity at the
  start, the frame number at the end)."""
  if draw.textlength(text, font=font) <= max_width:
    return text
  for keep in range(len(text) - 1, 0, -1):
    head, tail = text[: (keep + 1) // 2], text[len(text) - keep // 2 :] if keep // 2 else ''
    short = head + '…' + tail
    if draw.textlength(short, font=font) <= max_width:
      return short
  return '…'


def retrieval_figure(
    query_images,
    gallery_images,
    ranked_indices,
    is_match,
    out_path: str,
    distances=None,
    query_titles: Sequence[str] | None = None,
    *,
    scale: int | None = None,
    border: int = 4,
    pad: int = 4,
    gap: int = 24,
    text_height: int = 14,
) -> RetrievalLayout:
  """Writes a PNG of ranked lists (one row per query) and returns its `RetrievalLayout`.

  query_images (Q, H, W, 3) and gallery_images (G, H, W, 3) uint8 (one size for all);
  ranked_indices (Q, k) gallery indices, best first (-1 = empty cell); is_match bool (Q, k):
  frame green (`MATCH_COLOR`) for a true match and red (`MISMATCH_COLOR`) otherwise, or None for
  grey frames (`NEUTRAL_COLOR`) when identities are unknown. The query has a `QUERY_COLOR`
  frame. distances (Q, k) are written under the gallery cells and query_titles under the
  queries. See `RetrievalLayout` for the exact geometry (border, gap and padding in pixels).
  """
  q_imgs = _as_images(query_images, 'query_images')
  g_imgs = _as_images(gallery_images, 'gallery_images')
  ranked = np.asarray(ranked_indices, np.int64)
  if ranked.ndim != 2 or ranked.shape[0] != len(q_imgs):
    raise ValueError(
        f'retrieval_figure: ranked_indices must be (Q={len(q_imgs)}, k), got ' f'{ranked.shape}'
    )
  if q_imgs.shape[1:] != g_imgs.shape[1:]:
    raise ValueError(
        f'retrieval_figure: query images are {q_imgs.shape[1:3]} but gallery images '
        f'{g_imgs.shape[1:3]}; resize them to one size first'
    )
  if np.any(ranked >= len(g_imgs)):
    raise ValueError(
        f'retrieval_figure: ranked_indices refer past the {len(g_imgs)} gallery ' 'images'
    )
  nq, k = ranked.shape
  match = None if is_match is None else np.asarray(is_match, bool)
  if match is not None and match.shape != (nq, k):
    raise ValueError(f'retrieval_figure: is_match must be {(nq, k)}, got {match.shape}')
  dist = None if distances is None else np.asarray(distances, float)
  if dist is not None and dist.shape != (nq, k):
    raise ValueError(f'retrieval_figure: distances must be {(nq, k)}, got {dist.shape}')
  if query_titles is not None and len(query_titles) != nq:
    raise ValueError(f'retrieval_figure: {len(query_titles)} query titles for {nq} queries')
  layout = retrieval_layout(
      nq,
      k,
      q_imgs.shape[1:3],
      with_text=dist is not None or query_titles is not None,
      scale=scale,
      border=border,
      pad=pad,
      gap=gap,
      text_height=text_height,
  )
  canvas = np.empty(layout.size + (3,), np.uint8)
  canvas[:] = BACKGROUND
  s = layout.scale

  def put(row, col, image, color):
    t, l, b, r = layout.cell_box(row, col)
    canvas[t:b, l:r] = color
    it, il, ib, ir = layout.image_box(row, col)
    canvas[it:ib, il:ir] = np.repeat(np.repeat(image, s, axis=0), s, axis=1)

  for i in range(nq):
    put(i, 0, q_imgs[i], QUERY_COLOR)
    for j in range(k):
      g = ranked[i, j]
      if g < 0:
        continue
      color = NEUTRAL_COLOR if match is None else (MATCH_COLOR if match[i, j] else MISMATCH_COLOR)
      put(i, j + 1, g_imgs[g], color)

  if layout.text_height:
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = _font(max(6, layout.text_height - 3))

    def write(row, col, text):
      t, l, b, r = layout.text_box(row, col)
      text = _fit_text(draw, text, font, r - l)
      x = l + (r - l - draw.textlength(text, font=font)) / 2
      draw.text((x, t + 1), text, fill=TEXT_COLOR, font=font)

    for i in range(nq):
      if query_titles is not None:
        write(i, 0, str(query_titles[i]))
      if dist is not None:
        for j in range(k):
          if ranked[i, j] >= 0:
            write(i, j + 1, f'{dist[i, j]:.3f}')
    canvas = np.asarray(img)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  Image.fromarray(canvas).save(out_path, format='PNG')
  return layout
