"""Training objectives as data: weighted terms over named network outputs.

An objective is a tuple of `Term`s. Each term names a loss function of the registry `LOSSES`, a
weight, and where each argument of that function comes from: `inputs` maps argument names to keys
of the flat dict of network outputs that the trainer produces (`OUTPUT_KEYS`), `kwargs` holds static
keyword arguments. `compute_objective(terms, outputs)` evaluates them; the trainer never branches on
the method, and every ablation of the MMT / ABMT papers is a change of weights (a weight of 0 drops
the term, so it is not computed at all).

Method formulas (docs/reference.md section 3), with the weight names accepted by `build_objective`:

* 'pretrain': ce + tri on student1. Weights: 'ce' (1.0), 'tri' (1.0).
* 'mmt': for (i, j) in (1, 2), (2, 1)  (summed over both networks, as the reference does):
      (1 - soft_ce_weight) CE(z_i, y) + (1 - soft_tri_weight) SoftmaxTriplet(f_i, y)
      + soft_ce_weight SoftEntropy(z_i, z~_j) + soft_tri_weight SoftSoftmaxTriplet(f_i, f~_j, y)
  Terms 'ce1', 'tri1', 'soft_ce1', 'soft_tri1', 'ce2', 'tri2', 'soft_ce2', 'soft_tri2' ('soft_ce1'
  is student 1 supervised by teacher 2). Weights: 'soft_ce_weight' (0.5), 'soft_tri_weight' (0.8)
  (the reference's parameterisation), then optionally group weights 'ce', 'tri', 'soft_ce',
  'soft_tri' (override the derived weight of both networks' terms) and term names (override one
  term). E.g. MMT without the hard triplet: {'tri': 0}; without soft entropy: {'soft_ce_weight': 0}.
* 'mean_teacher': the same four terms with student1 supervised by its own teacher1; terms 'ce',
  'tri', 'soft_ce', 'soft_tri'; same weight names as 'mmt'.
* 'cluster_baseline': the MMT formula with both soft weights 0 on one network: CE + SoftmaxTriplet
  on student1. Terms / weights 'ce', 'tri' (1.0); 'soft_ce_weight' / 'soft_tri_weight' are accepted
  only as 0 (there is no teacher; use 'mean_teacher').
* 'abmt': L = (L_ce + L_sce) / 2 + L_stri with
      L_ce   = [CE(z_avg) + CE(z_max)] / 2,
      L_sce  = [SoftEntropy(z_avg, z~_max) + SoftEntropy(z_max, z~_avg)] / 2,
      L_stri = [SoftSoftmaxTriplet(f_avg, f~_max) + SoftSoftmaxTriplet(f_max, f~_avg)] / 2,
  i.e. terms 'ce_avg', 'ce_max' (0.25 each), 'soft_ce_avg', 'soft_ce_max' (0.25 each),
  'soft_tri_avg', 'soft_tri_max' (0.5 each); 'soft_ce_avg' is the avg branch supervised by the
  teacher's max branch. Group weights 'ce', 'soft_ce', 'soft_tri' set both terms of a pair: the
  paper's ablations are {'ce': 0}, {'soft_ce': 0}, {'soft_tri': 0}. A hard-label triplet pair
  'tri_avg', 'tri_max' (group 'tri') exists with weight 0 (not in ABMT; dropped unless set).

Weight precedence: term name > group name > value derived from the method parameters.

Extra terms: `build_objective(..., extra_terms=[dict(name=..., loss=..., weight=..., inputs=...,
kwargs=...)])` or, from a config, `objective_from_config(method, config.loss)` with
`config.loss.extra_terms` a list of such dicts or a dict {name: dict(loss=..., ...)}. New loss
functions are added with `register_loss(name, fn)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Mapping

import jax.numpy as jnp

from jaxreid import losses as _losses

__all__ = [
    'Term',
    'LOSSES',
    'TRIPLET_LOSSES',
    'OUTPUT_KEYS',
    'METHODS',
    'register_loss',
    'register_output_key',
    'build_objective',
    'compute_objective',
    'objective_from_config',
    'required_keys',
    'weight_names',
]


# ----------------------------------------------------------------------------------------------
# Registry of loss functions.

LOSSES: dict[str, Callable[..., Any]] = {
    'cross_entropy_label_smooth': _losses.cross_entropy_label_smooth,
    'soft_entropy': _losses.soft_entropy,
    'softmax_triplet': _losses.softmax_triplet,
    'soft_softmax_triplet': _losses.soft_softmax_triplet,
    'margin_triplet': _losses.margin_triplet,
}

# Losses that mine triplets on `features` / `labels`: their terms also log `prec/<term>`
# (triplet precision) and `anchors/<term>` (number of anchors used).
TRIPLET_LOSSES: set[str] = {'softmax_triplet', 'soft_softmax_triplet', 'margin_triplet'}


def register_loss(
    name: str, fn: Callable[..., Any], *, triplet: bool = False, overwrite: bool = False
) -> Callable[..., Any]:
  """Adds `fn` to `LOSSES` under `name` (returns `fn`, so it can be used as a decorator factory).

  `fn` must be a pure, jit-safe function of arrays returning a scalar. With `triplet=True` it must
  take `features` and `labels` arguments, and its terms also log triplet precision.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'loss name must be a non-empty string, got {name!r}')
  if not callable(fn):
    raise TypeError(f'loss {name!r}: {fn!r} is not callable')
  if name in LOSSES and not overwrite:
    raise ValueError(f'loss {name!r} is already registered (pass overwrite=True to replace it)')
  if triplet:
    params = _parameters(fn)
    if params is not None and not {'features', 'labels'} <= set(params):
      raise ValueError(f'triplet loss {name!r} must take `features` and `labels` arguments')
  LOSSES[name] = fn
  if triplet:
    TRIPLET_LOSSES.add(name)
  else:
    TRIPLET_LOSSES.discard(name)
  return fn


# ----------------------------------------------------------------------------------------------
# The documented network outputs (the trainer produces exactly these keys).


def _output_keys() -> dict[str, str]:
  keys = {
      'labels': '(B,) int32 pseudo / source labels; < 0 is noise',
      'class_mask': '(C,) bool, active classes (clusters) among the classifier rows',
  }
  for net in ('student1', 'teacher1', 'student2', 'teacher2'):
    role = 'EMA teacher' if net.startswith('teacher') else 'student'
    keys[f'{net}/features'] = f'(B, D) pre-BN features of {role} {net[-1]}'
    keys[f'{net}/logits'] = f'(B, C) logits of {role} {net[-1]}'
  for net in ('student1', 'teacher1'):
    role = 'EMA teacher' if net.startswith('teacher') else 'student'
    for branch, pool in (('avg', 'average'), ('max', 'max')):
      keys[f'{net}/{branch}/features'] = f'(B, D) pre-BN features, ABMT {role} {pool}-pool branch'
      keys[f'{net}/{branch}/logits'] = f'(B, C) logits, ABMT {role} {pool}-pool branch'
  return keys


OUTPUT_KEYS: dict[str, str] = _output_keys()  # key -> description


def register_output_key(key: str, description: str = '') -> None:
  """Documents a new network output key so that terms may use it (the trainer must produce it)."""
  if not isinstance(key, str) or not key:
    raise ValueError(f'output key must be a non-empty string, got {key!r}')
  OUTPUT_KEYS[key] = description


# ----------------------------------------------------------------------------------------------
# Terms.


class _FrozenMapping(Mapping):
  """A small immutable, hashable mapping (so Terms are hashable, e.g. as jit static arguments)."""

  __slots__ = ('_data',)

  def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()):
    object.__setattr__(self, '_data', dict(data))

  def __getitem__(self, key):
    return self._data[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._data)

  def __len__(self) -> int:
    return len(self._data)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._data.items())))

  def __eq__(self, other) -> bool:
    return isinstance(other, Mapping) and dict(self._data) == dict(other.items())

  def __repr__(self) -> str:
    return repr(self._data)

  def __setattr__(self, name, value):
    raise AttributeError('immutable mapping')


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss term.

  Attributes:
    name: unique name in its objective; metrics are `loss/<name>` (unweighted value).
    loss: key of `LOSSES`.
    weight: float multiplier in the total.
    inputs: {argument name of the loss function: key of the outputs dict}.
    kwargs: static keyword arguments passed to the loss function (e.g. {'margin': 0.3}).
  """

  name: str
  loss: str
  weight: float
  inputs: Mapping[str, str]
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, 'weight', float(self.weight))
    object.__setattr__(self, 'inputs', _FrozenMapping(self.inputs))
    object.__setattr__(self, 'kwargs', _FrozenMapping(self.kwargs or {}))

  @classmethod
  def from_dict(cls, spec: Mapping[str, Any], name: str | None = None) -> 'Term':
    """Builds a Term from a dict (e.g. a config entry); `name` fills in a missing 'name'."""
    spec = _plain(spec)
    if not isinstance(spec, dict):
      raise TypeError(f'a term must be given as a dict, got {type(spec).__name__}: {spec!r}')
    spec = dict(spec)
    if name is not None:
      if 'name' in spec and spec['name'] != name:
        raise ValueError(f'term {name!r} has a different name field {spec["name"]!r}')
      spec['name'] = name
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
      raise ValueError(
          f'term {spec.get("name", "?")!r}: unknown field(s) {unknown}; '
          f'expected {sorted(fields)}'
      )
    missing = sorted({'name', 'loss', 'weight', 'inputs'} - set(spec))
    if missing:
      raise ValueError(f'term {spec.get("name", "?")!r}: missing field(s) {missing}')
    return cls(**spec)


def _plain(obj: Any) -> Any:
  """ConfigDict / FrozenConfigDict / Mapping / list -> plain dicts and lists (recursively)."""
  if hasattr(obj, 'to_dict') and callable(obj.to_dict):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {k: _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  return obj


def _parameters(fn) -> dict[str, inspect.Parameter] | None:
  """The named parameters of `fn`, or None when it takes **kwargs (anything goes)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return None
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return None
  return {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _validate_term(term: Term) -> None:
  if not isinstance(term.name, str) or not term.name:
    raise ValueError(f'term name must be a non-empty string, got {term.name!r}')
  if term.loss not in LOSSES:
    raise ValueError(
        f'term {term.name!r}: unknown loss {term.loss!r}; registered losses: '
        f'{sorted(LOSSES)} (add one with register_loss)'
    )
  if not math.isfinite(term.weight):
    raise ValueError(f'term {term.name!r}: weight must be finite, got {term.weight}')
  for arg, key in term.inputs.items():
    if not isinstance(key, str) or key not in OUTPUT_KEYS:
      raise ValueError(
          f'term {term.name!r}: input {arg!r} reads output key {key!r}, which is not '
          f'a documented network output; documented keys: {sorted(OUTPUT_KEYS)} '
          f'(add one with register_output_key)'
      )
  overlap = sorted(set(term.inputs) & set(term.kwargs))
  if overlap:
    raise ValueError(f'term {term.name!r}: argument(s) {overlap} given both in inputs and kwargs')
  params = _parameters(LOSSES[term.loss])
  if params is not None:
    given = set(term.inputs) | set(term.kwargs)
    unknown = sorted(given - set(params))
    if unknown:
      raise ValueError(
          f'term {term.name!r}: loss {term.loss!r} has no argument(s) {unknown}; its '
          f'arguments are {list(params)}'
      )
    missing = sorted(
        n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given
    )
    if missing:
      raise ValueError(
          f'term {term.name!r}: loss {term.loss!r} needs argument(s) {missing} '
          f'(map them in inputs to output keys, or give them in kwargs)'
      )
  if term.loss in TRIPLET_LOSSES and not {'features', 'labels'} <= set(term.inputs):
    raise ValueError(
        f'term {term.name!r}: triplet loss {term.loss!r} must read `features` and '
        f'`labels` from the outputs'
    )


# ----------------------------------------------------------------------------------------------
# Method definitions.


def _ce(name, net, weight, epsilon):
  kwargs = {} if epsilon is None else {'epsilon': float(epsilon)}
  return Term(
      name,
      'cross_entropy_label_smooth',
      weight,
      {'logits': f'{net}/logits', 'labels': 'labels', 'class_mask': 'class_mask'},
      kwargs,
  )


def _tri(name, net, weight):
  return Term(name, 'softmax_triplet', weight, {'features': f'{net}/features', 'labels': 'labels'})


def _soft_ce(name, net, teacher, weight):
  return Term(
      name,
      'soft_entropy',
      weight,
      {
          'logits': f'{net}/logits',
          'teacher_logits': f'{teacher}/logits',
          'class_mask': 'class_mask',
      },
  )


def _soft_tri(name, net, teacher, weight):
  return Term(
      name,
      'soft_softmax_triplet',
      weight,
      {
          'features': f'{net}/features',
          'teacher_features': f'{teacher}/features',
          'labels': 'labels',
      },
  )


@dataclasses.dataclass(frozen=True)
class _Method:
  params: Mapping[str, float]  # parameter name -> default
  groups: Callable[[Mapping[str, float]], dict]  # params -> {group: default weight}
  terms: Callable[[float | None], list]  # epsilon -> [(group, Term with weight 0)]
  check: Callable[[Mapping[str, float]], None] = lambda params: None


def _mmt_groups(p):
  return {
      'ce': 1.0 - p['soft_ce_weight'],
      'tri': 1.0 - p['soft_tri_weight'],
      'soft_ce': p['soft_ce_weight'],
      'soft_tri': p['soft_tri_weight'],
  }


def _mmt_terms(eps):
  out = []
  for i, j in ((1, 2), (2, 1)):
    s, t = f'student{i}', f'teacher{j}'
    out += [
        ('ce', _ce(f'ce{i}', s, 0.0, eps)),
        ('tri', _tri(f'tri{i}', s, 0.0)),
        ('soft_ce', _soft_ce(f'soft_ce{i}', s, t, 0.0)),
        ('soft_tri', _soft_tri(f'soft_tri{i}', s, t, 0.0)),
    ]
  return out


def _mean_teacher_terms(eps):
  s, t = 'student1', 'teacher1'
  return [
      ('ce', _ce('ce', s, 0.0, eps)),
      ('tri', _tri('tri', s, 0.0)),
      ('soft_ce', _soft_ce('soft_ce', s, t, 0.0)),
      ('soft_tri', _soft_tri('soft_tri', s, t, 0.0)),
  ]


def _baseline_terms(eps):
  return [('ce', _ce('ce', 'student1', 0.0, eps)), ('tri', _tri('tri', 'student1', 0.0))]


def _baseline_check(p):
  nonzero = sorted(k for k, v in p.items() if v != 0)
  if nonzero:
    raise ValueError(
        f"method 'cluster_baseline' has no teacher, so {nonzero} must be 0; use "
        f"method 'mean_teacher' or 'mmt' for soft (teacher) terms"
    )


def _abmt_terms(eps):
  s, t = 'student1', 'teacher1'
  out = []
  for b, other in (('avg', 'max'), ('max', 'avg')):
    out += [
        ('ce', _ce(f'ce_{b}', f'{s}/{b}', 0.0, eps)),
        ('soft_ce', _soft_ce(f'soft_ce_{b}', f'{s}/{b}', f'{t}/{other}', 0.0)),
        ('soft_tri', _soft_tri(f'soft_tri_{b}', f'{s}/{b}', f'{t}/{other}', 0.0)),
        ('tri', _tri(f'tri_{b}', f'{s}/{b}', 0.0)),
    ]
  return out


_MMT_PARAMS = {'soft_ce_weight': 0.5, 'soft_tri_weight': 0.8}

METHODS: dict[str, _Method] = {
    'pretrain': _Method({}, lambda p: {'ce': 1.0, 'tri': 1.0}, _baseline_terms),
    'cluster_baseline': _Method(
        {'soft_ce_weight': 0.0, 'soft_tri_weight': 0.0},
        lambda p: {'ce': 1.0 - p['soft_ce_weight'], 'tri': 1.0 - p['soft_tri_weight']},
        _baseline_terms,
        _baseline_check,
    ),
    'mean_teacher': _Method(_MMT_PARAMS, _mmt_groups, _mean_teacher_terms),
    'mmt': _Method(_MMT_PARAMS, _mmt_groups, _mmt_terms),
    'abmt': _Method(
        {}, lambda p: {'ce': 0.25, 'soft_ce': 0.25, 'soft_tri': 0.5, 'tri': 0.0}, _abmt_terms
    ),
}

# Keys of config.loss that are not weights (see objective_from_config).
_RESERVED_CONFIG_KEYS = ('extra_terms', 'label_smoothing')


def _method(method: str) -> _Method:
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; expected one of {sorted(METHODS)}')
  return METHODS[method]


def weight_names(method: str) -> dict[str, float]:
  """All weight names `build_objective(method, weights)` accepts, with their default values."""
  spec = _method(method)
  params = dict(spec.params)
  groups = spec.groups(params)
  names = dict(params)
  names.update(groups)
  for group, term in spec.terms(None):
    names.setdefault(term.name, groups[group])
  return names


def build_objective(
    method: str,
    weights: Mapping[str, float] | None = None,
    extra_terms: Iterable[Term | Mapping[str, Any]] = (),
    *,
    label_smoothing: float = 0.1,
) -> tuple[Term, ...]:
  """The terms of `method`'s loss (module docstring), with weight-0 terms dropped.

  Args:
    method: 'pretrain', 'cluster_baseline', 'mean_teacher', 'mmt' or 'abmt'.
    weights: overrides by name: method parameters ('soft_ce_weight', 'soft_tri_weight'), group
      names ('ce', 'tri', 'soft_ce', 'soft_tri') or term names; see `weight_names(method)`.
      Unknown names raise ValueError naming the key.
    extra_terms: further `Term`s or dicts with fields name, loss, weight, inputs[, kwargs].
    label_smoothing: epsilon of the method's label-smoothing cross-entropy terms (reference 0.1).
  Returns:
    tuple of Terms, all with non-zero weight, validated: known losses, argument names that exist,
    output keys that are documented in `OUTPUT_KEYS`, unique names.
  """
  spec = _method(method)
  weights = dict(_plain(weights) or {})
  allowed = weight_names(method)
  for key in weights:
    if key not in allowed:
      raise ValueError(
          f'unknown weight name {key!r} for method {method!r}; allowed names: ' f'{sorted(allowed)}'
      )
  for key, value in weights.items():
    try:
      weights[key] = float(value)
    except (TypeError, ValueError):
      raise ValueError(f'weight {key!r} must be a number, got {value!r}') from None
    if not math.isfinite(weights[key]):
      raise ValueError(f'weight {key!r} must be finite, got {value!r}')
  params = {k: weights.get(k, v) for k, v in spec.params.items()}
  spec.check(params)
  groups = spec.groups(params)
  groups.update({k: v for k, v in weights.items() if k in groups})
  terms = []
  for group, term in spec.terms(label_smoothing):
    weight = weights.get(term.name, groups[group])
    terms.append(dataclasses.replace(term, weight=weight))
  for extra in extra_terms:
    terms.append(extra if isinstance(extra, Term) else Term.from_dict(extra))
  names = [t.name for t in terms]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f'duplicate term name(s) {duplicates} in objective {method!r}')
  for term in terms:
    _validate_term(term)
  return tuple(t for t in terms if t.weight != 0.0)


def objective_from_config(method: str, config: Mapping[str, Any] | Any | None) -> tuple[Term, ...]:
  """`build_objective` from a (ml_collections) config section such as `config.loss`.

  Every key is a weight name of `method` (see `weight_names`), except the reserved keys
  'extra_terms' (a list of term dicts, or a dict {term name: term dict without 'name'}) and
  'label_smoothing' (float). An unknown key raises ValueError naming it.
  """
  cfg = _plain(config) if config is not None else {}
  if not isinstance(cfg, dict):
    raise TypeError(f'loss config must be a mapping / ConfigDict, got {type(config).__name__}')
  cfg = dict(cfg)
  extra = cfg.pop('extra_terms', None)
  if extra is None:
    extra = []
  if isinstance(extra, dict):
    extra = [Term.from_dict(spec, name=name) for name, spec in extra.items()]
  elif isinstance(extra, list):
    extra = [Term.from_dict(spec) for spec in extra]
  else:
    raise TypeError(
        f'loss config key "extra_terms" must be a list of term dicts or a dict of '
        f'them keyed by name, got {type(extra).__name__}'
    )
  kwargs = {}
  if 'label_smoothing' in cfg:
    kwargs['label_smoothing'] = float(cfg.pop('label_smoothing'))
  allowed = weight_names(method)
  for key in cfg:
    if key not in allowed:
      raise ValueError(
          f'unknown loss config key {key!r} for method {method!r}: not a weight name '
          f'({sorted(allowed)}) nor one of {list(_RESERVED_CONFIG_KEYS)}'
      )
  return build_objective(method, cfg, extra, **kwargs)


def required_keys(terms: Iterable[Term]) -> frozenset[str]:
  """The output keys the terms read (the trainer can skip forward passes nobody needs)."""
  return frozenset(key for t in terms if t.weight != 0.0 for key in t.inputs.values())


def compute_objective(terms: Iterable[Term], outputs: Mapping[str, Any]):
  """Evaluates an objective. Pure and jit-safe (the terms are static Python data).

  Args:
    terms: from `build_objective` (terms of weight 0 are skipped).
    outputs: flat dict of network outputs keyed as in `OUTPUT_KEYS`.
  Returns:
    (total, metrics): total = sum_t weight_t * value_t (float32 scalar); metrics holds
    `loss/<name>` (unweighted value) per term, `loss/total`, and for triplet terms
    `prec/<name>` (triplet precision of the student features) and `anchors/<name>` (number of
    anchors used by the mining).
  Raises:
    KeyError naming the term and the key when an output is missing.
  """
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for term in terms:
    if term.weight == 0.0:
      continue
    if term.loss not in LOSSES:
      raise KeyError(f'term {term.name!r}: loss {term.loss!r} is not registered')
    args = {}
    for arg, key in term.inputs.items():
      if key not in outputs:
        raise KeyError(
            f'objective term {term.name!r} needs output {key!r} (argument {arg!r} of '
            f'{term.loss}); available outputs: {sorted(outputs)}'
        )
      args[arg] = outputs[key]
    value = jnp.asarray(LOSSES[term.loss](**args, **term.kwargs))
    if value.shape != ():
      raise ValueError(
          f'term {term.name!r}: loss {term.loss!r} returned shape {value.shape}, '
          f'expected a scalar'
      )
    metrics[f'loss/{term.name}'] = value
    total = total + term.weight * value.astype(jnp.float32)
    if term.loss in TRIPLET_LOSSES:
      metrics[f'prec/{term.name}'] = _losses.triplet_precision(args['features'], args['labels'])
      metrics[f'anchors/{term.name}'] = _losses.num_triplet_anchors(args['labels'])
  metrics['loss/total'] = total
  return total, metrics
