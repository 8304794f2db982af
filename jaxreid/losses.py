"""Pure loss functions of MMT and ABMT (docs/reference.md section 2).

Every function here is a pure function of arrays: no Python control flow on values, so each one is
safe under `jax.jit`, `jax.grad` and `jax.vmap`, and compiles once per input shape.

Precision: inputs of any floating dtype are accepted; everything is computed in *at least* float32
(bfloat16 / float16 inputs are upcast, float64 inputs under `jax_enable_x64` stay float64, which the
tests use for finite-difference gradient checks). Pairwise distances use HIGHEST matmul precision so
that accelerators do not compute the Gram matrix in bf16/TF32 (the |x|^2 + |y|^2 - 2 x.y form
cancels catastrophically otherwise).

Conventions shared by the functions below:

* `labels` are integer (B,) arrays; a label < 0 is clustering noise and the sample is excluded
  everywhere (not an anchor, not a candidate positive/negative, not counted in any mean).
* `class_mask` is a bool (C,) array marking the *active* classes (clusters of this epoch) among the
  C classifier rows; inactive classes are removed from every softmax (their logits never matter).
* Batch means are over the samples/anchors that take part; with none, the loss is 0 (never NaN).

Deviations from the reference code (yxgeee/MMT, chenhao2345/ABMT), all on degenerate batches that
a P x K sampler never produces, or for numerical robustness:

* An anchor without any negative (every valid sample has its label) is *excluded* from the triplet
  means; the reference keeps it (its negative distance becomes d + 9999999, so it adds ~0 to the
  softmax-triplet mean but a huge value to the soft softmax-triplet). The count of anchors actually
  used is available as `num_triplet_anchors` (logged by the methods' losses as `anchors`).
* Noise samples (label < 0) are excluded; the reference never feeds them to the losses at all (they
  are dropped from the epoch's data), so this only matters for padded / noisy batches.
* `pairwise_distance(x)` (one argument) sets the diagonal to exactly the clamp value sqrt(1e-12) =
  1e-6, the value the reference gets in exact arithmetic; in float32 the reference's diagonal is
  rounding noise of |x|^2 (up to ~1e-3 for features of norm ~10).
* Cross-entropy: samples whose label is not an active class are excluded like noise (the reference
  has no class mask: its classifier has exactly K rows). `triplet_precision` divides by the number
  of anchors used, the reference by the batch size (identical for P x K batches).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    'cross_entropy_label_smooth',
    'soft_entropy',
    'pairwise_distance',
    'batch_hard_mining',
    'softmax_triplet',
    'soft_softmax_triplet',
    'margin_triplet',
    'triplet_precision',
    'num_triplet_anchors',
    'Mined',
]

# Logit given to inactive classes before a softmax. Finite (not -inf) so that 0 * it is 0, not NaN;
# exp(_MASKED_LOGIT - max) underflows to exactly 0 in float32.
_MASKED_LOGIT = -1e9
# Clamp of the squared distance (reference: dist.clamp(min=1e-12).sqrt()).
_DIST_CLAMP = 1e-12


def _upcast(x):
  """Returns `x` as an array of a floating dtype of at least float32 precision."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_mean(values, mask):
  """Mean of `values` over `mask`; 0 when the mask is empty. NaN-free in value and gradient."""
  mask = jnp.asarray(mask, bool)
  total = jnp.sum(jnp.where(mask, values, jnp.zeros_like(values)))
  count = jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)
  return total / count


def _active_log_softmax(logits, class_mask):
  """log_softmax over the active classes; inactive entries get a large negative finite value."""
  masked = jnp.where(class_mask, logits, jnp.asarray(_MASKED_LOGIT, logits.dtype))
  return jax.nn.log_softmax(masked, axis=-1)


def cross_entropy_label_smooth(logits, labels, class_mask, epsilon=0.1):
  """Cross-entropy with label smoothing over the active classes (MMT eq. 1 with smoothing).

    q_bk = (1 - eps) * 1[k == y_b] + eps / K      for active k, 0 for inactive k,
    L    = mean_{b valid} sum_{k active} -q_bk log_softmax(z_b)_k,

  where K = number of active classes (`class_mask.sum()`), the softmax runs over the active classes
  only (inactive logits are replaced by a large negative constant, their targets are 0, so their
  values never matter, even if inf/NaN), and the mean runs over the samples with a label >= 0 that
  is an active class (noise and out-of-range labels are excluded). Returns 0 if no sample is valid.

  Args:
    logits: (B, C) floating (bfloat16 accepted; computed in float32).
    labels: (B,) int.
    class_mask: (C,) bool, True for the active classes.
    epsilon: smoothing (reference 0.1); a static Python float or a traced scalar.
  Returns:
    scalar float32.
  """
  logits = _upcast(logits)
  labels = jnp.asarray(labels)
  class_mask = jnp.asarray(class_mask, bool)
  num_classes = logits.shape[-1]
  k = jnp.maximum(jnp.sum(class_mask), 1).astype(logits.dtype)
  log_probs = _active_log_softmax(logits, class_mask)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)  # all-zero row for label < 0
  targets = (1.0 - epsilon) * onehot + (epsilon / k) * class_mask.astype(logits.dtype)
  per_sample = -jnp.sum(jnp.where(class_mask, targets * log_probs, 0.0), axis=-1)
  label_active = jnp.take(class_mask, jnp.clip(labels, 0, num_classes - 1), axis=0)
  valid = (labels >= 0) & (labels < num_classes) & label_active
  return _masked_mean(per_sample, valid)


def soft_entropy(logits, teacher_logits, class_mask):
  """Soft cross-entropy against a teacher's predictions (MMT eq. 5, "soft entropy").

    L = mean_b sum_{k active} -softmax(t_b)_k log_softmax(z_b)_k,

  both softmaxes over the active classes only, no temperature, and no gradient into the teacher
  logits t (`stop_gradient`). The mean runs over all B samples.

  Args:
    logits: (B, C) student logits z.
    teacher_logits: (B, C) teacher logits t.
    class_mask: (C,) bool.
  Returns:
    scalar float32.
  """
  logits = _upcast(logits)
  teacher_logits = jax.lax.stop_gradient(_upcast(teacher_logits))
  class_mask = jnp.asarray(class_mask, bool)
  log_probs = _active_log_softmax(logits, class_mask)
  teacher_probs = jnp.exp(_active_log_softmax(teacher_logits, class_mask))
  per_sample = -jnp.sum(jnp.where(class_mask, teacher_probs * log_probs, 0.0), axis=-1)
  return jnp.mean(per_sample)


def pairwise_distance(x, y=None):
  """Euclidean distance matrix as the reference computes it (not squared, raw features).

    d_ij = sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i . y_j, 1e-12)).

  With `y=None` the distances are among the rows of `x` and the diagonal is exactly 1e-6 (the
  reference's value in exact arithmetic; see the module docstring). It is separate from
  `jaxreid.retrieval.distances` on purpose: it is traced inside the differentiated losses (sqrt,
  clamp and diagonal as the reference's training loss, float64 under x64 for gradient checks).

  Args:
    x: (B, D) floating.
    y: optional (M, D) floating.
  Returns:
    (B, M) (or (B, B)) float32 distances.
  """
  x = _upcast(x)
  same = y is None
  y = x if same else _upcast(y)
  dtype = jnp.promote_types(x.dtype, y.dtype)
  x, y = x.astype(dtype), y.astype(dtype)
  xx = jnp.sum(x * x, axis=-1)[:, None]
  yy = jnp.sum(y * y, axis=-1)[None, :]
  xy = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  d2 = xx + yy - 2.0 * xy
  if same:  # Static (Python) branch on the call signature, not on values.
    d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)
  return jnp.sqrt(jnp.maximum(d2, _DIST_CLAMP))


class Mined(NamedTuple):
  """Result of `batch_hard_mining`.

  d_ap, d_an: (B,) distances to the hardest positive / negative (0 where undefined).
  ap_idx, an_idx: (B,) int32 indices of those samples; -1 where undefined. `an_idx >= 0` is exactly
    the set of anchors that take part in the triplet losses.
  """

  d_ap: jax.Array
  d_an: jax.Array
  ap_idx: jax.Array
  an_idx: jax.Array


def _mine(dist, labels, valid=None):
  """Batch-hard mining. Returns (d_ap, d_an, ap_idx, an_idx, anchor_mask) with *safe* indices.

  Safe indices: where undefined they are 0 (a real row), so gathering with them is always finite;
  the anchor mask says which entries mean something.
  """
  dist = _upcast(dist)
  labels = jnp.asarray(labels)
  ok = labels >= 0
  if valid is not None:
    ok = ok & jnp.asarray(valid, bool)
  same = labels[:, None] == labels[None, :]
  pair_ok = ok[:, None] & ok[None, :]
  pos = same & pair_ok  # includes the anchor itself (d = 1e-6)
  neg = (~same) & pair_ok
  has_neg = jnp.any(neg, axis=1)
  anchor = ok & has_neg
  # Indices come from value comparisons (no gradient); the distances are gathered from `dist`,
  # so gradients flow through both chosen distances. argmax/argmin take the first index on ties.
  ap_idx = jnp.argmax(jnp.where(pos, dist, -jnp.inf), axis=1)
  an_idx = jnp.argmin(jnp.where(neg, dist, jnp.inf), axis=1)
  d_ap = jnp.take_along_axis(dist, ap_idx[:, None], axis=1)[:, 0]
  d_an = jnp.take_along_axis(dist, an_idx[:, None], axis=1)[:, 0]
  return d_ap, d_an, ap_idx, an_idx, anchor


def batch_hard_mining(dist, labels, valid=None):
  """Batch-hard mining (Hermans et al. 2017, as in MMT's `_batch_hard`).

  For each anchor b: hardest positive = the farthest sample with the same label (the anchor itself
  counts, so an identity with a single image gets d_ap = 1e-6 from the diagonal), hardest negative =
  the nearest sample with a different label. Samples with label < 0 (or `valid` False) are neither
  anchors nor candidates. Gradients flow through both chosen distances (the indices are constants).

  An anchor that has no negative (all valid samples share its label) is *not used*: its an_idx is
  -1 and d_an is 0; excluded anchors (label < 0 / invalid) have ap_idx = an_idx = -1 and
  d_ap = d_an = 0.
  The triplet losses average over the anchors with `an_idx >= 0` only (the reference averages over
  all B; see the module docstring). Ties are broken towards the lowest index.

  Args:
    dist: (B, B) distances (e.g. `pairwise_distance(features)`).
    labels: (B,) int.
    valid: optional (B,) bool, extra mask of usable samples.
  Returns:
    Mined(d_ap, d_an, ap_idx, an_idx).
  """
  d_ap, d_an, ap_idx, an_idx, anchor = _mine(dist, labels, valid)
  ok = jnp.asarray(labels) >= 0
  if valid is not None:
    ok = ok & jnp.asarray(valid, bool)
  ap_idx = jnp.where(ok, ap_idx, -1).astype(jnp.int32)
  an_idx = jnp.where(anchor, an_idx, -1).astype(jnp.int32)
  d_ap = jnp.where(ok, d_ap, 0.0)
  d_an = jnp.where(anchor, d_an, 0.0)
  return Mined(d_ap, d_an, ap_idx, an_idx)


def num_triplet_anchors(labels, valid=None):
  """Number of anchors the triplet losses use: valid label and at least one negative. float32."""
  labels = jnp.asarray(labels)
  ok = labels >= 0
  if valid is not None:
    ok = ok & jnp.asarray(valid, bool)
  neg = (labels[:, None] != labels[None, :]) & ok[:, None] & ok[None, :]
  return jnp.sum(ok & jnp.any(neg, axis=1)).astype(jnp.float32)


def softmax_triplet(features, labels):
  """Softmax-triplet loss with hard labels (MMT eq. 6; reference `SoftTripletLoss(margin=0.0)`).

    L = mean_b -log( exp(d_an) / (exp(d_ap) + exp(d_an)) ) = mean_b softplus(d_ap - d_an),

  with batch-hard mining on the distances of these (raw, pre-BN) features. Mean over the anchors
  that have a negative (see `batch_hard_mining`); 0 if there are none.

  Args:
    features: (B, D) floating.
    labels: (B,) int.
  Returns:
    scalar float32.
  """
  dist = pairwise_distance(features)
  d_ap, d_an, _, _, anchor = _mine(dist, labels)
  return _masked_mean(jax.nn.softplus(d_ap - d_an), anchor)


def soft_softmax_triplet(features, teacher_features, labels):
  """Soft softmax-triplet loss against a teacher (MMT eq. 8; reference `SoftTripletLoss`).

  Mining happens on the *student* distances D; the teacher distances D_t are read at the
  student-mined indices (no mining on the teacher, no gradient into it):

    l_b = log_softmax([D(b, ap_b), D(b, an_b)]),
    r_b = softmax([D_t(b, ap_b), D_t(b, an_b)])   (stop_gradient),
    L   = mean_b -(r_b0 l_b0 + r_b1 l_b1),

  the mean over the anchors that have a negative; 0 if there are none.

  Args:
    features: (B, D) student features (raw, pre-BN).
    teacher_features: (B, D') teacher features (same batch, same order).
    labels: (B,) int.
  Returns:
    scalar float32.
  """
  dist = pairwise_distance(features)
  d_ap, d_an, ap_idx, an_idx, anchor = _mine(dist, labels)
  teacher_dist = pairwise_distance(jax.lax.stop_gradient(_upcast(teacher_features)))
  t_ap = jnp.take_along_axis(teacher_dist, ap_idx[:, None], axis=1)[:, 0]
  t_an = jnp.take_along_axis(teacher_dist, an_idx[:, None], axis=1)[:, 0]
  log_p = jax.nn.log_softmax(jnp.stack([d_ap, d_an], axis=-1), axis=-1)
  target = jax.lax.stop_gradient(jax.nn.softmax(jnp.stack([t_ap, t_an], axis=-1), axis=-1))
  target = target.astype(log_p.dtype)
  return _masked_mean(-jnp.sum(target * log_p, axis=-1), anchor)


def margin_triplet(features, labels, margin=0.3):
  """Classic batch-hard triplet loss with a margin (reference `TripletLoss`; no published run).

    L = mean_b max(0, d_ap - d_an + m),

  mean over the anchors that have a negative; 0 if there are none.

  Args:
    features: (B, D) floating.
    labels: (B,) int.
    margin: m (static float or traced scalar).
  Returns:
    scalar float32.
  """
  dist = pairwise_distance(features)
  d_ap, d_an, _, _, anchor = _mine(dist, labels)
  return _masked_mean(jax.nn.relu(d_ap - d_an + margin), anchor)


def triplet_precision(features, labels):
  """Fraction of the used anchors whose hardest negative is farther than their hardest positive.

  For logging: mean over anchors with a negative of 1[d_an > d_ap] (the reference divides by B).
  No gradient (a step function). Returns 0 if no anchor is used.
  """
  dist = pairwise_distance(jax.lax.stop_gradient(_upcast(features)))
  d_ap, d_an, _, _, anchor = _mine(dist, labels)
  return _masked_mean((d_an > d_ap).astype(dist.dtype), anchor)
