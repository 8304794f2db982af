"""Tiny models and data for trainer tests (shared by tests and the device-count probe)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid import train as train_lib

HEIGHT, WIDTH = 32, 16
NUM_IDS, PER_ID = 4, 4
MAX_CLASSES = 8


def toy_images(seed: int = 0, num_ids: int = NUM_IDS, per_id: int = PER_ID):
  """Each identity: a fixed top and bottom colour; images differ by noise. (N,H,W,3) uint8."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(0, 256, size=(num_ids, 2, 3))
  images, labels, cams = [], [], []
  for pid in range(num_ids):
    for k in range(per_id):
      img = np.empty((HEIGHT, WIDTH, 3), np.float32)
      img[: HEIGHT // 2] = colours[pid, 0]
      img[HEIGHT // 2 :] = colours[pid, 1]
      img += rng.normal(0, 20, img.shape)
      images.append(np.clip(img, 0, 255).astype(np.uint8))
      labels.append(pid)
      cams.append(k % 2)
  return np.stack(images), np.asarray(labels, np.int32), np.asarray(cams, np.int32)


def tiny_model(arch: str = 'resnet', num_classes: int = MAX_CLASSES, **kw):
  return models.create_model(dict(arch=arch, depth=18, width=8, num_classes=num_classes, **kw))


def init_students(model, n: int, seed: int = 0):
  x = jnp.zeros((1, HEIGHT, WIDTH, 3))
  return [
      jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(seed + i), x, train=False))
      for i in range(n)
  ]


def setup(
    method: str,
    *,
    lr: float = 1e-3,
    seed: int = 0,
    mesh=None,
    augment: bool = True,
    teacher_views: tuple = (),
):
  """(model, spec, tx, state, step_fn, data) for `method` on the toy data; `teacher_views`
  overrides the method's teachers' views."""
  spec = methods_lib.get(method)
  if teacher_views:
    spec = dataclasses.replace(spec, teacher_views=tuple(teacher_views))
  model = tiny_model(spec.arch or 'resnet')
  tx = train_lib.make_optimizer(lr)
  students = init_students(model, spec.num_students, seed)
  images, labels, _ = toy_images(seed)
  centroids = np.eye(NUM_IDS, models.embedding_dim(model), dtype=np.float32)
  students = [dict(v, params=models.set_classifier_rows(v['params'], centroids)) for v in students]
  state = train_lib.create_train_state(spec, students, tx, jax.random.PRNGKey(seed))
  data = train_lib.EpochData(
      images=jnp.asarray(images),
      labels=jnp.asarray(labels),
      class_mask=models.class_mask(NUM_IDS, MAX_CLASSES),
      target_images=jnp.asarray(images),
  )
  step_fn = train_lib.make_train_step(
      spec,
      model,
      tx,
      mesh=mesh,
      target_bn_pass=(method == 'pretrain'),
      augment=augment,
  )
  return model, spec, tx, state, step_fn, data


def pk_indices(iters: int, seed: int = 0, batch: int = 8):
  """(iters, batch) indices: batch // 4 identities x 4 images per batch."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(iters):
    ids = rng.choice(NUM_IDS, batch // PER_ID, replace=False)
    rows.append(np.concatenate([pid * PER_ID + rng.permutation(PER_ID) for pid in ids]))
  return np.asarray(rows, np.int32)


def run_steps(
    method: str,
    iters: int,
    *,
    mesh=None,
    lr: float = 1e-3,
    seed: int = 0,
    batch: int = 8,
    augment: bool = True,
):
  """Runs `iters` scanned steps; returns (final state, metrics dict of (iters,) arrays)."""
  mesh = mesh or train_lib.make_mesh()
  _, _, _, state, step_fn, data = setup(method, lr=lr, seed=seed, mesh=mesh, augment=augment)
  chunk = train_lib.make_train_chunk(step_fn, mesh)
  idx = pk_indices(iters, seed, batch)
  state = train_lib.replicate(state, mesh)
  data = train_lib.replicate(data, mesh)
  state, metrics = chunk(state, data, idx, idx)
  return jax.device_get(state), jax.device_get(metrics)
