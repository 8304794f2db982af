"""Plots of a run's metrics and run comparisons.

The metrics files are written by hand with the records a real MMT run writes (source-only,
per-epoch losses, clusters, pseudo-label quality, coupling, evaluation every second epoch), plus
a repeated step from a resumed run and a half-written last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from jaxreid import plots
from jaxreid.tools import plots as plots_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, records, tail=''):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
    f.write(tail)


def mmt_records(epochs=4, *, quality=True, coupling=True, lr=True, shares=True, offset=0.0):
  recs = [
      {
          'stage': 'source_only',
          'step': 0,
          'time': 1.0,
          'mAP': 13.9,
          'top1': 12.7,
          'top5': 23.0,
          'top10': 33.3,
          'num_valid_queries': 126,
          'num_queries': 126,
      }
  ]
  for e in range(1, epochs + 1):
    r = {
        'stage': 'mmt',
        'step': e,
        'time': 1.0 + e,
        'epoch': e,
        'cluster/num_clusters': 70 + e,
        'cluster/noise_fraction': 0.2 - 0.02 * e,
        'grad_norm': 4.0 - 0.1 * e,
        'loss/ce1': 3.0 - 0.2 * e,
        'loss/ce2': 3.1 - 0.2 * e,
        'loss/soft_ce1': 2.5,
        'loss/tri1': 0.6,
        'loss/soft_tri1': 0.7,
        'loss/total': 9.5 - 0.3 * e,
        'prec/tri1': 0.1 * e,
    }
    if shares:
      r.update({'grad_share/ce1': 0.5, 'grad_share/tri1': 0.495, 'grad_share/soft_tri1': 0.005})
    if quality:
      r.update(
          {
              'cluster/purity': 0.4 + 0.01 * e,
              'cluster/nmi': 0.7 + 0.01 * e,
              'cluster/ari': 0.2 + 0.01 * e,
              'cluster/pairwise_precision': 0.2,
              'cluster/pairwise_recall': 0.45,
              'cluster/pairwise_fscore': 0.27,
          }
      )
    if coupling:
      r.update(
          {
              'coupling/teachers': 0.9 - 0.05 * e,
              'coupling/students': 0.8 - 0.04 * e,
              'coupling/teacher_student': 0.85 - 0.03 * e,
          }
      )
    if lr:
      r['lr'] = 3.5e-4
    if e % 2 == 0:
      r.update(
          {
              'mAP': 19.0 + e + offset,
              'top1': 23.0 + e + offset,
              'top5': 35.0,
              'top10': 42.0,
              'net1/mAP': 19.0 + e + offset,
              'net2/mAP': 18.0 + e,
              'net1/top1': 23.0 + e + offset,
              'net2/top1': 22.0 + e,
          }
      )
    recs.append(r)
  return recs


@pytest.fixture
def mmt_run(tmp_path):
  """A finished MMT run; epoch 2 was repeated after a resume (the later record must win) and
  the last line was cut off by a crash."""
  workdir = tmp_path / 'mmt_a_to_b'
  recs = mmt_records()
  resumed = dict(recs[2], time=100.0, **{'mAP': 99.0, 'net1/mAP': 99.0})  # after a resume
  _write(str(workdir / 'metrics.jsonl'), recs + [resumed], tail='{"stage": "mmt", "st')
  (workdir / 'config.json').write_text(json.dumps({'method': 'mmt'}))
  pre = [
      {
          'stage': 'pretrain',
          'step': e,
          'time': e,
          'epoch': e,
          'lr': 1e-3 * e,
          'loss/ce': 4.0 - 0.3 * e,
          'loss/tri': 1.0 - 0.1 * e,
          'loss/total': 5.0 - 0.4 * e,
          **({'source_mAP': 40.0 + e, 'source_top1': 50.0 + e} if e % 2 == 0 else {}),
      }
      for e in range(1, 5)
  ]
  _write(str(workdir / 'pretrain_seed1' / 'metrics.jsonl'), pre)
  _write(str(workdir / 'pretrain_seed2' / 'metrics.jsonl'), pre)
  return str(workdir)


def _png_size(path):
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    return im.size


# ----------------------------------------------------------------------------------------------
# Reading


def test_load_metrics_keeps_last_record_per_step_and_skips_broken_lines(mmt_run):
  stages = plots.load_metrics(mmt_run)
  assert sorted(stages) == ['mmt', 'source_only']
  steps = [r['step'] for r in stages['mmt']]
  assert steps == [1, 2, 3, 4]
  assert stages['mmt'][1]['mAP'] == 99.0  # the resumed run's record
  x, y = plots.series(stages['mmt'], 'mAP')
  np.testing.assert_array_equal(x, [2, 4])
  np.testing.assert_array_equal(y, [99.0, 23.0])
  assert plots.adaptation_stage(stages, mmt_run) == 'mmt'


def test_missing_metrics_file_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match='has no metrics.jsonl'):
    plots.plot_run(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    plots.plot_run(str(tmp_path / 'nope'))


# ----------------------------------------------------------------------------------------------
# One run


def test_plot_run_writes_every_panel_with_data(mmt_run):
  written = plots.plot_run(mmt_run)
  names = [os.path.basename(p) for p in written]
  assert names == [
      'overview.png',
      'losses.png',
      'accuracy.png',
      'clusters.png',
      'pseudo_labels.png',
      'coupling.png',
      'lr.png',
      'grad_norm.png',
      'gradient_shares.png',
      'pretrain.png',
  ]
  for p in written:
    assert os.path.dirname(p) == os.path.join(mmt_run, 'plots')
    w, h = _png_size(p)
    assert w >= 300 and h >= 200
  # The overview has a grid of 8 panels (2 columns x 4 rows): taller than wide.
  w, h = _png_size(written[0])
  assert h > w
  assert not [f for f in os.listdir(os.path.join(mmt_run, 'plots')) if f.endswith('.tmp')]


def test_plot_run_skips_absent_panels(tmp_path):
  workdir = tmp_path / 'dbscan_no_gt'
  _write(
      str(workdir / 'metrics.jsonl'),
      mmt_records(3, quality=False, coupling=False, lr=False, shares=False),
  )
  names = {os.path.basename(p) for p in plots.plot_run(str(workdir))}
  assert names == {'overview.png', 'losses.png', 'accuracy.png', 'clusters.png', 'grad_norm.png'}


def test_plot_run_before_first_epoch_writes_nothing(tmp_path):
  _write(str(tmp_path / 'metrics.jsonl'), mmt_records(0))  # only the source-only record
  assert plots.plot_run(str(tmp_path)) == []


def test_panels_draw_the_recorded_values(mmt_run):
  from matplotlib.figure import Figure

  stages = plots.load_metrics(mmt_run)
  recs, source_only = stages['mmt'], stages['source_only'][-1]

  ax = Figure().add_subplot()
  assert plots.panel_accuracy(ax, recs, source_only)
  lines = {l.get_label(): l for l in ax.get_lines()}
  np.testing.assert_array_equal(lines['mAP'].get_xdata(), [2, 4])
  np.testing.assert_array_equal(lines['mAP'].get_ydata(), [99.0, 23.0])
  np.testing.assert_array_equal(lines['rank-1'].get_ydata(), [25.0, 27.0])
  # the source-only level is a horizontal line at the source-only value
  np.testing.assert_array_equal(lines['source only mAP'].get_ydata(), [13.9, 13.9])
  np.testing.assert_array_equal(lines['source only rank-1'].get_ydata(), [12.7, 12.7])
  # net2 differs from the model (net1): drawn; net1 equals it: not drawn twice
  assert 'net2 mAP' in lines and 'net1 mAP' not in lines
  # the x axis spans the run, from the source-only model (epoch 0) to the last epoch (4),
  # although the evaluations were at epochs 2 and 4 only
  left, right = ax.get_xlim()
  assert left < 0 < 4 < right < 5

  ax = Figure().add_subplot()
  assert plots.panel_coupling(ax, recs)
  lines = {l.get_label(): l for l in ax.get_lines()}
  assert set(lines) == {'teachers', 'students', 'teacher_student'}
  np.testing.assert_allclose(lines['teachers'].get_ydata(), [0.85, 0.8, 0.75, 0.7])

  ax = Figure().add_subplot()
  assert plots.panel_losses(ax, recs)
  assert {l.get_label() for l in ax.get_lines()} == {
      'ce1',
      'ce2',
      'soft_ce1',
      'tri1',
      'soft_tri1',
      'total',
  }
  ax = Figure().add_subplot()
  assert not plots.panel_coupling(ax, [{'step': 1, 'loss/total': 1.0}])

  # Gradient shares in percent per term, and the 1% line under which a term is warned about.
  ax = Figure().add_subplot()
  assert plots.panel_gradient_shares(ax, recs)
  lines = {l.get_label(): l for l in ax.get_lines()}
  np.testing.assert_allclose(lines['soft_tri1'].get_ydata(), [0.5] * 4)
  np.testing.assert_allclose(lines['ce1'].get_ydata(), [50.0] * 4)
  assert any(list(l.get_ydata()) == [1.0, 1.0] for l in ax.get_lines() if l.get_label()[0] == '_')
  ax = Figure().add_subplot()
  assert not plots.panel_gradient_shares(ax, [{'step': 1, 'loss/total': 1.0}])


# ----------------------------------------------------------------------------------------------
# Comparison and CLI


def test_plot_comparison(mmt_run, tmp_path):
  other = tmp_path / 'abmt_a_to_b'
  recs = [
      dict(r, stage='abmt') if r['stage'] == 'mmt' else r
      for r in mmt_records(6, coupling=False, offset=-5.0)
  ]
  _write(str(other / 'metrics.jsonl'), recs)
  out = plots.plot_comparison(
      [mmt_run, str(other)], str(tmp_path / 'cmp' / 'c.png'), labels=['MMT', 'ABMT']
  )
  assert out == str(tmp_path / 'cmp' / 'c.png')
  w, h = _png_size(out)
  assert w > 600 and h > 400  # 2 x 2 panels
  with pytest.raises(ValueError, match='one label per work dir'):
    plots.plot_comparison([mmt_run, str(other)], str(tmp_path / 'x.png'), labels=['a'])
  empty = tmp_path / 'fresh'
  _write(str(empty / 'metrics.jsonl'), mmt_records(0))
  with pytest.raises(ValueError, match='none of the runs has adaptation records'):
    plots.plot_comparison([str(empty)], str(tmp_path / 'y.png'))


def test_cli_writes_run_plots_and_comparison(mmt_run, tmp_path):
  other = tmp_path / 'second'
  _write(str(other / 'metrics.jsonl'), mmt_records(2))
  out = tmp_path / 'compare.png'
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'jaxreid.tools.plots',
          mmt_run,
          str(other),
          f'--compare={out}',
          '--labels=mmt,second',
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  printed = proc.stdout.split()
  assert str(out) in printed
  assert os.path.join(mmt_run, 'plots', 'overview.png') in printed
  assert os.path.join(str(other), 'plots', 'accuracy.png') in printed
  for p in printed:
    assert os.path.isfile(p)


def test_cli_errors(mmt_run, tmp_path, capsys):
  assert plots_tool.main([str(tmp_path / 'missing')]) == 2
  assert 'metrics.jsonl' in capsys.readouterr().err
  assert plots_tool.main([mmt_run, mmt_run, '--compare=x.png', '--labels=a']) == 2
  assert '--labels has 1 names for 2 work dirs' in capsys.readouterr().err


def test_plot_run_overview_only(mmt_run):
  """The cheap variant for calls after every evaluation."""
  written = plots.plot_run(mmt_run, per_panel=False, pretrain=False)
  assert written == [os.path.join(mmt_run, 'plots', 'overview.png')]
  assert os.listdir(os.path.join(mmt_run, 'plots')) == ['overview.png']
  w, h = _png_size(written[0])
  assert h > w  # still all 7 panels
