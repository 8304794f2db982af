"""Every training method in one place: its networks and views, its architecture, its loss.

A `Method` says how many student networks it trains, whether each has an EMA teacher, which
independently augmented view of the batch every network sees, which model architecture it needs
and its loss function with that function's default weights. `METHODS` holds the five methods; the
runner, the benchmark and the tests all build a training step from it with
`jaxreid.train.make_train_step`.

A loss function is plain: `loss(outputs, labels, weights) -> (total, metrics)`, where
* `outputs` is the flat dict of network outputs of one step: `student1/features`,
  `student1/logits`, `teacher2/logits`, ... and, for ABMT's two-branch network,
  `student1/avg/features`, `teacher1/max/logits`, ... (features are pre-neck, float32);
* `labels` is a `Labels(ids, class_mask)`: (B,) int32 pseudo / source labels (< 0 = noise) and
  the (C,) bool mask of active classifier rows (docs/reference.md section 3);
* `weights` is a dict of Python floats (static under `jit`): a term of weight 0 is never computed.
The metrics hold `loss/<term>` (unweighted), `weighted/<term>` (weighted: what the gradient
diagnostics split the gradient by), `loss/total`, and for the triplet losses `prec/<network>`
(triplet precision of that network's features) and `anchors`.

Weights: every term has a name and a group (`ce`, `tri`, `soft_ce`, `soft_tri`); its weight is
`weights[term name]` when set, else `weights[group]` (MMT derives its groups from its two
parameters when they are not set). Every weight name is a `config.loss` field, so each ablation of
the papers is a one-line override, e.g. `--config.loss.soft_tri=0` (ABMT without L_stri).

Research on the loss: `config.loss.function='package.module:function'` replaces the method's loss
by any function with the same signature (it receives every `config.loss` field as its weights,
including new ones a config file adds); adding a term is a function that calls the method's own
loss and adds to its total (README, "Your own loss"; `experiments/extra_loss_example.py`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any
from typing import Callable
from typing import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxreid import losses
from jaxreid.errors import ConfigError


class Labels(NamedTuple):
  """The labels a loss reads: per-sample ids and the classifier's active rows."""

  ids: jax.Array  # (B,) int32; < 0 = noise, excluded everywhere
  class_mask: jax.Array  # (C,) bool


# Metrics prefix of a weighted term w_t L_t: the gradient diagnostics split the total by these
# (`jaxreid.train.make_gradient_shares`); a loss of your own names its added terms the same way.
WEIGHTED = 'weighted/'

LossFn = Callable[[Mapping[str, jax.Array], Labels, Mapping[str, float]], tuple]


# ----------------------------------------------------------------------------------------------
# Building blocks


def weighted_sum(
    terms: Mapping[str, tuple[str, Callable[[], jax.Array]]], weights: Mapping[str, Any]
) -> tuple[jax.Array, dict]:
  """sum_t w_t L_t over `terms` {name: (group, thunk)}; w_t = weights[name] if set, else
  weights[group]. Terms of weight 0 are not evaluated. Returns (total float32, metrics): the
  metrics hold `loss/<term>` (L_t) and `weighted/<term>` (w_t L_t, which the gradient
  diagnostics read and the training step leaves out of its logged metrics)."""
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, (group, value_fn) in terms.items():
    weight = weights.get(name)
    weight = float(weights[group] if weight is None else weight)
    if weight == 0.0:
      continue
    value = jnp.asarray(value_fn())
    if value.shape != ():
      raise ValueError(f'loss term {name!r} returned shape {value.shape}, expected a scalar')
    metrics[f'loss/{name}'] = value
    metrics[f'{WEIGHTED}{name}'] = weight * value.astype(jnp.float32)
    total = total + metrics[f'{WEIGHTED}{name}']
  metrics['loss/total'] = total
  return total, metrics


def triplet_metrics(outputs: Mapping[str, jax.Array], labels: Labels, networks) -> dict:
  """Triplet precision of each network's features and the number of anchors (for logging)."""
  metrics = {
      f'prec/{n}': losses.triplet_precision(outputs[f'{n}/features'], labels.ids) for n in networks
  }
  metrics['anchors'] = losses.num_triplet_anchors(labels.ids)
  return metrics


def _ce(outputs, labels, net, epsilon):
  return lambda: losses.cross_entropy_label_smooth(
      outputs[f'{net}/logits'], labels.ids, labels.class_mask, epsilon
  )


def _tri(outputs, labels, net):
  return lambda: losses.softmax_triplet(outputs[f'{net}/features'], labels.ids)


def _soft_ce(outputs, labels, net, teacher):
  return lambda: losses.soft_entropy(
      outputs[f'{net}/logits'], outputs[f'{teacher}/logits'], labels.class_mask
  )


def _soft_tri(outputs, labels, net, teacher):
  return lambda: losses.soft_softmax_triplet(
      outputs[f'{net}/features'], outputs[f'{teacher}/features'], labels.ids
  )


def _with_triplet_metrics(total_metrics, outputs, labels, networks):
  total, metrics = total_metrics
  return total, {**metrics, **triplet_metrics(outputs, labels, networks)}


# ----------------------------------------------------------------------------------------------
# The loss functions (docs/reference.md section 3)


def supervised_loss(outputs, labels, weights):
  """Source pre-training and the clustering baseline: CE + softmax triplet on student 1.

  The two-branch ABMT network averages each over its branches (ABMT's pre-trainer); term names
  then carry the branch ('ce_avg', 'tri_max', ...)."""
  eps = weights['label_smoothing']
  if 'student1/logits' in outputs:
    nets = {'': 'student1'}
  else:
    nets = {'_avg': 'student1/avg', '_max': 'student1/max'}
  terms = {}
  for suffix, net in nets.items():
    terms[f'ce{suffix}'] = ('ce', _ce(outputs, labels, net, eps))
    terms[f'tri{suffix}'] = ('tri', _tri(outputs, labels, net))
  # Group weights are per network: split over the branches (a term named explicitly is not).
  w = {**weights, 'ce': weights['ce'] / len(nets), 'tri': weights['tri'] / len(nets)}
  return _with_triplet_metrics(weighted_sum(terms, w), outputs, labels, nets.values())


def mmt_group_weights(weights) -> dict:
  """MMT's parameterisation (its reference code): hard terms weigh 1 - beta, soft terms beta,
  with beta_ce = soft_ce_weight, beta_tri = soft_tri_weight; a group weight set explicitly
  (e.g. tri=0, MMT without the hard triplet) takes precedence."""
  derived = {
      'ce': 1.0 - weights['soft_ce_weight'],
      'tri': 1.0 - weights['soft_tri_weight'],
      'soft_ce': weights['soft_ce_weight'],
      'soft_tri': weights['soft_tri_weight'],
  }
  return {**weights, **{k: v if weights.get(k) is None else weights[k] for k, v in derived.items()}}


def mmt_loss(outputs, labels, weights):
  """MMT (Ge et al. 2020, eq. 9 with the reference's weighting), summed over both networks:

    sum_{(i,j) in (1,2),(2,1)}  (1 - b_ce) CE(z_i, y) + (1 - b_tri) L_tri(f_i, y)
                               + b_ce SoftEntropy(z_i, z~_j) + b_tri L_stri(f_i, f~_j, y).

  Terms 'ce1', 'tri1', 'soft_ce1', 'soft_tri1' (student 1 supervised by teacher 2), then '...2'."""
  w = mmt_group_weights(weights)
  eps = w['label_smoothing']
  terms = {}
  for i, j in ((1, 2), (2, 1)):
    s, t = f'student{i}', f'teacher{j}'
    terms[f'ce{i}'] = ('ce', _ce(outputs, labels, s, eps))
    terms[f'tri{i}'] = ('tri', _tri(outputs, labels, s))
    terms[f'soft_ce{i}'] = ('soft_ce', _soft_ce(outputs, labels, s, t))
    terms[f'soft_tri{i}'] = ('soft_tri', _soft_tri(outputs, labels, s, t))
  return _with_triplet_metrics(weighted_sum(terms, w), outputs, labels, ('student1', 'student2'))


def mean_teacher_loss(outputs, labels, weights):
  """The mean-teacher baseline: MMT's four terms with student 1 supervised by its own teacher."""
  w = mmt_group_weights(weights)
  s, t = 'student1', 'teacher1'
  terms = {
      'ce': ('ce', _ce(outputs, labels, s, w['label_smoothing'])),
      'tri': ('tri', _tri(outputs, labels, s)),
      'soft_ce': ('soft_ce', _soft_ce(outputs, labels, s, t)),
      'soft_tri': ('soft_tri', _soft_tri(outputs, labels, s, t)),
  }
  return _with_triplet_metrics(weighted_sum(terms, w), outputs, labels, (s,))


def abmt_loss(outputs, labels, weights):
  """ABMT (Chen et al. 2021, eq. 8): L = (L_ce + L_sce) / 2 + L_stri with

    L_ce   = [CE(z_avg) + CE(z_max)] / 2,
    L_sce  = [SoftEntropy(z_avg, z~_max) + SoftEntropy(z_max, z~_avg)] / 2,
    L_stri = [L_stri(f_avg, f~_max) + L_stri(f_max, f~_avg)] / 2,

  i.e. per-branch weights ce 0.25, soft_ce 0.25, soft_tri 0.5; each branch is supervised by the
  teacher's *other* branch. A hard-label triplet pair ('tri_avg', 'tri_max', group 'tri') is not
  in ABMT and weighs 0 unless set."""
  eps = weights['label_smoothing']
  s, t = 'student1', 'teacher1'
  terms = {}
  for b, other in (('avg', 'max'), ('max', 'avg')):
    terms[f'ce_{b}'] = ('ce', _ce(outputs, labels, f'{s}/{b}', eps))
    terms[f'soft_ce_{b}'] = ('soft_ce', _soft_ce(outputs, labels, f'{s}/{b}', f'{t}/{other}'))
    terms[f'soft_tri_{b}'] = ('soft_tri', _soft_tri(outputs, labels, f'{s}/{b}', f'{t}/{other}'))
    terms[f'tri_{b}'] = ('tri', _tri(outputs, labels, f'{s}/{b}'))
  return _with_triplet_metrics(
      weighted_sum(terms, weights), outputs, labels, (f'{s}/avg', f'{s}/max')
  )


# ----------------------------------------------------------------------------------------------
# The methods


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method.

  `student_views[i]` / `teacher_views[i]` index the independently augmented views of the batch.
  MMT: net i and its teacher see view i; its soft losses pair student i with teacher j != i, so
  the two sides of every soft term saw different augmentations. ABMT: one view for everything.
  `arch` is the model architecture the loss reads ('resnet': one embedding per network,
  'abmt': the two-branch network; None: either). `weights` are the defaults of every weight name
  the loss accepts (None = derived, see the loss's docstring).
  """

  name: str
  num_students: int
  ema: bool
  student_views: tuple[int, ...]
  teacher_views: tuple[int, ...]
  arch: str | None
  loss: LossFn
  weights: Mapping[str, float | None]

  @property
  def num_views(self) -> int:
    return max(self.student_views + self.teacher_views) + 1

  @property
  def networks(self) -> tuple[str, ...]:
    """Names of the student networks in the train state ('net1', 'net2')."""
    return tuple(f'net{i + 1}' for i in range(self.num_students))


def _names(groups: dict, terms: tuple = (), **params) -> dict:
  """Default weights: method parameters, then group weights, then per-term overrides (unset)."""
  return {'label_smoothing': 0.1, **params, **groups, **{t: None for t in terms}}


_MMT_TERMS = tuple(f'{g}{i}' for i in (1, 2) for g in ('ce', 'tri', 'soft_ce', 'soft_tri'))
_ABMT_TERMS = tuple(
    f'{g}_{b}' for b in ('avg', 'max') for g in ('ce', 'soft_ce', 'soft_tri', 'tri')
)
_MMT_GROUPS = {'ce': None, 'tri': None, 'soft_ce': None, 'soft_tri': None}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name='pretrain',
            num_students=1,
            ema=False,
            student_views=(0,),
            teacher_views=(),
            arch=None,
            loss=supervised_loss,
            weights=_names({'ce': 1.0, 'tri': 1.0}, ('ce_avg', 'tri_avg', 'ce_max', 'tri_max')),
        ),
        # MMT with both soft weights 0 on one network: CE + softmax triplet, no teacher.
        Method(
            name='cluster_baseline',
            num_students=1,
            ema=False,
            student_views=(0,),
            teacher_views=(),
            arch='resnet',
            loss=supervised_loss,
            weights=_names({'ce': 1.0, 'tri': 1.0}),
        ),
        # One network supervised by its own EMA teacher. The teacher sees a second view, as MMT's
        # teachers do (the references are silent on the baseline's views).
        Method(
            name='mean_teacher',
            num_students=1,
            ema=True,
            student_views=(0,),
            teacher_views=(1,),
            arch='resnet',
            loss=mean_teacher_loss,
            weights=_names(_MMT_GROUPS, soft_ce_weight=0.5, soft_tri_weight=0.8),
        ),
        Method(
            name='mmt',
            num_students=2,
            ema=True,
            student_views=(0, 1),
            teacher_views=(0, 1),
            arch='resnet',
            loss=mmt_loss,
            weights=_names(_MMT_GROUPS, _MMT_TERMS, soft_ce_weight=0.5, soft_tri_weight=0.8),
        ),
        Method(
            name='abmt',
            num_students=1,
            ema=True,
            student_views=(0,),
            teacher_views=(0,),
            arch='abmt',
            loss=abmt_loss,
            weights=_names({'ce': 0.25, 'soft_ce': 0.25, 'soft_tri': 0.5, 'tri': 0.0}, _ABMT_TERMS),
        ),
    )
}


def get(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; expected one of {sorted(METHODS)}')
  return METHODS[name]


# ----------------------------------------------------------------------------------------------
# From a config


def _import_function(spec: str) -> Callable:
  """'package.module:function' -> the function."""
  module, sep, attr = spec.partition(':')
  if not sep or not module or not attr:
    raise ConfigError(
        f"config.loss.function: {spec!r} must be 'package.module:function' (importable from "
        'the working directory or the installed packages)'
    )
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'config.loss.function: cannot import {spec!r}: {e}') from None
  if not callable(fn):
    raise ConfigError(f'config.loss.function: {spec!r} is not callable')
  return fn


def resolve_weights(method: Method, loss_config: Mapping[str, Any] | None, *, custom=False) -> dict:
  """The method's default weights updated by the set (not None) fields of `loss_config`.

  A name the method does not know is an error naming it, unless the loss function is a custom
  one (`custom`), which receives every field."""
  given = {k: v for k, v in dict(loss_config or {}).items() if k != 'function' and v is not None}
  unknown = sorted(set(given) - set(method.weights))
  if unknown and not custom:
    raise ConfigError(
        f'config.loss: unknown weight name(s) {unknown} for method {method.name!r}; allowed: '
        f'{sorted(method.weights)}'
    )
  weights = dict(method.weights)
  for key, value in given.items():
    if key in method.weights or isinstance(value, (int, float)):
      try:
        value = float(value)
      except (TypeError, ValueError):
        raise ConfigError(f'config.loss.{key}: must be a number, got {value!r}') from None
      if not math.isfinite(value):
        raise ConfigError(f'config.loss.{key}: must be finite, got {value!r}')
    weights[key] = value
  return weights


def objective(method: Method, loss_config: Mapping[str, Any] | None = None) -> Callable:
  """`(outputs, labels) -> (total, metrics)`: the method's loss (or `loss_config['function']`)
  with its weights bound (`resolve_weights`)."""
  loss_config = dict(loss_config or {})
  spec = loss_config.get('function') or ''
  fn = _import_function(spec) if spec else method.loss
  weights = resolve_weights(method, loss_config, custom=bool(spec))

  def bound(outputs, labels):
    return fn(outputs, labels, weights)

  return bound


def from_config(config) -> tuple[Method, Callable]:
  """The configured method (teacher views overridden by `config.train.teacher_views` if set) and
  its objective from `config.loss`."""
  method = get(config.method)
  views = tuple(config.train.get('teacher_views') or ())
  if views:
    method = dataclasses.replace(method, teacher_views=views)
  loss_config = config.loss.to_dict() if hasattr(config.loss, 'to_dict') else config.loss
  return method, objective(method, loss_config)
