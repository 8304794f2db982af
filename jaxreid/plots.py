"""Pictures of a run: training curves from `metrics.jsonl`, run comparisons, retrieval results.

`plot_run(workdir)` redraws `<workdir>/plots/*.png` from the run's metrics file (cheap enough to
call after every evaluation), `plot_comparison` puts several runs on one figure, and
`retrieval_figure` draws ranked lists like Figure 5 of the ABMT paper. The command line
`jaxreid-plots WORKDIR [WORKDIR ...] [--compare=out.png]` (`jaxreid.tools.plots`, also
`python -m jaxreid.plots`) redraws and compares runs. Curves use matplotlib's Agg canvas directly
(no pyplot, so no global backend is switched and nothing needs a display); the retrieval figure
is assembled pixel by pixel with numpy / PIL so its layout is exact.

Why one long module: each panel is a short function over the same record-reading helpers; the
length is the number of panels (losses, clustering, coupling, accuracy, comparisons, retrieval).

Metrics records are `{"stage", "step", "time", ...}`; a resumed run may repeat a step, and the
last record of each (stage, step) wins. Panels whose keys are absent (e.g. pseudo-label quality
without ground truth, coupling in older runs) are left out.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import sys
from typing import Mapping
from typing import Sequence

import numpy as np

NON_ADAPT_STAGES = ('pretrain', 'pretrain_final', 'source_only')
QUALITY_KEYS = (
    'cluster/purity',
    'cluster/nmi',
    'cluster/ari',
    'cluster/pairwise_precision',
    'cluster/pairwise_recall',
    'cluster/pairwise_fscore',
)


# ----------------------------------------------------------------------------------------------
# Reading metrics


def load_metrics(workdir: str) -> dict[str, list[dict]]:
  """stage -> records sorted by step, the last record per (stage, step) kept.

  Raises FileNotFoundError when the work dir has no metrics.jsonl. A line that is not JSON (a
  run killed while writing) is skipped.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    what = 'does not exist' if not os.path.exists(workdir) else 'has no metrics.jsonl'
    raise FileNotFoundError(
        f'{workdir} {what}: pass the work dir of a jaxreid run (runs write '
        '<workdir>/metrics.jsonl from their first epoch on)'
    )
  return _read_records(path)


def _read_records(path: str) -> dict[str, list[dict]]:
  latest: dict[tuple[str, int], dict] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
        key = (str(rec['stage']), int(rec['step']))
      except (ValueError, KeyError, TypeError):
        continue
      latest[key] = rec
  out: dict[str, list[dict]] = {}
  for (stage, step), rec in sorted(latest.items(), key=lambda kv: kv[0][1]):
    out.setdefault(stage, []).append(rec)
  return out


def adaptation_stage(stages: Mapping[str, list], workdir: str | None = None) -> str | None:
  """The adaptation method's stage name: config.json's `method` if it has records, else the
  non-pretraining stage with the most records."""
  candidates = [s for s in stages if s not in NON_ADAPT_STAGES]
  if not candidates:
    return None
  if workdir is not None:
    try:
      with open(os.path.join(workdir, 'config.json')) as f:
        method = json.load(f).get('method')
      if method in candidates:
        return method
    except (OSError, ValueError, AttributeError):
      pass
  return max(candidates, key=lambda s: len(stages[s]))


def series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records holding a finite number under `key`."""
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      xs.append(r['step'])
      ys.append(float(v))
  return np.asarray(xs, float), np.asarray(ys, float)


def keys_with_prefix(records: Sequence[Mapping], prefix: str) -> list[str]:
  """Numeric keys starting with `prefix`, in first-seen order."""
  seen: dict[str, None] = {}
  for r in records:
    for k, v in r.items():
      if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool):
        seen.setdefault(k, None)
  return list(seen)


# ----------------------------------------------------------------------------------------------
# Panels: `panel(ax, records, source_only_record)` draws on one matplotlib Axes and returns
# whether it had data


def _new_figure(rows: int, cols: int, panel_size=(5.0, 3.4)):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout='constrained')
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
  return fig, axes


def _save(fig, path: str) -> str:
  """Writes atomically, so a viewer never sees a half-written file during training."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  fig.savefig(tmp, format='png', dpi=100)
  os.replace(tmp, path)
  return path


def _line(ax, x, y, label, **kw):
  kw.setdefault('marker', 'o')
  kw.setdefault('markersize', 3)
  ax.plot(x, y, label=label, **kw)


def _finish(ax, title, ylabel=None, xlabel='epoch', legend=True):
  from matplotlib.ticker import MaxNLocator

  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if ylabel:
    ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, ncol=2 if len(ax.get_legend_handles_labels()[0]) > 6 else 1)


def panel_losses(ax, recs, source_only=None) -> bool:
  keys = keys_with_prefix(recs, 'loss/')
  drawn = False
  for k in keys:
    x, y = series(recs, k)
    if len(x):
      _line(
          ax,
          x,
          y,
          k[5:],
          linewidth=2.2 if k == 'loss/total' else 1.2,
          color='black' if k == 'loss/total' else None,
      )
      drawn = True
  _finish(ax, 'losses (epoch mean)', 'loss')
  return drawn


def panel_lr(ax, recs, source_only=None) -> bool:
  x, y = series(recs, 'lr')
  if len(x):
    _line(ax, x, y, 'lr')
    ax.set_yscale('log')
  _finish(ax, 'learning rate', 'lr', legend=False)
  return bool(len(x))


def panel_grad_norm(ax, recs, source_only=None) -> bool:
  x, y = series(recs, 'grad_norm')
  if len(x):
    _line(ax, x, y, 'grad norm')
  _finish(ax, 'gradient norm (epoch mean)', '|g|', legend=False)
  return bool(len(x))


def panel_clusters(ax, recs, source_only=None) -> bool:
  x, y = series(recs, 'cluster/num_clusters')
  xn, yn = series(recs, 'cluster/noise_fraction')
  if len(x):
    _line(ax, x, y, 'clusters', color='tab:blue')
    ax.set_ylabel('clusters', color='tab:blue')
  if len(xn) and (np.any(yn > 0) or not len(x)):  # K-means has no noise: no flat 0 line
    ax2 = ax.twinx()
    _line(ax2, xn, 100 * yn, 'noise %', color='tab:red', linestyle='--')
    ax2.set_ylabel('noise (% of images)', color='tab:red')
    ax2.set_ylim(bottom=0)
  _finish(ax, 'pseudo labels: clusters and noise', legend=False)
  return bool(len(x) or len(xn))


def panel_quality(ax, recs, source_only=None) -> bool:
  drawn = False
  for k in QUALITY_KEYS:
    x, y = series(recs, k)
    if len(x):
      style = '--' if k.endswith(('precision', 'recall')) else '-'
      _line(ax, x, y, k.split('/', 1)[1], linestyle=style)
      drawn = True
  if drawn:
    ax.set_ylim(0, 1.02)
  _finish(ax, 'pseudo-label quality (vs ground truth)', 'score')
  return drawn


def panel_accuracy(ax, recs, source_only: Mapping | None = None) -> bool:
  drawn = False
  for key, color in (('mAP', 'tab:blue'), ('top1', 'tab:orange')):
    x, y = series(recs, key)
    if len(x):
      _line(ax, x, y, 'rank-1' if key == 'top1' else key, color=color, linewidth=2)
      drawn = True
    for net in sorted(
        {
            k.split('/')[0]
            for k in keys_with_prefix(recs, 'net')
            if re.fullmatch(r'net\d+/' + key, k)
        }
    ):
      xn, yn = series(recs, f'{net}/{key}')
      if len(xn) and not (len(xn) == len(x) and np.allclose(yn, y)):
        _line(
            ax,
            xn,
            yn,
            f'{net} {"rank-1" if key == "top1" else key}',
            color=color,
            linewidth=0.8,
            alpha=0.6,
            markersize=2,
        )
    if drawn and source_only and isinstance(source_only.get(key), (int, float)):
      ax.axhline(
          source_only[key],
          color=color,
          linestyle=':',
          linewidth=1.2,
          label=f'source only {"rank-1" if key == "top1" else key}',
      )
  if drawn:  # the run's whole epoch range (from 0, the source-only model), also when a long run
    # is evaluated only once at its end
    first = 0 if source_only else min(r['step'] for r in recs)
    ax.set_xlim(first - 0.3, max(r['step'] for r in recs) + 0.3)
  _finish(ax, 'target accuracy', '%')
  return drawn


def panel_coupling(ax, recs, source_only=None) -> bool:
  drawn = False
  for k in keys_with_prefix(recs, 'coupling/'):
    x, y = series(recs, k)
    if len(x):
      _line(ax, x, y, k.split('/', 1)[1])
      drawn = True
  _finish(ax, 'coupling between networks', 'coupling')
  return drawn


RUN_PANELS = (
    ('losses', panel_losses),
    ('accuracy', panel_accuracy),
    ('clusters', panel_clusters),
    ('pseudo_labels', panel_quality),
    ('coupling', panel_coupling),
    ('lr', panel_lr),
    ('grad_norm', panel_grad_norm),
)


def _draw_panel(fn, recs, source_only):
  """Draws one panel on its own figure; returns the figure or None without data."""
  fig, (ax,) = _new_figure(1, 1)
  return fig if fn(ax, recs, source_only) else None


# ----------------------------------------------------------------------------------------------
# One run


def plot_run(workdir: str, *, per_panel: bool = True, pretrain: bool = True) -> list[str]:
  """Writes `<workdir>/plots/{overview,losses,accuracy,clusters,pseudo_labels,coupling,lr,
  grad_norm,pretrain}.png` for the panels that have data; returns the paths written.

  Nothing is written (and [] returned) before the first adaptation epoch unless pre-training
  curves exist. Raises FileNotFoundError when there is no metrics.jsonl. `per_panel=False`
  writes only the overview (and `pretrain=False` skips the pre-training figure, which does not
  change during adaptation): about 3x faster, for calls after every evaluation.
  """
  stages = load_metrics(workdir)
  out_dir = os.path.join(workdir, 'plots')
  written = []
  stage = adaptation_stage(stages, workdir)
  source_only = (stages.get('source_only') or [None])[-1]
  if stage is not None:
    recs = stages[stage]
    present = []
    for name, fn in RUN_PANELS:
      fig = _draw_panel(fn, recs, source_only)
      if fig is None:
        continue
      present.append(fn)
      if per_panel:
        fig.suptitle(f'{os.path.basename(os.path.normpath(workdir))} ({stage})', fontsize=9)
        written.append(_save(fig, os.path.join(out_dir, f'{name}.png')))
    if present:
      cols = 2 if len(present) > 1 else 1
      rows = -(-len(present) // cols)
      fig, axes = _new_figure(rows, cols)
      for ax, fn in zip(axes, present):
        fn(ax, recs, source_only)
      for ax in axes[len(present) :]:
        ax.set_axis_off()
      fig.suptitle(f'{os.path.basename(os.path.normpath(workdir))}: {stage}')
      written.insert(0, _save(fig, os.path.join(out_dir, 'overview.png')))
  pre = plot_pretraining(workdir, os.path.join(out_dir, 'pretrain.png')) if pretrain else None
  if pre:
    written.append(pre)
  return written


def plot_pretraining(workdir: str, out_path: str) -> str | None:
  """Source pre-training curves of every `pretrain_seed*/metrics.jsonl` (losses, lr, source
  accuracy), one colour per seed; None when there are none."""
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, 'pretrain_seed*', 'metrics.jsonl'))):
    recs = _read_records(path).get('pretrain', [])
    if recs:
      runs.append((os.path.basename(os.path.dirname(path)).replace('pretrain_', ''), recs))
  if not runs:
    return None
  fig, (ax_loss, ax_lr, ax_acc) = _new_figure(1, 3)
  colors = [f'C{i}' for i in range(10)]
  any_acc = False
  for i, (name, recs) in enumerate(runs):
    c = colors[i % 10]
    for j, k in enumerate(keys_with_prefix(recs, 'loss/')):
      x, y = series(recs, k)
      if len(x):
        total = k == 'loss/total'
        # One seed: a colour per term; several: a colour per seed, terms dashed.
        color = c if len(runs) > 1 else ('black' if total else colors[j % 10])
        _line(
            ax_loss,
            x,
            y,
            f'{name} {k[5:]}',
            color=color,
            linewidth=2 if total else 0.9,
            linestyle='-' if total or len(runs) == 1 else '--',
            markersize=2,
        )
    x, y = series(recs, 'lr')
    if len(x):
      _line(ax_lr, x, y, name, color=c)
    for key, style in (('source_mAP', '-'), ('source_top1', '--')):
      x, y = series(recs, key)
      if len(x):
        _line(
            ax_acc,
            x,
            y,
            f'{name} {"rank-1" if key.endswith("top1") else "mAP"}',
            color=c,
            linestyle=style,
        )
        any_acc = True
  _finish(ax_loss, 'pre-training losses', 'loss')
  _finish(ax_lr, 'pre-training learning rate', 'lr')
  _finish(ax_acc, 'source-domain accuracy', '%')
  if not any_acc:
    ax_acc.text(
        0.5,
        0.5,
        'not evaluated\n(pretrain.eval_every = 0)',
        ha='center',
        va='center',
        transform=ax_acc.transAxes,
        color='gray',
    )
  fig.suptitle(f'{os.path.basename(os.path.normpath(workdir))}: source pre-training')
  return _save(fig, out_path)


# ----------------------------------------------------------------------------------------------
# Several runs


def plot_comparison(
    workdirs: Sequence[str], out_path: str, labels: Sequence[str] | None = None
) -> str:
  """One figure comparing runs: mAP, rank-1 (source-only levels dotted), coupling and the
  number of clusters over epochs, one colour per run. Returns `out_path`."""
  workdirs = list(workdirs)
  if not workdirs:
    raise ValueError('plot_comparison: no work dirs given')
  if labels is not None and len(labels) != len(workdirs):
    raise ValueError(
        f'plot_comparison: {len(labels)} labels for {len(workdirs)} work dirs; give '
        'one label per work dir'
    )
  labels = (
      list(labels)
      if labels is not None
      else [os.path.basename(os.path.normpath(w)) for w in workdirs]
  )
  runs = []
  for w, label in zip(workdirs, labels):
    stages = load_metrics(w)
    stage = adaptation_stage(stages, w)
    so = (stages.get('source_only') or [None])[-1]
    runs.append((label, stages.get(stage, []) if stage else [], so))
  if not any(recs for _, recs, _ in runs):
    raise ValueError(
        'plot_comparison: none of the runs has adaptation records yet ' f'({", ".join(workdirs)})'
    )

  def acc(ax, key, title):
    drawn = False
    for i, (label, recs, so) in enumerate(runs):
      x, y = series(recs, key)
      if len(x):
        _line(ax, x, y, label, color=f'C{i % 10}', linewidth=1.8)
        drawn = True
      if so and isinstance(so.get(key), (int, float)):
        ax.axhline(so[key], color=f'C{i % 10}', linestyle=':', linewidth=1)
    _finish(ax, f'{title} (dotted: source only)', '%')
    return drawn

  def coupling(ax):
    styles = ['-', '--', ':', '-.']
    keys = []
    for _, recs, _ in runs:
      keys += [k for k in keys_with_prefix(recs, 'coupling/') if k not in keys]
    drawn = False
    for i, (label, recs, _) in enumerate(runs):
      for j, k in enumerate(keys):
        x, y = series(recs, k)
        if len(x):
          _line(
              ax,
              x,
              y,
              f'{label} {k.split("/", 1)[1]}',
              color=f'C{i % 10}',
              linestyle=styles[j % len(styles)],
          )
          drawn = True
    _finish(ax, 'coupling between networks', 'coupling')
    return drawn

  def clusters(ax):
    drawn = False
    for i, (label, recs, _) in enumerate(runs):
      x, y = series(recs, 'cluster/num_clusters')
      if len(x):
        _line(ax, x, y, label, color=f'C{i % 10}')
        drawn = True
    _finish(ax, 'number of clusters', 'clusters')
    return drawn

  panels = [
      lambda ax: acc(ax, 'mAP', 'mAP'),
      lambda ax: acc(ax, 'top1', 'rank-1'),
      coupling,
      clusters,
  ]
  # Draw every panel once on a scratch figure to learn which have data, then lay out those.
  probe, probe_axes = _new_figure(1, len(panels))
  present = [p for p, ax in zip(panels, probe_axes) if p(ax)]
  cols = 2 if len(present) > 1 else 1
  rows = -(-len(present) // cols)
  fig, axes = _new_figure(rows, cols)
  for ax, p in zip(axes, present):
    p(ax)
  for ax in axes[len(present) :]:
    ax.set_axis_off()
  fig.suptitle('comparison: ' + ', '.join(labels))
  return _save(fig, out_path)


# ----------------------------------------------------------------------------------------------
# Retrieval figure (numpy / PIL)

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
  from PIL import ImageFont

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
  from PIL import Image
  from PIL import ImageDraw

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


if __name__ == '__main__':  # `python -m jaxreid.plots`: the command line is jaxreid.tools.plots
  from jaxreid.tools import plots as _tool

  sys.exit(_tool.main())
