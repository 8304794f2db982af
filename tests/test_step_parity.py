"""One jaxreid training step of MMT and of ABMT equals the reference step restated in PyTorch.

For OSNet x0.25 (torchreid), MobileNetV2 (torchvision) and a narrow ResNet-50 (torchvision),
the same variables go into jaxreid's jitted step (`train.make_train_step`) and into plain torch
modules with the upstream state-dict layouts (tests/torch_reference.py). The torch side is the
reference step as docs/reference.md sections 1-3 state it: train-mode forwards of the students
and of the teachers (under no_grad; their running statistics move with their own forward), the
loss written out again (label-smoothed cross-entropy over the active classes, softmax-triplet
with batch-hard mining on the student's distances, soft entropy, soft softmax-triplet with the
teacher's distances at the student-mined indices; MMT's weighting, ABMT's cross-branch pairing),
`backward`, a fresh `torch.optim.Adam(weight_decay=5e-4)` step, and the EMA of the parameters
with alpha_t = min(1 - 1/(t+1), 0.999). Every loss term, every gradient, every updated student
and teacher parameter and every BN running statistic is compared.

The reference runs in float64, so that every difference is jaxreid's own float32 error (see
the tolerances). Augmentation is off (every view is the normalised image; augmentation is tested
elsewhere); the teachers differ from the students and the step counter is 3, so that the EMA and
the pairing of each student with the other network's teacher (MMT) or the teacher's other branch
(ABMT) are exercised.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

from flax import traverse_util  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch_reference as tr  # noqa: E402

from jaxreid import input_pipeline  # noqa: E402
from jaxreid import methods as methods_lib  # noqa: E402
from jaxreid import models  # noqa: E402
from jaxreid import numpy_init  # noqa: E402
from jaxreid import osnet  # noqa: E402
from jaxreid import train as train_lib  # noqa: E402

HEIGHT, WIDTH = 64, 32
LABELS = np.array([2, 2, 2, 2, 0, 0, 0, 0])  # 2 identities x 4 images
NUM_CLASSES, ACTIVE = 5, 3  # classifier rows 3 and 4 are inactive (class 1 has no image here)
LR, WD, B1, B2, EPS = 1e-3, 5e-4, 0.9, 0.999, 1e-8
STEP = 3  # the global step before this one: alpha = 0.75
EPSILON = 0.1  # label smoothing
SOFT_CE, SOFT_TRI = 0.5, 0.8  # MMT's soft-ce-weight and soft-tri-weight

# Tolerances: jaxreid's float32 step against the float64 reference.
# * Train-mode BatchNorm over 8 images and small maps (4x2 at the last stages) amplifies float32
#   rounding: features, losses and running statistics agree to about 4e-5 relative (measured
#   worst over the 7 cases: losses 3.7e-5, statistics 2.4e-5 of the tensor's largest entry).
LOSS_RTOL = 2e-4
STATS_RTOL = 2e-4  # relative to the tensor's largest entry
# * Gradients also cross ReLU kinks: at the last stages the float32 activations are off by ~1e-5
#   of their scale, so the few pre-activations that close to 0 fall on the other side, the
#   gradient of such an element jumps between its value and 0, and every layer upstream inherits
#   the jump. PyTorch's own float32 step is off from float64 as much (it differs from jaxreid's in
#   which kinks it crosses). Measured, jaxreid vs float64 over the 7 cases: 2.6% of a network's
#   gradient norm, 3.9% of a tensor's norm for tensors above 1% of the network's, 4.4e-4 of the
#   network's norm for the smaller ones (some have an exact gradient of 0: a bias followed by a
#   train-mode BN, through linear layers only, carries only rounding). Hence, in L2 norms:
GRAD_NET_RTOL = 0.1  # |dg| <= 10% |g| over each network
GRAD_RTOL, GRAD_NET_ATOL = 0.2, 5e-3  # per tensor: |dg| <= 20% |g| + 0.5% |g of the network|
# ... and elementwise for the classifiers and BN necks, which are downstream of every kink (the
# loss is smooth in them): measured up to 5.3e-4 of the tensor's largest entry (ABMT's max
# branch, the deepest path).
HEAD_RTOL = 2e-3  # relative to the tensor's largest entry
# * Updated parameters: Adam's first step is lr (g + wd p) / (|g + wd p| + eps), about lr per
#   entry. Each entry is allowed the change of that update over the gradient error its tensor
#   showed (about 2 lr where that error could flip the sign of g + wd p, about 0 elsewhere; at
#   least half of every network's entries must be in the second case, measured 78-99.8%), plus
#   float32 rounding of p - lr u (1e-6 of the tensor's largest |p|) and Adam's bias corrections,
#   which optax computes in float32 (1 - 0.999 -> 1.0000467e-3) and torch in double (optax's
#   first step is lr (1 - 6.7e-6)). The EMA teacher is allowed (1 - alpha) times that.
PARAM_ATOL, ADAM_ATOL = 1e-6, 2e-5 * LR
MIN_SURE = 0.5

BACKBONES = {
    'osnet': dict(backbone='osnet_x0_25'),
    'mobilenetv2': dict(backbone='mobilenetv2'),  # last_stride 1 (jaxreid's default)
    'resnet': dict(backbone='resnet', depth=50, width=8),
}
OSNET_CHANNELS = (16, 64, 96, 128)


# ----------------------------------------------------------------------------------------------
# Variables and the jaxreid step


def _variables(model, seed):
  """Every variable non-trivial: BN scales / biases and running statistics random, classifier
  rows random unit-scale vectors (so the logits are O(1) and the softmaxes not flat), inactive
  rows included (they only decay)."""
  flat = traverse_util.flatten_dict(numpy_init.init_variables(model, seed))
  rng = np.random.default_rng(seed)
  for path, v in sorted(flat.items()):
    if path[-1] in ('scale', 'var'):
      flat[path] = 0.6 + rng.random(v.shape)
    elif path[-1] in ('bias', 'mean'):
      flat[path] = 0.1 * rng.standard_normal(v.shape)
    elif path[1].endswith('classifier'):
      flat[path] = rng.standard_normal(v.shape) / np.sqrt(v.shape[0])
    flat[path] = np.asarray(flat[path], np.float32)
  return traverse_util.unflatten_dict(flat)


def _images():
  return np.random.default_rng(123).integers(0, 256, (len(LABELS), HEIGHT, WIDTH, 3), np.uint8)


def _jax_step(method, model, students, teachers):
  """One jitted jaxreid step (as training runs it) from a state whose teachers are `teachers`,
  with a fresh Adam state and step counter STEP."""
  tx = train_lib.make_optimizer(LR, weight_decay=WD, b1=B1, b2=B2, eps=EPS)
  state = train_lib.create_train_state(method, students, tx, jax.random.key(0))
  state = state.replace(
      teacher_params={n: t['params'] for n, t in zip(method.networks, teachers)},
      teacher_batch_stats={n: t['batch_stats'] for n, t in zip(method.networks, teachers)},
      step=jnp.asarray(STEP, jnp.int32),
  )
  images = _images()
  data = train_lib.EpochData(
      images=jnp.asarray(images),
      labels=jnp.asarray(LABELS, jnp.int32),
      class_mask=models.class_mask(ACTIVE, NUM_CLASSES),
      target_images=jnp.zeros((0, HEIGHT, WIDTH, 3), jnp.uint8),
  )
  step = jax.jit(train_lib.make_train_step(method, model, tx, augment=False))
  idx = jnp.arange(len(LABELS), dtype=jnp.int32)
  new, metrics = step(state, data, idx, idx)
  return jax.device_get(new), jax.device_get(metrics)


# ----------------------------------------------------------------------------------------------
# The same networks in torch


_LEAF = {
    'kernel': 'weight',
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
}
# torchvision InvertedResidual.conv children (Conv2dNormActivation layout): with and without the
# 1x1 expansion (t = 1 only for features[1]).
_MBV2_EXPAND = {
    'expand/conv': '0.0',
    'expand/bn': '0.1',
    'dw/conv': '1.0',
    'dw/bn': '1.1',
    'project/conv': '2',
    'project/bn': '3',
}
_MBV2_T1 = {'dw/conv': '0.0', 'dw/bn': '0.1', 'project/conv': '1', 'project/bn': '2'}
_TRUNKS = ('backbone', 'avg_branch', 'max_branch')


def torch_key(path, backbone):
  """The torch state-dict key of a jaxreid variable path (collection, top, *modules, leaf)."""
  _, top, *mid, leaf = path
  if backbone == 'mobilenetv2' and top in _TRUNKS:
    block = mid[0]
    if block in ('features_0', 'features_18'):
      module = f'features.{block[9:]}.{ {"conv": 0, "bn": 1}[mid[1]] }'
    else:
      table = _MBV2_T1 if block == 'features_1' else _MBV2_EXPAND
      name = 'extra' if block == 'extra' else f'features.{block[9:]}'
      module = f'{name}.conv.{table["/".join(mid[1:3])]}'
  else:  # torchreid / torchvision ResNet: '_<i>' is '.<i>' ('conv2_2_0' -> 'conv2.2.0')
    module = '.'.join(osnet.torch_name(m) for m in mid)
    module = module.replace('downsample_conv', 'downsample.0')
    module = module.replace('downsample_bn', 'downsample.1')
  return '.'.join(filter(None, [top, module, _LEAF[leaf]]))


def to_torch(value):
  value = np.asarray(value, np.float32)
  if value.ndim == 4:  # conv (kh, kw, in, out) -> (out, in, kh, kw); depthwise (3, 3, 1, C)
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
    value = value.T
  return torch.from_numpy(np.ascontiguousarray(value))


def from_torch(tensor):
  value = tensor.detach().double().numpy()
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def _trunk(backbone, part):
  """The torch trunk piece: 'all' (ReIDNet), 'shared', 'avg' or 'max' (ABMTNet). The split is
  docs/reference.md section 8's: everything but the last stage is shared."""
  if backbone == 'osnet':
    stages = {'all': (0, 1, 2, 3), 'shared': (0, 1, 2)}.get(part, (3,))
    return tr.OSNetTrunk(OSNET_CHANNELS, stages, extra_block=part == 'max')
  if backbone == 'mobilenetv2':
    blocks = {'all': range(19), 'shared': range(14)}.get(part, range(14, 19))
    return tr.MobileNetV2Trunk(blocks, last_stride=1, extra_block=part == 'max')
  stages = {'all': (0, 1, 2, 3, 4), 'shared': (0, 1, 2, 3)}.get(part, (4,))
  return tr.ResNetTrunk(width=8, stages=stages, extra_bottleneck=part == 'max')


def _head(backbone, head):
  """(head module, dimension of the classifier's input)."""
  if backbone == 'osnet':
    return tr.OSNetHead(OSNET_CHANNELS[3], bn_neck=head == 'bnneck'), 512
  dim = 1280 if backbone == 'mobilenetv2' else 8 * 8 * 4
  return tr.BNNeck(dim), dim


def torch_net(backbone, arch, head, variables):
  """The torch network of `arch` holding `variables` (every state-dict entry is set from them,
  except the frozen-at-0 neck biases jaxreid does not have)."""
  if arch == 'abmt':
    (avg_neck, dim), (max_neck, _) = _head(backbone, head), _head(backbone, head)
    net = tr.ABMTNet(
        _trunk(backbone, 'shared'),
        _trunk(backbone, 'avg'),
        _trunk(backbone, 'max'),
        avg_neck,
        max_neck,
        dim,
        NUM_CLASSES,
    )
  else:
    neck, dim = _head(backbone, head)
    net = tr.ReIDNet(_trunk(backbone, 'all'), neck, dim, NUM_CLASSES)
  sd = net.state_dict()
  loaded = {}
  for path, value in traverse_util.flatten_dict(variables).items():
    key = torch_key(path, backbone)
    assert key in sd and key not in loaded, (path, key)
    loaded[key] = to_torch(value)
    assert loaded[key].shape == sd[key].shape, (path, key, loaded[key].shape, sd[key].shape)
  left = {k for k in sd if k not in loaded and not k.endswith('num_batches_tracked')}
  frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
  assert left == frozen, left ^ frozen  # only the neck biases, which stay 0
  assert all(n.endswith('bias') and 'neck' in n for n in frozen), frozen
  net.load_state_dict(loaded, strict=False)
  return net


def torch_tensor(net, path, backbone):
  """The torch parameter or buffer holding jaxreid's variable `path`."""
  key = torch_key(path, backbone)
  named = dict(net.named_parameters()) if path[0] == 'params' else dict(net.named_buffers())
  return named[key]


# ----------------------------------------------------------------------------------------------
# The reference losses, in torch (docs/reference.md section 2)


def cross_entropy_label_smooth(logits, labels):
  """Over the K active classes (the reference's classifier has exactly K rows; MMT slices its
  outputs to `[:, :num_cluster]`)."""
  log_probs = F.log_softmax(logits[:, :ACTIVE], dim=1)
  targets = (1 - EPSILON) * F.one_hot(labels, ACTIVE) + EPSILON / ACTIVE
  return (-targets * log_probs).mean(0).sum()


def soft_entropy(logits, teacher_logits):
  targets = F.softmax(teacher_logits[:, :ACTIVE], dim=1).detach()
  return (-targets * F.log_softmax(logits[:, :ACTIVE], dim=1)).mean(0).sum()


def euclidean_dist(x):
  xx = x.pow(2).sum(1, keepdim=True)
  return (xx + xx.t() - 2 * x @ x.t()).clamp(min=1e-12).sqrt()


def _hardest(dist, mask, largest):
  """Per row, the largest (smallest) entry of `dist` where `mask`, with its index. Asserts a
  clear winner: a near tie could be mined differently by float rounding on the two sides."""
  fill = float('-inf') if largest else float('inf')
  masked = dist.detach().masked_fill(~mask, fill)
  top = masked.topk(2, dim=1, largest=largest).values
  gap = (top[:, 0] - top[:, 1]).abs()
  assert torch.all(gap > 1e-4 * dist.detach().max()), f'near tie in mining: {gap}'
  idx = masked.argmax(1) if largest else masked.argmin(1)
  return dist.gather(1, idx[:, None])[:, 0], idx


def batch_hard(dist, labels):
  """Hardest positive (farthest, the anchor included) and negative (nearest) per anchor."""
  same = labels[:, None] == labels[None, :]
  d_ap, ap = _hardest(dist, same, largest=True)
  d_an, an = _hardest(dist, ~same, largest=False)
  return d_ap, d_an, ap, an


def softmax_triplet(features, labels):
  """MMT's SoftTripletLoss(margin=0): mean -log_softmax([d_ap, d_an])[1]."""
  d_ap, d_an, _, _ = batch_hard(euclidean_dist(features), labels)
  return (-F.log_softmax(torch.stack([d_ap, d_an], 1), dim=1)[:, 1]).mean()


def soft_softmax_triplet(features, teacher_features, labels):
  """MMT's SoftTripletLoss(margin=None): mined on the student, the teacher's distances at the
  student's indices as soft targets."""
  d_ap, d_an, ap, an = batch_hard(euclidean_dist(features), labels)
  log_p = F.log_softmax(torch.stack([d_ap, d_an], 1), dim=1)
  ref = euclidean_dist(teacher_features.detach())
  t_ap, t_an = ref.gather(1, ap[:, None])[:, 0], ref.gather(1, an[:, None])[:, 0]
  targets = F.softmax(torch.stack([t_ap, t_an], 1), dim=1).detach()
  return (-targets * log_p).mean(0).sum()


def mmt_loss(s, t, labels):
  """MMT's trainer: students 1, 2 read teachers 2, 1. Returns (total, {term: value})."""
  terms = {}
  for i, j in ((1, 2), (2, 1)):
    terms[f'ce{i}'] = cross_entropy_label_smooth(s[i]['logits'], labels)
    terms[f'tri{i}'] = softmax_triplet(s[i]['features'], labels)
    terms[f'soft_ce{i}'] = soft_entropy(s[i]['logits'], t[j]['logits'])
    terms[f'soft_tri{i}'] = soft_softmax_triplet(s[i]['features'], t[j]['features'], labels)
  total = (
      (terms['ce1'] + terms['ce2']) * (1 - SOFT_CE)
      + (terms['tri1'] + terms['tri2']) * (1 - SOFT_TRI)
      + (terms['soft_ce1'] + terms['soft_ce2']) * SOFT_CE
      + (terms['soft_tri1'] + terms['soft_tri2']) * SOFT_TRI
  )
  return total, terms


def abmt_loss(s, t, labels):
  """ABMT's trainer: each student branch reads the teacher's other branch."""
  s, t = s[1], t[1]
  terms = {}
  for b, other in (('avg', 'max'), ('max', 'avg')):
    terms[f'ce_{b}'] = cross_entropy_label_smooth(s[f'{b}/logits'], labels)
    terms[f'soft_ce_{b}'] = soft_entropy(s[f'{b}/logits'], t[f'{other}/logits'])
    terms[f'soft_tri_{b}'] = soft_softmax_triplet(
        s[f'{b}/features'], t[f'{other}/features'], labels
    )
  loss_ce = (terms['ce_avg'] + terms['ce_max']) / 2
  loss_sce = (terms['soft_ce_avg'] + terms['soft_ce_max']) / 2
  loss_stri = (terms['soft_tri_avg'] + terms['soft_tri_max']) / 2
  return (loss_ce + loss_sce) / 2 + loss_stri, terms


def torch_step(backbone, arch, head, students, teachers):
  """The reference step in float64. Returns (student nets, teacher nets, loss terms, gradients
  by net: {torch name: grad})."""
  nets = [torch_net(backbone, arch, head, v).double() for v in students]
  emas = [torch_net(backbone, arch, head, v).double() for v in teachers]
  x = np.asarray(input_pipeline.normalize(_images())).transpose(0, 3, 1, 2)
  x = torch.from_numpy(np.ascontiguousarray(x)).double()
  labels = torch.from_numpy(LABELS)
  for net in nets + emas:
    net.train()  # teachers too: batch statistics, running statistics from their own forward
  s = {i + 1: net(x) for i, net in enumerate(nets)}
  with torch.no_grad():
    t = {i + 1: net(x) for i, net in enumerate(emas)}
  total, terms = (abmt_loss if arch == 'abmt' else mmt_loss)(s, t, labels)
  terms['total'] = total
  params = [p for net in nets for p in net.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
  optimizer.zero_grad()
  total.backward()
  grads = [
      {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad} for net in nets
  ]
  optimizer.step()
  alpha = min(1 - 1 / (STEP + 1), 0.999)
  with torch.no_grad():  # EMA of the parameters only; running statistics are the teachers' own
    for net, ema in zip(nets, emas):
      for p, q in zip(net.parameters(), ema.parameters()):
        q.mul_(alpha).add_(p, alpha=1 - alpha)
  return nets, emas, {k: float(v.detach()) for k, v in terms.items()}, grads


# ----------------------------------------------------------------------------------------------
# The test


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree, np.float64)


def _adam_direction(g):
  return g / (np.abs(g) + EPS)


def _is_head(path):
  """Classifiers and BN necks: nothing but smooth functions between them and the loss."""
  return path[1].endswith('classifier') or (
      path[1].endswith('neck') and (len(path) == 3 or path[2] == 'bn')
  )


def _check_network(name, params0, teacher0, new, mu, net, ema, grads, backbone):
  """Gradients, updated parameters and EMA teacher parameters of one student network."""
  alpha = min(1 - 1 / (STEP + 1), 0.999)
  flat = traverse_util.flatten_dict({'params': params0})
  g_ref = {path: from_torch(grads[torch_key(path, backbone)]) for path in flat}
  net_norm = np.sqrt(sum(np.sum(g**2) for g in g_ref.values()))
  net_err, sure, entries = 0.0, 0, 0
  for path, p0 in flat.items():
    what = f'{name} {"/".join(path[1:])}'
    p0 = np.asarray(p0, np.float64)
    # A fresh Adam's first moment is (1 - b1) (g + wd p): the loss gradient g, read back.
    g = _get(mu, path[1:]) / (1 - B1) - WD * p0
    err = np.linalg.norm(g - g_ref[path])
    net_err += err**2
    bound = GRAD_RTOL * np.linalg.norm(g_ref[path]) + GRAD_NET_ATOL * net_norm
    assert err <= bound, f'gradient {what}: |dg| {err:.3g} > {bound:.3g}'
    if _is_head(path):
      atol = HEAD_RTOL * np.max(np.abs(g_ref[path])) + 1e-6 * WD * np.max(np.abs(p0))
      np.testing.assert_allclose(g, g_ref[path], rtol=0, atol=atol, err_msg=f'gradient {what}')
    # Updates, allowed the change of Adam's direction over this tensor's gradient error.
    g_dec = g_ref[path] + WD * p0
    max_err = np.max(np.abs(g - g_ref[path]))
    u = _adam_direction(g_dec)
    sens = LR * np.maximum(
        np.abs(_adam_direction(g_dec + max_err) - u), np.abs(_adam_direction(g_dec - max_err) - u)
    )
    sure += np.sum(sens < 1e-2 * LR)
    entries += sens.size
    t0 = _get(teacher0, path[1:])
    for kind, actual, desired, slack, before in (
        ('updated', _get(new.params[name], path[1:]), net, sens, p0),
        ('EMA teacher', _get(new.teacher_params[name], path[1:]), ema, (1 - alpha) * sens, t0),
    ):
      desired = from_torch(torch_tensor(desired, path, backbone))
      diff = np.abs(actual - desired)
      allowed = slack + PARAM_ATOL * np.max(np.abs(before)) + ADAM_ATOL
      bad = diff > allowed
      assert not bad.any(), (
          f'{kind} {what}: {bad.sum()} of {bad.size} entries differ, worst by '
          f'{float(np.max(diff - allowed)):.3g} more than allowed'
      )
    assert np.max(np.abs(_get(new.params[name], path[1:]) - p0)) > 0.5 * LR, what  # it moved
  assert np.sqrt(net_err) <= GRAD_NET_RTOL * net_norm, f'{name}: gradient off by {net_err**0.5:.3g}'
  assert sure >= MIN_SURE * entries, f'{name}: only {sure} of {entries} updates checked tightly'


CASES = [
    ('resnet', 'mmt', 'bnneck'),
    ('resnet', 'abmt', 'bnneck'),
    pytest.param('osnet', 'mmt', 'bnneck', marks=pytest.mark.slow),
    pytest.param('osnet', 'abmt', 'bnneck', marks=pytest.mark.slow),
    pytest.param('mobilenetv2', 'mmt', 'bnneck', marks=pytest.mark.slow),
    pytest.param('mobilenetv2', 'abmt', 'bnneck', marks=pytest.mark.slow),
    # the older OSNet mapping: triplets read the fc's Linear output, the classifier its embedding
    pytest.param('osnet', 'mmt', 'fc_pre_bn', marks=pytest.mark.slow),
]


@pytest.mark.parametrize('backbone,method_name,head', CASES)
def test_one_step_equals_the_pytorch_reference(backbone, method_name, head):
  """Each case compiles one jaxreid step: on a 2-core CPU about 45 s for ResNet-50, 55-70 s for
  MobileNetV2 and 90-120 s for OSNet (those two are marked slow)."""
  method = methods_lib.get(method_name)
  model = models.create_model(
      arch=method.arch, num_classes=NUM_CLASSES, head=head, **BACKBONES[backbone]
  )
  students = [_variables(model, seed) for seed in range(method.num_students)]
  teachers = [_variables(model, 10 + seed) for seed in range(method.num_students)]
  new, metrics = _jax_step(method, model, students, teachers)
  nets, emas, terms, grads = torch_step(backbone, method.arch, head, students, teachers)

  # Every loss term, and no other (e.g. no hard triplet in ABMT).
  assert {k for k in metrics if k.startswith('loss/')} == {f'loss/{k}' for k in terms}
  for name, value in terms.items():
    np.testing.assert_allclose(metrics[f'loss/{name}'], value, rtol=LOSS_RTOL, err_msg=name)

  mu = new.opt_state[1].mu  # optax.chain(add_decayed_weights, scale_by_adam, scale_by_lr)
  for i, name in enumerate(method.networks):
    _check_network(
        name,
        students[i]['params'],
        teachers[i]['params'],
        new,
        mu[name],
        nets[i],
        emas[i],
        grads[i],
        backbone,
    )
    # Running statistics of the student and of its teacher (never averaged).
    for stats, net in ((new.batch_stats[name], nets[i]), (new.teacher_batch_stats[name], emas[i])):
      for path, value in traverse_util.flatten_dict({'batch_stats': stats}).items():
        desired = from_torch(torch_tensor(net, path, backbone))
        atol = STATS_RTOL * np.max(np.abs(desired))
        np.testing.assert_allclose(value, desired, rtol=0, atol=atol, err_msg=f'{name} {path}')
