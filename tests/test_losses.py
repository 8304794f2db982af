"""Tests of jaxreid.losses against slow, independent numpy implementations of the formulas."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid import losses as L

# Jitted copies for the value tests (eager op-by-op dispatch is slow on a shared CPU); the
# transformation tests below also exercise the plain functions.
JL = types.SimpleNamespace(**{n: jax.jit(getattr(L, n)) for n in L.__all__ if n != 'Mined'})


# ----------------------------------------------------------------------------------------------
# Slow numpy references, written from docs/reference.md section 2 with explicit loops (float64).


def np_log_softmax(v):
  v = np.asarray(v, np.float64)
  m = np.max(v)
  return v - m - math.log(np.sum(np.exp(v - m)))


def np_dist(x, y=None):
  x = np.asarray(x, np.float64)
  y = x if y is None else np.asarray(y, np.float64)
  d = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      d2 = np.dot(x[i], x[i]) + np.dot(y[j], y[j]) - 2 * np.dot(x[i], y[j])
      d[i, j] = math.sqrt(max(d2, 1e-12))
  return d


def np_mine(d, labels):
  """Returns a list of (anchor, ap, an) for the anchors that have a negative."""
  out = []
  n = len(labels)
  for a in range(n):
    if labels[a] < 0:
      continue
    pos = [j for j in range(n) if labels[j] == labels[a]]
    neg = [j for j in range(n) if labels[j] >= 0 and labels[j] != labels[a]]
    if not neg:
      continue
    ap = max(pos, key=lambda j: d[a, j])
    an = min(neg, key=lambda j: d[a, j])
    out.append((a, ap, an))
  return out


def np_softmax_triplet(x, labels):
  d = np_dist(x)
  vals = [math.log1p(math.exp(d[a, p] - d[a, n])) for a, p, n in np_mine(d, labels)]
  return float(np.mean(vals)) if vals else 0.0


def np_margin_triplet(x, labels, margin):
  d = np_dist(x)
  vals = [max(0.0, d[a, p] - d[a, n] + margin) for a, p, n in np_mine(d, labels)]
  return float(np.mean(vals)) if vals else 0.0


def np_soft_softmax_triplet(x, xt, labels):
  d, dt = np_dist(x), np_dist(xt)
  vals = []
  for a, p, n in np_mine(d, labels):
    l = np_log_softmax([d[a, p], d[a, n]])
    r = np.exp(np_log_softmax([dt[a, p], dt[a, n]]))
    vals.append(-(r[0] * l[0] + r[1] * l[1]))
  return float(np.mean(vals)) if vals else 0.0


def np_precision(x, labels):
  d = np_dist(x)
  vals = [float(d[a, n] > d[a, p]) for a, p, n in np_mine(d, labels)]
  return float(np.mean(vals)) if vals else 0.0


def np_ce_ls(z, labels, mask, eps=0.1):
  active = [k for k in range(len(mask)) if mask[k]]
  K = len(active)
  vals = []
  for b in range(len(z)):
    if labels[b] < 0:
      continue
    lp = np_log_softmax([z[b][k] for k in active])
    loss = 0.0
    for i, k in enumerate(active):
      q = (1 - eps) * (k == labels[b]) + eps / K
      loss -= q * lp[i]
    vals.append(loss)
  return float(np.mean(vals)) if vals else 0.0


def np_soft_entropy(z, t, mask):
  active = [k for k in range(len(mask)) if mask[k]]
  vals = []
  for b in range(len(z)):
    lp = np_log_softmax([z[b][k] for k in active])
    pt = np.exp(np_log_softmax([t[b][k] for k in active]))
    vals.append(-float(np.sum(pt * lp)))
  return float(np.mean(vals))


# ----------------------------------------------------------------------------------------------
# Inputs.


def pk_labels(p=4, k=4):
  return np.repeat(np.arange(p), k).astype(np.int32)


def feats(seed, n=16, d=8, scale=1.0):
  return (np.random.default_rng(seed).normal(size=(n, d)) * scale).astype(np.float32)


LABEL_CASES = {
    'pk': pk_labels(),
    'lone_identity': np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4, 5, 5, 5, 5], np.int32),
    'noise': np.array([0, 0, -1, 1, 1, -1, 2, 2, 2, -1, 3, 3, 3, 3, 4, -1], np.int32),
    'all_same': np.zeros(16, np.int32),
    'all_same_plus_noise': np.array([0] * 12 + [-1] * 4, np.int32),
    'all_noise': -np.ones(16, np.int32),
}

TOL = dict(rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# Values.


def test_pairwise_distance_matches_formula():
  x, y = feats(0, 10, 6, 3.0), feats(1, 7, 6)
  np.testing.assert_allclose(JL.pairwise_distance(x, y), np_dist(x, y), **TOL)
  d = np.asarray(JL.pairwise_distance(x))
  np.testing.assert_allclose(d, np_dist(x), **TOL)
  assert d.dtype == np.float32
  np.testing.assert_array_equal(np.diag(d), np.float32(1e-6))  # lone-anchor value, exactly
  # Duplicate rows: clamped at 1e-6, never NaN.
  xd = np.concatenate([x[:3], x[:3]])
  dd = np.asarray(JL.pairwise_distance(xd))
  assert np.all(np.isfinite(dd)) and dd.min() >= 1e-6


@pytest.mark.parametrize('case', sorted(LABEL_CASES))
def test_batch_hard_mining_matches_reference(case):
  labels = LABEL_CASES[case]
  x = feats(2, scale=2.0)
  dist = JL.pairwise_distance(x)
  d_ap, d_an, ap_idx, an_idx = JL.batch_hard_mining(dist, labels)
  d_np = np_dist(x)
  mined = {a: (p, n) for a, p, n in np_mine(d_np, labels)}
  for b in range(len(labels)):
    if b in mined:
      p, n = mined[b]
      assert (int(ap_idx[b]), int(an_idx[b])) == (p, n)
      np.testing.assert_allclose([d_ap[b], d_an[b]], [d_np[b, p], d_np[b, n]], **TOL)
    else:
      assert int(an_idx[b]) == -1 and float(d_an[b]) == 0.0
      if labels[b] < 0:
        assert int(ap_idx[b]) == -1 and float(d_ap[b]) == 0.0
      else:  # no negative: the positive is still reported
        assert ap_idx[b] >= 0 and labels[ap_idx[b]] == labels[b]
  assert float(JL.num_triplet_anchors(labels)) == len(mined)


def test_lone_anchor_positive_is_itself():
  labels = LABEL_CASES['lone_identity']
  x = feats(3)
  m = JL.batch_hard_mining(JL.pairwise_distance(x), labels)
  lone = [b for b in range(16) if np.sum(labels == labels[b]) == 1]
  assert lone == [5]
  assert int(m.ap_idx[5]) == 5
  assert float(m.d_ap[5]) == pytest.approx(1e-6, rel=1e-6)


def test_batch_hard_mining_valid_mask():
  labels = pk_labels()
  x = feats(4)
  valid = np.ones(16, bool)
  valid[[1, 6, 11]] = False
  m_valid = JL.batch_hard_mining(JL.pairwise_distance(x), labels, valid)
  noisy = np.where(valid, labels, -1)
  m_noise = JL.batch_hard_mining(JL.pairwise_distance(x), noisy)
  for a, b in zip(m_valid, m_noise):
    np.testing.assert_array_equal(a, b)


TRIPLET_FNS = {
    'softmax_triplet': (
        lambda x, xt, y: JL.softmax_triplet(x, y),
        lambda x, xt, y: np_softmax_triplet(x, y),
    ),
    'soft_softmax_triplet': (
        lambda x, xt, y: JL.soft_softmax_triplet(x, xt, y),
        np_soft_softmax_triplet,
    ),
    'margin_triplet': (
        lambda x, xt, y: JL.margin_triplet(x, y, margin=0.3),
        lambda x, xt, y: np_margin_triplet(x, y, 0.3),
    ),
    'triplet_precision': (
        lambda x, xt, y: JL.triplet_precision(x, y),
        lambda x, xt, y: np_precision(x, y),
    ),
}


@pytest.mark.parametrize('case', sorted(LABEL_CASES))
@pytest.mark.parametrize('name', sorted(TRIPLET_FNS))
def test_triplet_losses_match_reference(name, case):
  fn, ref = TRIPLET_FNS[name]
  labels = LABEL_CASES[case]
  for seed, scale in ((5, 1.0), (6, 0.3), (7, 4.0)):
    x, xt = feats(seed, scale=scale), feats(seed + 100, scale=scale)
    got = float(fn(x, xt, labels))
    np.testing.assert_allclose(got, ref(x, xt, labels), rtol=3e-5, atol=3e-6)
    assert math.isfinite(got)
  if case in ('all_same', 'all_same_plus_noise', 'all_noise'):
    assert got == 0.0  # no anchor has a negative: excluded, mean over nobody = 0


def test_noise_is_the_same_as_removing_the_samples():
  labels = LABEL_CASES['noise']
  keep = labels >= 0
  x, xt = feats(8), feats(9)
  for name, (fn, _) in TRIPLET_FNS.items():
    np.testing.assert_allclose(
        fn(x, xt, labels), fn(x[keep], xt[keep], labels[keep]), rtol=1e-6, err_msg=name
    )
  z = feats(10, 16, 12)
  mask = np.ones(12, bool)
  np.testing.assert_allclose(
      JL.cross_entropy_label_smooth(z, labels, mask),
      JL.cross_entropy_label_smooth(z[keep], labels[keep], mask),
      rtol=1e-6,
  )


def test_softmax_triplet_closed_form():
  # Two identities on a line: anchor 0 at 0, positive 1 at 1, negatives at 3 and 5.
  x = np.array([[0.0], [1.0], [3.0], [5.0]], np.float32)
  y = np.array([0, 0, 1, 1])
  # anchors: 0: ap=1, an=3 -> softplus(1-3); 1: ap=1, an=2 -> softplus(1-2);
  #          2: ap=2, an=2 -> softplus(0); 3: ap=2, an=4 -> softplus(2-4)
  sp = lambda v: math.log1p(math.exp(v))
  expected = (sp(-2) + sp(-1) + sp(0) + sp(-2)) / 4
  assert float(JL.softmax_triplet(x, y)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    'labels',
    [pk_labels(), LABEL_CASES['noise'], np.array([0, 1, 2, -1, 4, 4, 1, 3], np.int32)],
    ids=['pk', 'noise', 'small'],
)
def test_cross_entropy_label_smooth_matches_reference(labels):
  n = len(labels)
  rng = np.random.default_rng(11)
  mask = np.zeros(10, bool)
  mask[:7] = True
  mask[2] = False  # a hole in the active set; move the labels of class 2 to an active class
  labels = np.where(labels == 2, 3, labels)
  z = (rng.normal(size=(n, 10)) * 3).astype(np.float32)
  for eps in (0.1, 0.0, 0.5):
    np.testing.assert_allclose(
        JL.cross_entropy_label_smooth(z, labels, mask, epsilon=eps),
        np_ce_ls(z, labels, mask, eps),
        **TOL,
    )


def test_cross_entropy_inactive_classes_do_not_matter():
  labels = pk_labels()
  rng = np.random.default_rng(12)
  mask = np.arange(12) < 5
  z = rng.normal(size=(16, 12)).astype(np.float32)
  z2 = z.copy()
  z2[:, 5:] = rng.normal(size=(16, 7)) * 100
  z3 = z.copy()
  z3[:, 5:] = np.inf
  z4 = z.copy()
  z4[:, 5:] = np.nan
  ref = float(JL.cross_entropy_label_smooth(z, labels, mask))
  sliced = float(JL.cross_entropy_label_smooth(z[:, :5], labels, np.ones(5, bool)))
  assert ref == pytest.approx(sliced, rel=1e-6)
  g_ref = jax.grad(JL.cross_entropy_label_smooth)(z, labels, mask)
  for zz in (z2, z3, z4):
    assert float(JL.cross_entropy_label_smooth(zz, labels, mask)) == pytest.approx(ref, rel=1e-6)
    g = np.asarray(jax.grad(JL.cross_entropy_label_smooth)(zz, labels, mask))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    assert np.all(g[:, 5:] == 0)
  # same for the soft entropy, in both the student and the teacher logits
  t = rng.normal(size=(16, 12)).astype(np.float32)
  ref = float(JL.soft_entropy(z, t, mask))
  assert ref == pytest.approx(
      float(JL.soft_entropy(z[:, :5], t[:, :5], np.ones(5, bool))), rel=1e-6
  )
  for zz in (z2, z3, z4):
    assert float(JL.soft_entropy(zz, zz[::-1], mask)) == pytest.approx(
        float(JL.soft_entropy(z, z[::-1], mask)), rel=1e-6
    )
    g = np.asarray(jax.grad(JL.soft_entropy)(zz, t, mask))
    assert np.all(np.isfinite(g)) and np.all(g[:, 5:] == 0)


def test_cross_entropy_edge_cases():
  z = feats(13, 4, 6)
  mask = np.ones(6, bool)
  assert float(JL.cross_entropy_label_smooth(z, -np.ones(4, np.int32), mask)) == 0.0
  # a label on an inactive class is excluded like noise (documented)
  mask2 = mask.copy()
  mask2[5] = False
  y = np.array([0, 5, 1, 2], np.int32)
  np.testing.assert_allclose(
      JL.cross_entropy_label_smooth(z, y, mask2), np_ce_ls(z[[0, 2, 3]], y[[0, 2, 3]], mask2), **TOL
  )
  # no active class at all: 0, finite gradient
  none = np.zeros(6, bool)
  assert float(JL.cross_entropy_label_smooth(z, y, none)) == 0.0
  assert np.all(np.isfinite(jax.grad(JL.cross_entropy_label_smooth)(z, y, none)))


def test_soft_entropy_matches_reference():
  rng = np.random.default_rng(14)
  mask = np.arange(9) % 3 != 1
  z = (rng.normal(size=(6, 9)) * 2).astype(np.float32)
  t = (rng.normal(size=(6, 9)) * 2).astype(np.float32)
  np.testing.assert_allclose(JL.soft_entropy(z, t, mask), np_soft_entropy(z, t, mask), **TOL)
  # equals the entropy of the student's own prediction when t == z (minimum over z given t)
  p = np.exp(np.stack([np_log_softmax(r[mask]) for r in z]))
  ent = -np.mean(np.sum(p * np.log(p), axis=1))
  np.testing.assert_allclose(JL.soft_entropy(z, z, mask), ent, **TOL)


# ----------------------------------------------------------------------------------------------
# Gradients.


def numeric_grad(f, x, eps=1e-6):
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (float(f(xp)) - float(f(xm))) / (2 * eps)
  return g


GRAD_CASES = {
    'ce': (lambda a, b, y, m: JL.cross_entropy_label_smooth(a, y, m), 'logits'),
    'soft_entropy': (lambda a, b, y, m: JL.soft_entropy(a, b, m), 'logits'),
    'softmax_triplet': (lambda a, b, y, m: JL.softmax_triplet(a, y), 'features'),
    'soft_softmax_triplet': (lambda a, b, y, m: JL.soft_softmax_triplet(a, b, y), 'features'),
    'margin_triplet': (lambda a, b, y, m: JL.margin_triplet(a, y, 0.3), 'features'),
}


@pytest.mark.parametrize('name', sorted(GRAD_CASES))
def test_gradients_match_finite_differences_float64(name):
  fn, kind = GRAD_CASES[name]
  labels = np.array([0, 0, 1, 1, 1, 2, -1, 3], np.int32)  # lone identity 2, noise, lone 3
  mask = np.array([1, 1, 1, 0, 1, 1], bool)
  labels_ce = np.array([0, 0, 1, 1, 4, 2, -1, 5], np.int32)
  rng = np.random.default_rng(15)
  with jax.enable_x64(True):
    if kind == 'logits':
      a, b, y = rng.normal(size=(8, 6)) * 2, rng.normal(size=(8, 6)) * 2, labels_ce
    else:
      a, b, y = rng.normal(size=(8, 5)), rng.normal(size=(8, 5)), labels
    a, b = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
    f = jax.jit(lambda a, b: fn(a, b, y, mask))
    assert f(a, b).dtype == jnp.float64
    g_a, g_b = jax.grad(f, argnums=(0, 1))(a, b)
    num = numeric_grad(lambda v: f(jnp.asarray(v), b), a)
    np.testing.assert_allclose(g_a, num, rtol=1e-6, atol=1e-8)
    assert np.any(np.asarray(g_a) != 0)
    # Teachers get no gradient (exactly zero), whatever the loss.
    np.testing.assert_array_equal(g_b, 0.0)
    if kind == 'features' and name != 'margin_triplet':
      # gradients flow through both chosen distances: every non-noise sample that is a chosen
      # positive or negative of some anchor gets a gradient
      m = L.batch_hard_mining(JL.pairwise_distance(a), y)
      used = set(np.asarray(m.an_idx)[np.asarray(m.an_idx) >= 0]) | set(
          np.asarray(m.ap_idx)[np.asarray(m.an_idx) >= 0]
      )
      for j in used:
        assert np.any(np.asarray(g_a)[j] != 0), j
      np.testing.assert_array_equal(np.asarray(g_a)[6], 0.0)  # noise sample: no gradient


def test_gradients_float32_central_differences():
  labels = pk_labels(3, 3)
  x = feats(16, 9, 4)
  g = jax.grad(JL.softmax_triplet)(x, labels)
  num = numeric_grad(lambda v: JL.softmax_triplet(jnp.asarray(v, jnp.float32), labels), x, eps=1e-2)
  np.testing.assert_allclose(g, num, rtol=2e-2, atol=2e-3)


def test_stop_gradient_into_teachers():
  labels = pk_labels()
  x, xt = feats(17), feats(18)
  g = jax.grad(JL.soft_softmax_triplet, argnums=1)(x, xt, labels)
  np.testing.assert_array_equal(g, 0.0)
  z, t = feats(19, 16, 6), feats(20, 16, 6)
  g = jax.grad(JL.soft_entropy, argnums=1)(z, t, np.ones(6, bool))
  np.testing.assert_array_equal(g, 0.0)
  # and the teacher really matters for the value
  assert float(JL.soft_softmax_triplet(x, xt, labels)) != float(
      JL.soft_softmax_triplet(x, x, labels)
  )


@pytest.mark.parametrize('case', ['all_same', 'all_noise', 'lone_identity'])
def test_degenerate_batches_have_finite_gradients(case):
  labels = LABEL_CASES[case]
  x, xt = feats(21), feats(22)
  for fn in (
      lambda v: JL.softmax_triplet(v, labels),
      lambda v: JL.soft_softmax_triplet(v, xt, labels),
      lambda v: JL.margin_triplet(v, labels),
  ):
    g = np.asarray(jax.jit(jax.grad(fn))(x))
    assert np.all(np.isfinite(g))
    if case != 'lone_identity':
      np.testing.assert_array_equal(g, 0.0)
  # duplicate features (distance at the clamp) still give finite gradients
  xd = np.concatenate([x[:8], x[:8]])
  g = jax.grad(JL.softmax_triplet)(xd, pk_labels())
  assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------------------------
# Transformations and dtypes.

ALL_FNS = {
    'ce': lambda f, t, z, zt, y, m: L.cross_entropy_label_smooth(z, y, m),
    'soft_entropy': lambda f, t, z, zt, y, m: L.soft_entropy(z, zt, m),
    'softmax_triplet': lambda f, t, z, zt, y, m: L.softmax_triplet(f, y),
    'soft_softmax_triplet': lambda f, t, z, zt, y, m: L.soft_softmax_triplet(f, t, y),
    'margin_triplet': lambda f, t, z, zt, y, m: L.margin_triplet(f, y),
    'triplet_precision': lambda f, t, z, zt, y, m: L.triplet_precision(f, y),
}


def _inputs(seed, n=12, d=6, c=8):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(n, d)).astype(np.float32)
  t = rng.normal(size=(n, d)).astype(np.float32)
  z = rng.normal(size=(n, c)).astype(np.float32)
  zt = rng.normal(size=(n, c)).astype(np.float32)
  y = np.array([0, 0, 0, 1, 1, 2, 3, 3, -1, 4, 4, 4], np.int32)[:n]
  m = np.arange(c) < 6
  return f, t, z, zt, y, m


@pytest.mark.parametrize('name', sorted(ALL_FNS))
def test_jit_vmap_grad_and_no_recompilation(name):
  fn = ALL_FNS[name]
  traces = []

  def traced(*args):
    traces.append(1)
    return fn(*args)

  jitted = jax.jit(traced)
  batches = [_inputs(s) for s in range(3)]
  for b in batches:
    np.testing.assert_allclose(jitted(*b), fn(*b), rtol=1e-6, atol=1e-7)
  assert len(traces) == 1, 'recompiled when only values changed'
  # vmap over a stack of batches == loop
  stacked = [np.stack(a) for a in zip(*batches)]
  in_axes = (0, 0, 0, 0, 0, None)
  stacked[-1] = batches[0][-1]
  v = jax.jit(jax.vmap(fn, in_axes=in_axes))(*stacked)
  np.testing.assert_allclose(v, [fn(*b) for b in batches], rtol=1e-6, atol=1e-7)
  # grad w.r.t. every float input, under jit and vmap
  g = jax.jit(jax.vmap(jax.grad(fn, argnums=(0, 1, 2, 3)), in_axes=in_axes))(*stacked)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


@pytest.mark.parametrize('name', sorted(ALL_FNS))
def test_bfloat16_inputs(name):
  fn = ALL_FNS[name]
  f, t, z, zt, y, m = _inputs(23)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (f, t, z, zt)]
  rounded = [np.asarray(a.astype(jnp.float32)) for a in bf]
  out = fn(*bf, y, m)
  assert out.dtype == jnp.float32
  # computed in float32 internally: equal to the float32 result on the bf16-rounded values
  np.testing.assert_allclose(out, fn(*rounded, y, m), rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda *a: fn(*a, y, m), argnums=(0, 2))(*bf)
  assert all(x.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(x, np.float32))) for x in g)
