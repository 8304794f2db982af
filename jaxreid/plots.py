"""Pictures of a run: training curves from `metrics.jsonl`, and several runs compared.

`plot_run(workdir)` redraws `<workdir>/plots/*.png` from the run's metrics file (cheap enough to
call after every evaluation) and `plot_comparison` puts several runs on one figure; the command
line is `jaxreid-plots WORKDIR [WORKDIR ...] [--compare=out.png]` (`jaxreid.tools.plots`). Curves
use matplotlib's Agg canvas directly (no pyplot, so no global backend is switched and nothing
needs a display). The retrieval figure (ranked gallery images) is `jaxreid.retrieval_figure`.

Metrics records are `{"stage", "step", "time", ...}`; a resumed run may repeat a step, and the
last record of each (stage, step) wins. Panels whose keys are absent (e.g. pseudo-label quality
without ground truth, coupling in older runs) are left out.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Mapping
from typing import Sequence

# matplotlib is imported here, not where a figure is drawn: whatever imports this module draws
# figures (jaxreid-plots, evaluation.draw_plots), so a lazy import would only shorten `--help`.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
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


def panel_gradient_shares(ax, recs, source_only=None) -> bool:
  """Each weighted term's share of the gradient (train.make_gradient_shares), with the 1% line
  under which a term is warned about."""
  drawn = False
  for k in keys_with_prefix(recs, 'grad_share/'):
    x, y = series(recs, k)
    if len(x):
      _line(ax, x, 100 * y, k[len('grad_share/') :])
      drawn = True
  if drawn:
    ax.axhline(1.0, color='grey', linestyle=':', linewidth=1)
    ax.set_yscale('log')
  _finish(ax, 'share of the gradient (first batch of the epoch)', '%')
  return drawn


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
    ('gradient_shares', panel_gradient_shares),
)


def _draw_panel(fn, recs, source_only):
  """Draws one panel on its own figure; returns the figure or None without data."""
  fig, (ax,) = _new_figure(1, 1)
  return fig if fn(ax, recs, source_only) else None


# ----------------------------------------------------------------------------------------------
# One run


def plot_run(workdir: str, *, per_panel: bool = True, pretrain: bool = True) -> list[str]:
  """Writes `<workdir>/plots/{overview,losses,accuracy,clusters,pseudo_labels,coupling,lr,
  grad_norm,gradient_shares,pretrain}.png` for the panels that have data; returns the paths written.

  Nothing is written (and [] returned) before the first adaptation epoch unless pre-training
  curves exist. Raises FileNotFoundError when there is no metrics.jsonl. `per_panel=False`
  writes only the overview (and `pretrain=False` skips the pre-training figure, which does not
  change during adaptation): the cheap call to make after every evaluation.
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
# Variants over seeds (jaxreid-compare)


def plot_seed_comparison(
    values: Mapping[str, Mapping[int, float]],
    differences: Mapping[str, Mapping[int, float]],
    intervals: Mapping[str, Sequence[float] | None],
    out_path: str,
    *,
    metric: str = 'mAP',
    confidence: float = 0.95,
) -> str:
  """Variants over seeds (`jaxreid.compare`): left, each variant's per-seed values (one colour
  per seed) and their mean +- std; right, each variant's per-seed differences from the baseline
  (the first of `values`) and their mean with its interval (`intervals`, None: fewer than two
  seeds), against the zero line. Returns `out_path`."""
  names = list(values)
  seeds = sorted({s for per_seed in values.values() for s in per_seed})
  colour = {s: f'C{i % 10}' for i, s in enumerate(seeds)}
  fig, (left, right) = _new_figure(1, 2, panel_size=(max(4.0, 1.4 * len(names) + 2), 3.6))
  for i, name in enumerate(names):
    per_seed = values[name]
    for j, s in enumerate(seeds):
      if s in per_seed:
        x = i - 0.15 + 0.3 * j / max(1, len(seeds) - 1)
        left.plot(x, per_seed[s], 'o', color=colour[s], label=f'seed {s}' if i == 0 else None)
    v = np.asarray(list(per_seed.values()), float)
    std = v.std(ddof=1) if v.size > 1 else 0.0
    left.errorbar(i + 0.3, v.mean(), yerr=std, fmt='s', color='k', capsize=4)
  _finish(left, f'{metric} per seed (black: mean ± std)', f'{metric} (%)', xlabel='variant')
  left.set_xticks(range(len(names)), names)  # after _finish, which sets an integer locator
  left.set_xlim(-0.6, len(names) - 0.4)
  others = list(differences)
  for i, name in enumerate(others):
    per_seed = differences[name]
    for j, s in enumerate(seeds):
      if s in per_seed:
        x = i - 0.15 + 0.3 * j / max(1, len(seeds) - 1)
        right.plot(x, per_seed[s], 'o', color=colour[s])
    mean = float(np.mean(list(per_seed.values())))
    interval = intervals.get(name)
    if interval is not None:
      err = [[mean - interval[0]], [interval[1] - mean]]
      right.errorbar(i + 0.3, mean, yerr=err, fmt='s', color='k', capsize=4)
    else:
      right.plot(i + 0.3, mean, 's', color='k')
  right.axhline(0.0, color='grey', linestyle='--', linewidth=1)
  _finish(
      right,
      f'minus {names[0]}, paired per seed (black: mean, {confidence * 100:g}% t interval)',
      f'{metric} difference',
      xlabel='variant',
      legend=False,
  )
  right.title.set_fontsize(9)
  right.set_xticks(range(len(others)), others)
  right.set_xlim(-0.6, max(1, len(others)) - 0.4)
  return _save(fig, out_path)
