"""The retrieval figure, checked pixel by pixel against its documented layout."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
import pytest

from jaxreid import retrieval_figure


def _solid(color, h=64, w=32):
  im = np.zeros((h, w, 3), np.uint8)
  im[:] = color
  return im


def test_retrieval_figure_layout_and_colours(tmp_path):
  q = np.stack([_solid((10, 20, 30)), _solid((40, 50, 60))])
  g = np.stack([_solid((i * 30, 255 - i * 30, 100)) for i in range(5)])
  g[2, 0, 0] = (1, 2, 3)  # one marked pixel: scaled x2 it must cover a 2x2 block
  ranked = np.array([[2, 0, 4], [1, 3, 2]])
  is_match = np.array([[True, False, True], [False, False, True]])
  out = str(tmp_path / 'r.png')
  layout = retrieval_figure.retrieval_figure(
      q,
      g,
      ranked,
      is_match,
      out,
      distances=np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4]]),
      query_titles=['a.jpg', 'b.jpg'],
  )
  # Geometry documented in RetrievalLayout: 64x32 images x2, border 4, pad 4, gap 24, text 14.
  assert layout.scale == 2
  assert (layout.cell_height, layout.cell_width) == (136, 72)
  assert layout.size == (4 + 2 * (136 + 14 + 4), 4 + 72 + 24 + 3 * (72 + 4))
  img = np.asarray(Image.open(out).convert('RGB'))
  assert img.shape[:2] == layout.size
  assert layout.cell_box(0, 0) == (4, 4, 140, 76)
  assert layout.cell_box(0, 1) == (4, 100, 140, 172)  # the query gap: 76 + 24
  assert layout.cell_box(1, 3) == (158, 252, 294, 324)

  def border_pixels(row, col):
    t, l, b, r = layout.cell_box(row, col)
    return [
        img[t, l],
        img[t, r - 1],
        img[b - 1, l],
        img[b - 1, r - 1],
        img[t + 3, l + 3],
        img[(t + b) // 2, l],
        img[t, (l + r) // 2],
    ]

  for row in range(2):
    for px in border_pixels(row, 0):
      assert tuple(px) == retrieval_figure.QUERY_COLOR
    it, il, ib, ir = layout.image_box(row, 0)
    assert (ib - it, ir - il) == (128, 64)
    assert np.all(img[it:ib, il:ir] == q[row, 0, 0])
    for j in range(3):
      want = retrieval_figure.MATCH_COLOR if is_match[row, j] else retrieval_figure.MISMATCH_COLOR
      for px in border_pixels(row, j + 1):
        assert tuple(px) == want, (row, j)
      it, il, ib, ir = layout.image_box(row, j + 1)
      inner = img[it + 2 : ib, il + 2 : ir]  # (0, 0) may hold the marked pixel
      assert np.all(inner == g[ranked[row, j], 5, 5])
  # gallery image 2 is rank 1 of query 0: its marked pixel became a 2x2 block
  it, il, _, _ = layout.image_box(0, 1)
  assert np.all(img[it : it + 2, il : il + 2] == (1, 2, 3))
  assert tuple(img[it + 2, il + 2]) == tuple(g[2, 5, 5])
  # the gap between the query column and rank 1 is background
  assert np.all(img[10:130, 77:99] == retrieval_figure.BACKGROUND)
  # text bands hold dark text under the cells, nothing under an absent cell
  tt, tl, tb, tr = layout.text_box(0, 1)
  assert (tb - tt) == 14 and img[tt:tb, tl:tr].min() < 100


def test_retrieval_figure_neutral_borders_no_text_and_empty_cells(tmp_path):
  q = np.stack([_solid((0, 0, 0), 32, 16)])
  g = np.stack([_solid((200, 200, 0), 32, 16)] * 2)
  out = str(tmp_path / 'n.png')
  layout = retrieval_figure.retrieval_figure(
      q, g, np.array([[1, 0, -1]]), None, out, scale=3, border=2
  )
  img = np.asarray(Image.open(out).convert('RGB'))
  assert layout.text_height == 0 and img.shape[:2] == layout.size
  assert layout.size == (4 + 32 * 3 + 4 + 4, 4 + 52 + 24 + 3 * (52 + 4))
  for col in (1, 2):
    t, l, b, r = layout.cell_box(0, col)
    assert tuple(img[t, l]) == retrieval_figure.NEUTRAL_COLOR
    assert tuple(img[t + 1, l + 1]) == retrieval_figure.NEUTRAL_COLOR
    assert tuple(img[t + 2, l + 2]) == (200, 200, 0)
  t, l, b, r = layout.cell_box(0, 3)  # ranked -1: left empty
  assert np.all(img[t:b, l:r] == retrieval_figure.BACKGROUND)


def test_retrieval_figure_rejects_bad_input(tmp_path):
  q = np.zeros((2, 8, 4, 3), np.uint8)
  g = np.zeros((3, 8, 4, 3), np.uint8)
  out = str(tmp_path / 'x.png')
  with pytest.raises(ValueError, match='is_match must be'):
    retrieval_figure.retrieval_figure(q, g, np.zeros((2, 2), int), np.zeros((2, 3), bool), out)
  with pytest.raises(ValueError, match='ranked_indices must be'):
    retrieval_figure.retrieval_figure(q, g, np.zeros((3, 2), int), None, out)
  with pytest.raises(ValueError, match='past the 3 gallery'):
    retrieval_figure.retrieval_figure(q, g, np.full((2, 2), 3), None, out)
  with pytest.raises(ValueError, match='resize them'):
    retrieval_figure.retrieval_figure(
        q, np.zeros((3, 9, 4, 3), np.uint8), np.zeros((2, 2), int), None, out
    )
  with pytest.raises(ValueError, match='uint8'):
    retrieval_figure.retrieval_figure(q.astype(float), g, np.zeros((2, 2), int), None, out)
  assert not os.path.exists(out)
