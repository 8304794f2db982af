"""End-to-end tests of the experiment driver on a tiny synthetic world: kill-and-resume gives the
same result as an uninterrupted run, a non-finite loss stops the run keeping the last good
checkpoint, and bad configs fail before any work with the offending key named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from configs import mmt as mmt_config
from jaxreid import checkpoint as checkpoint_lib
from jaxreid import config_checks
from jaxreid import methods as methods_lib
from jaxreid import run
from jaxreid import train as train_lib
from jaxreid.data import Split
from jaxreid.evaluator import Evaluator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def world_cache(tmp_path_factory):
  path = tmp_path_factory.mktemp('world')
  old = os.environ.get('JAXREID_DATA_CACHE')
  os.environ['JAXREID_DATA_CACHE'] = str(path)
  yield path
  if old is None:
    os.environ.pop('JAXREID_DATA_CACHE')
  else:
    os.environ['JAXREID_DATA_CACHE'] = old


def tiny_config():
  c = mmt_config.get_config()
  c.data.synthetic.update(dict(num_train_ids=12, num_test_ids=6, min_images=4, max_images=6))
  c.data.update(dict(height=32, width=16, batch_size=16, eval_batch_size=64))
  c.model.update(dict(depth=18, width=8))
  c.pretrain.update(dict(epochs=1, iters=2, warmup_epochs=1, milestones=(5,), eval_every=0))
  c.train.update(dict(epochs=2, iters=2, eval_every=1))
  c.cluster.num_clusters = 6
  return c


def final_params(workdir):
  ckpt = checkpoint_lib.Checkpointer(workdir)
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp

  restored = ckpt._managers['latest'].restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  )
  ckpt.close()
  return restored['state']['teacher_params'], dict(restored['meta'])


def test_crash_then_resume_equals_uninterrupted_run(world_cache, tmp_path, monkeypatch):
  config = tiny_config()
  full = run.train_and_evaluate(config, str(tmp_path / 'full'))

  # A run that diverges in the second adaptation epoch (parameters turn NaN) stops with a clear
  # error and keeps the checkpoint of the last good epoch.
  calls = {'adapt_epochs': 0}
  real_run_epoch = train_lib.run_epoch

  def diverging_run_epoch(train_chunk, state, *args, **kwargs):
    if args[3].stage == config.method:  # the Progress object names the stage
      calls['adapt_epochs'] += 1
      if calls['adapt_epochs'] == 2:
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    return real_run_epoch(train_chunk, state, *args, **kwargs)

  monkeypatch.setattr(train_lib, 'run_epoch', diverging_run_epoch)
  crashed = str(tmp_path / 'crashed')
  with pytest.raises(train_lib.NonFiniteLossError, match='non-finite loss.* at epoch 2'):
    run.train_and_evaluate(config, crashed)
  _, meta = final_params(crashed)
  assert meta['epoch'] == 0  # the last good checkpoint (adaptation epoch 1) is kept

  # Rerunning the same command resumes and ends exactly where the uninterrupted run ended.
  monkeypatch.setattr(train_lib, 'run_epoch', real_run_epoch)
  resumed = run.train_and_evaluate(config, crashed)
  for key in ('mAP', 'top1', 'top5', 'top10'):
    assert resumed[f'{config.method} (adapted)'][key] == pytest.approx(
        full[f'{config.method} (adapted)'][key], abs=1e-6
    )
  full_params, _ = final_params(str(tmp_path / 'full'))
  resumed_params, _ = final_params(crashed)
  for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(resumed_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # What a user gets in the work dir.
  for name in (
      'config.json',
      'metrics.jsonl',
      'results.json',
      'model.msgpack',
      'plots/overview.png',
      'plots/coupling.png',
      'plots/accuracy.png',
  ):
    assert os.path.exists(os.path.join(crashed, name)), name
  records = [json.loads(l) for l in open(os.path.join(str(tmp_path / 'full'), 'metrics.jsonl'))]
  adapt_records = [r for r in records if r['stage'] == 'mmt']
  assert [r['step'] for r in adapt_records] == [0, 1, 2]
  before, epochs = adapt_records[0], adapt_records[1:]
  assert all('mAP' in r and 'cluster/nmi' in r and 'loss/total' in r for r in epochs)
  # Coupling diagnostic: before adaptation each EMA teacher is a copy of its student (distance
  # exactly 0) and the two networks come from differently seeded pre-training (distance > 0,
  # the same for teachers and students); after an epoch teacher and student differ.
  assert before['coupling/teacher_student'] == 0.0
  assert before['coupling/teachers'] > 0.0
  assert before['coupling/students'] == pytest.approx(before['coupling/teachers'])
  assert all(r['coupling/teacher_student'] > 0.0 and r['coupling/teachers'] > 0.0 for r in epochs)
  # Where the time went: every phase recorded, and the phases fit in the wall time.
  sys.path.insert(0, REPO)
  from experiments import phase_breakdown

  phases, wall = phase_breakdown.breakdown(records)
  assert all(v is not None and v >= 0.0 for v in phases.values()), phases
  assert 0.0 < sum(phases.values()) <= wall
  assert phases['evaluation'] > 0.0 and phases['training'] > 0.0
  # The adapted model is exported in the weight format that evaluate / search read.
  exported = checkpoint_lib.read_weights(os.path.join(crashed, 'model.msgpack'))
  for a, b in zip(jax.tree.leaves(exported['params']), jax.tree.leaves(full_params['net1'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  _check_exported_model_with_the_commands(crashed, full[f'{config.method} (adapted)'])


def test_select_best_on_test_exports_the_reported_network(world_cache, tmp_path):
  """With model selection on the test set, model.msgpack is the teacher that the results name,
  taken from the best epoch's checkpoint."""
  config = tiny_config()
  config.train.select_best_on_test = True
  workdir = str(tmp_path / 'best')
  adapted = run.train_and_evaluate(config, workdir)[f'{config.method} (adapted)']
  assert adapted['selection'] == 'best epoch on the target test set'
  ckpt = checkpoint_lib.Checkpointer(workdir)
  import orbax.checkpoint as ocp

  restored = ckpt._managers['best'].restore(
      ckpt.latest_step('best'),
      args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
  )
  ckpt.close()
  assert restored['meta']['best']['model'] == adapted['model']
  exported = checkpoint_lib.read_weights(os.path.join(workdir, 'model.msgpack'))
  want = restored['state']['teacher_params'][adapted['model']]
  for a, b in zip(jax.tree.leaves(exported['params']), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _check_exported_model_with_the_commands(workdir, run_results):
  """The trained model, loaded by `jaxreid-evaluate` / `jaxreid-search` from the work dir alone,
  reproduces the run's own final evaluation and searches the target gallery end to end."""
  from jaxreid import inference
  from jaxreid import search as search_cli

  loaded = inference.load_model(workdir)
  config = json.load(open(os.path.join(workdir, 'config.json')))
  evaluator = Evaluator.load('synthetic_b', None, config)
  query, gallery = evaluator.query, evaluator.gallery
  results, *_ = evaluator.run_model(loaded, batch_size=64)
  for key in ('mAP', 'top1', 'top5'):
    assert results[key] == pytest.approx(run_results[key], abs=1e-4), key
  found = search_cli.search(
      loaded, os.path.dirname(query.paths[0]), os.path.dirname(gallery.paths[0]), topk=5
  )
  assert found.ranked.shape == (len(query.paths), 5)
  assert np.all(np.diff(found.distances, axis=1) >= 0)
  # A query's best match by the search is its nearest gallery feature under the protocol's
  # distance (independent recomputation).
  qf = found.query_features.astype(np.float64)
  gf = found.gallery_features.astype(np.float64)
  d = ((qf[:, None] - gf[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(found.ranked[:, 0], d.argmin(1))


def _main(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'jaxreid.main', '--config=configs/mmt.py', *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_unknown_config_key_fails_before_work(tmp_path):
  proc = _main('--config.train.epochz=3', f'--workdir={tmp_path}')
  assert proc.returncode != 0
  assert 'epochz' in proc.stderr
  assert not os.listdir(tmp_path)


def test_invalid_config_value_names_the_key(tmp_path):
  proc = _main('--config.cluster.method=spectral', f'--workdir={tmp_path}')
  assert proc.returncode == 2
  assert 'config.cluster.method' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_every_loss_weight_is_a_config_field():
  from configs import abmt
  from configs import cluster_baseline
  from configs import mean_teacher
  from configs import mmt

  for module, method in (
      (mmt, 'mmt'),
      (abmt, 'abmt'),
      (mean_teacher, 'mean_teacher'),
      (cluster_baseline, 'cluster_baseline'),
  ):
    config = module.get_config()
    assert set(methods_lib.get(method).weights) <= set(config.loss.keys()), method
  config = abmt.get_config()
  config.loss.soft_tri = 0.0  # the paper's "without L_stri" ablation
  _, loss = methods_lib.from_config(config)
  outputs = {
      f'{n}/{b}/{k}': jnp.ones((4, 3)) * (i + 1)
      for i, (n, b) in enumerate((s, b) for s in ('student1', 'teacher1') for b in ('avg', 'max'))
      for k in ('features', 'logits')
  }
  _, metrics = loss(outputs, methods_lib.Labels(jnp.array([0, 0, 1, 1]), jnp.ones(3, bool)))
  names = sorted(k[5:] for k in metrics if k.startswith('loss/') and k != 'loss/total')
  assert names == ['ce_avg', 'ce_max', 'soft_ce_avg', 'soft_ce_max']


def test_loss_weight_override_from_the_command_line(tmp_path):
  # The override parses (the field exists); the run then stops at validation of a bad method.
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'jaxreid.main',
          '--config=configs/abmt.py',
          '--config.loss.soft_tri=0.0',
          '--config.method=nope',
          f'--workdir={tmp_path}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'config.method' in proc.stderr


def test_teacher_views_override_and_its_validation():
  from configs import abmt
  from configs import cluster_baseline

  config = abmt.get_config()
  assert methods_lib.from_config(config)[0].teacher_views == (0,)  # the reference: the student's
  config.train.teacher_views = (1,)
  config_checks.validate_config(config)
  spec, _ = methods_lib.from_config(config)
  assert spec.teacher_views == (1,) and spec.student_views == (0,) and spec.num_views == 2
  for module, views, message in (
      (mmt_config, (1,), 'one view index per teacher'),
      (abmt, (7,), 'integers in 0..3'),
      (cluster_baseline, (1,), 'no EMA teacher'),
  ):
    config = module.get_config()
    config.train.teacher_views = views
    with pytest.raises(
        config_checks.ConfigError, match=r'config\.train\.teacher_views.*' + message
    ):
      config_checks.validate_config(config)


def test_two_branch_evaluation_reports_each_branch():
  # Eval features [avg half, max half] made by hand from the images: the avg half is the
  # identity's one-hot (perfect retrieval); the max half is the identity's one-hot for queries
  # but the *next* identity's for gallery images, so for every query the nearest gallery images
  # in the max half (distance 0) are of the previous identity, never the true one.
  num_ids = 4
  q_pids = np.arange(num_ids)
  g_pids = np.repeat(np.arange(num_ids), 2)

  def split(pids, cam):
    return Split(np.array([f'{p}.jpg' for p in pids]), pids, np.full(len(pids), cam))

  def images(pids, gallery):  # identity and split written into the first pixel
    out = np.zeros((len(pids), 4, 2, 3), np.uint8)
    out[:, 0, 0, 0] = pids
    out[:, 0, 0, 1] = gallery
    return out

  evaluator = Evaluator(
      'toy',
      split(q_pids, 0),
      split(g_pids, 1),
      images=np.concatenate([images(q_pids, 0), images(g_pids, 1)]),
  )

  def embed_fn(variables_list, batch):
    batch = np.asarray(batch)
    pid, shift = batch[:, 0, 0, 0].astype(int), batch[:, 0, 0, 1].astype(int)
    eye = np.eye(num_ids, dtype=np.float32)
    f = np.concatenate([2 * eye[pid], eye[(pid + shift) % num_ids]], axis=1)
    return f / np.linalg.norm(f, axis=1, keepdims=True)

  res = evaluator.run(embed_fn, [{}], batch_size=8, branches=True)
  assert res['avg/mAP'] == pytest.approx(100.0) and res['avg/top1'] == pytest.approx(100.0)
  assert res['max/top1'] == 0.0 and res['max/mAP'] < 100.0
  # The joint feature weighs the avg half more (squared distance 0.4 to a true match, 1.6 to
  # the previous identity's images), so it still retrieves perfectly.
  assert res['mAP'] == pytest.approx(100.0)
  assert 'avg/mAP' not in evaluator.run(embed_fn, [{}], batch_size=8)


def test_deterministic_flag_adds_the_xla_flags_keeping_the_users():
  from jaxreid import main

  assert main.deterministic_xla_flags('') == (
      '--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0'
  )
  # A user's own value of one of them wins; unrelated flags are kept in order.
  assert main.deterministic_xla_flags(
      '--xla_force_host_platform_device_count=2 ' '--xla_gpu_autotune_level=2'
  ) == (
      '--xla_force_host_platform_device_count=2 --xla_gpu_autotune_level=2 '
      '--xla_gpu_deterministic_ops=true'
  )


def test_divergence_with_a_finite_loss_stops_before_anything_non_finite_is_saved(
    world_cache, tmp_path
):
  # lr 1e9: the first adaptation epoch's loss can stay finite while the gradient norm is NaN and
  # the parameters turn non-finite; the run must stop and keep no non-finite state.
  config = tiny_config()
  config.train.lr = 1e9
  workdir = str(tmp_path / 'run')
  with pytest.raises(train_lib.NonFiniteLossError, match='non-finite .*(gradient norm|parameters)'):
    run.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'model.msgpack'))
  ckpt = checkpoint_lib.Checkpointer(workdir)
  if ckpt.latest_step() is not None:
    params, _ = final_params(workdir)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
  ckpt.close()


def test_phase_breakdown_of_a_resumed_run_sums_its_sessions():
  """Two sessions: the first writes epochs 1-2 and dies later; the second resumes from epoch 1's
  checkpoint, so it redoes epoch 2, then runs epoch 3. Wall time = the two sessions' spans (not
  first start to last record, which would count the hours between them); setup phases summed;
  the rewritten epoch counted once, with its last record."""
  sys.path.insert(0, REPO)
  from experiments import phase_breakdown

  def epoch(step, t, train):
    return dict(
        stage='mmt', step=step, time=t, epoch=step, cluster_seconds=1.0, train_seconds=train
    )

  timing = lambda started, t: dict(
      stage='timing', step=0, time=t, started=started, decode_seconds=2.0, source_only_seconds=5.0
  )
  records = [
      timing(1000.0, 1010.0),
      epoch(1, 1100.0, 80.0),
      epoch(2, 1180.0, 70.0),
      dict(stage='mmt', step=99, time=1250.0),
      timing(5000.0, 5010.0),  # resumed hours later
      epoch(2, 5090.0, 72.0),
      epoch(3, 5170.0, 75.0),
  ]
  phases, wall = phase_breakdown.breakdown(records)
  assert wall == (1250.0 - 1000.0) + (5170.0 - 5000.0)
  assert phases['decoding images'] == 4.0 and phases['source-only evaluation'] == 10.0
  assert phases['training'] == 80.0 + 72.0 + 75.0 and phases['clustering'] == 3.0
  assert phases['evaluation'] is None  # not recorded by these epochs


def test_the_run_seed_leaves_the_source_models_fixed(world_cache, tmp_path):
  """`seed` varies the adaptation only: runs of seeds 2 and 3 pre-train the same two source
  models (pretrain.seed 1 and 2, bit for bit); pretrain.seed=None makes them follow `seed`."""

  def source_files(seed, pretrain_seed):
    config = tiny_config()
    config.seed = seed
    config.pretrain.seed = pretrain_seed
    config.train.epochs = 0
    workdir = tmp_path / f'seed{seed}_{pretrain_seed}'
    run.train_and_evaluate(config, str(workdir))
    return {
        p.parent.name: p.read_bytes() for p in sorted(workdir.glob('pretrain_seed*/model.msgpack'))
    }

  seed2, seed3 = source_files(2, 1), source_files(3, 1)
  assert sorted(seed2) == sorted(seed3) == ['pretrain_seed1', 'pretrain_seed2']
  assert seed2 == seed3
  assert seed2['pretrain_seed1'] != seed2['pretrain_seed2']
  following = source_files(3, None)
  assert sorted(following) == ['pretrain_seed3', 'pretrain_seed4']
  assert following['pretrain_seed3'] != seed3['pretrain_seed1']
  # The pretrain method's run is the pre-training: its seed is the run's.
  assert base_config.get_config('pretrain').pretrain.seed is None
