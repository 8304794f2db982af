"""What every experiment shares: every config field with its default, and the settings that a
method or a kind of task brings wherever it runs.

The defaults are the papers' hyper-parameters (docs/reference.md section 3) shrunk to the built-in
synthetic world and a small ResNet, so that a run with no arguments finishes on a 2-core CPU in
minutes. An experiment is one file beside this one (`configs/<method>.py` on the synthetic world,
`configs/<source>2<target>.py` on real data) that starts from `get_config(method)` and says what it
changes. Configs import nothing from `jaxreid`: each method's loss weights live in
`jaxreid/methods.py`, and `config.loss` only names them, unset, so that any of them can be set from
the command line.
"""

import os

import ml_collections

METHODS = ('pretrain', 'cluster_baseline', 'mean_teacher', 'mmt', 'abmt')

# The real sets and published weights beside the repository (never copied into it), found from
# the repository whatever the current directory.
_SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared')
SHARED_DATA = os.environ.get('JAXREID_SHARED_DATA', os.path.normpath(os.path.join(_SHARED, 'data')))
SHARED_WEIGHTS = os.environ.get(
    'JAXREID_SHARED_WEIGHTS', os.path.normpath(os.path.join(_SHARED, 'weights'))
)

# The weight names each method's loss accepts (their defaults: jaxreid/methods.py, tested equal).
_GROUPS = ('ce', 'tri', 'soft_ce', 'soft_tri')
LOSS_WEIGHTS = {
    'pretrain': ('label_smoothing', 'ce', 'tri', 'ce_avg', 'tri_avg', 'ce_max', 'tri_max'),
    'cluster_baseline': ('label_smoothing', 'ce', 'tri'),
    'mean_teacher': ('label_smoothing', 'soft_ce_weight', 'soft_tri_weight', *_GROUPS),
    'mmt': (
        ('label_smoothing', 'soft_ce_weight', 'soft_tri_weight', *_GROUPS)
        + tuple(f'{g}{i}' for i in (1, 2) for g in _GROUPS)
    ),
    'abmt': (
        ('label_smoothing', 'ce', 'soft_ce', 'soft_tri', 'tri')
        + tuple(f'{g}_{b}' for b in ('avg', 'max') for g in ('ce', 'soft_ce', 'soft_tri', 'tri'))
    ),
}

# DBSCAN's rho is the share of closest pairs whose mean distance is eps. The papers' values
# (1.6e-3 MMT, 2e-3 ABMT) were set for Market-1501, where same-identity pairs are about
# (images per identity) / N = 17.2 / 12,936 of all pairs; other sets scale rho by their own share
# over Market's (an expected identity size, not labels).
MARKET_PAIR_SHARE = 17.2 / 12936


def rho_scale(images_per_identity: float, num_images: int) -> float:
  """How much to scale the papers' rho for a target set of `num_images` with that identity
  size (1 for Market-1501 itself)."""
  return (images_per_identity / num_images) / MARKET_PAIR_SHARE


# The synthetic target domain: 10.1 images per identity of 1,010 (the papers' rho left most of
# its images as noise; docs/reference.md, "Where jaxreid departs").
SYNTHETIC_RHO_SCALE = rho_scale(10.1, 1010)


def get_config(method: str = 'mmt') -> ml_collections.ConfigDict:
  """Every field, with the synthetic world's defaults and `method`'s own settings."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; choose one of {", ".join(METHODS)}')
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 1

  c.data = ml_collections.ConfigDict(
      dict(
          source='synthetic_a',
          target='synthetic_b',
          root='',  # parent folder holding <name>/ for each real data set
          source_root='',
          target_root='',
          # A labelled set in Market layout to evaluate on when the target has no labels
          # (data.target='folder'); '' = no evaluation.
          val_root='',
          height=64,
          width=32,
          batch_size=32,
          num_instances=4,
          # Random-crop padding in pixels: the reference's 10 at 256x128, scaled to 64x32 (10
          # pixels of a 32-pixel-wide crop shift it by a third of its width).
          crop_pad=2,
          eval_batch_size=256,
          # The built-in synthetic world (jaxreid.data.synthetic.WorldConfig), generated once.
          synthetic=ml_collections.ConfigDict(
              dict(
                  seed=0,
                  num_train_ids=100,
                  num_test_ids=250,
                  min_images=8,
                  max_images=12,
                  domain_gap=0.5,
              )
          ),
      )
  )

  # backbone: 'resnet' (depth, width, ibn), 'osnet_x1_0' .. 'osnet_x0_25', 'mobilenetv2'.
  c.model = ml_collections.ConfigDict(
      dict(
          arch='resnet',
          backbone='resnet',
          depth=18,
          width=16,
          ibn=False,
          stem_relu=None,
          last_stride=1,
          pooling='avg',
          # Which tensor each loss reads (jaxreid.models.HEADS, docs/reference.md section 1):
          # 'bnneck' (triplet losses the embedding, classifier and evaluation a BN neck behind
          # it) or, for OSNet only, 'fc_pre_bn' (triplet losses the fc's pre-BN Linear output).
          head='bnneck',
          dropout=0.0,
          dtype='float32',
          norm_group_size=0,
      )
  )

  c.init = ml_collections.ConfigDict(
      dict(
          # ImageNet or re-ID weights: a .msgpack (jaxreid-convert) or a PyTorch file
          # (torchvision / torchreid / MMT / ABMT state dict, converted on the fly); '' = random.
          pretrained='',
          checkpoints=('',),  # converted / exported source models; empty = pre-train here
          skip_pretrain=False,
      )
  )

  # Stage 1: supervised source pre-training (the papers: 80 x 100, lr 3.5e-4 from ImageNet
  # weights, warm-up 10, x0.1 at 40 and 70). From random initialisation 3.5e-4 underfits a CPU
  # budget (docs/reference.md, "Where jaxreid departs"), so the synthetic default uses 3e-3.
  c.pretrain = ml_collections.ConfigDict(
      dict(
          epochs=10,
          iters=30,
          lr=3e-3,
          warmup_epochs=2,
          milestones=(8,),
          erasing_prob=0.0,
          target_bn=True,
          eval_every=10,
          # The source models' seed (MMT's second network: seed + 1), fixed like the papers'
          # pre-trained source models, so that `seed` varies the adaptation only: a comparison
          # over seeds then measures adaptation, not which source models a seed happened to
          # train (experiments/results_synthetic.md). None = follow `seed` (the pretrain
          # method's default: there the run is the pre-training).
          seed=ml_collections.config_dict.placeholder(int),
      )
  )
  c.pretrain.seed = None if method == 'pretrain' else 1

  # Stage 2: adaptation (40 x 400 in the papers; constant lr, fresh Adam every epoch). The
  # papers' lr 3.5e-4 was set for 16,000 steps from ImageNet ResNet-50s; the synthetic default's
  # 300 steps of small networks from random initialisation use twice that (docs/reference.md,
  # "Where jaxreid departs"); every real task keeps 3.5e-4.
  c.train = ml_collections.ConfigDict(
      dict(
          epochs=10,
          iters=30,
          lr=7e-4,
          weight_decay=5e-4,
          ema_decay=0.999,
          erasing_prob=0.5,
          eval_every=5,
          log_every=0,
          select_best_on_test=False,
          # Coupling diagnostic every epoch (ABMT Fig. 4): one extra feature pass over the
          # target training images per student.
          coupling=True,
          # Every this many epochs (0 = never), each weighted loss term's share of the gradient
          # on the epoch's first batch (jaxreid.train.make_gradient_shares): in metrics.jsonl as
          # grad_share/<term>, in the epoch line and the plots; a term under 1% is warned about.
          gradient_shares_every=1,
          # Which augmented view each EMA teacher sees; () = the method's own (MMT: its student's;
          # mean teacher: a second view; ABMT: its student's). E.g. (1,) gives ABMT's teacher a view
          # of its own (an ablation, not the reference).
          teacher_views=(),
      )
  )

  c.cluster = ml_collections.ConfigDict(
      dict(
          method='kmeans',
          num_clusters=80,
          max_classes=0,
          k1=20,
          k2=6,
          lam=0.0,
          rho=1.6e-3,
          eps_every_epoch=False,
          min_samples=4,
          kmeans_backend='jax',
          # k-means++ initialisations, the best kept (the reference's scikit-learn default is
          # 10, at ten times the cost; docs/reference.md, "Where jaxreid departs").
          kmeans_n_init=1,
      )
  )

  # The method's loss weights, unset (the method's defaults apply): any ablation is an
  # override, e.g. --config.loss.soft_tri=0.0. `function` ('package.module:function') swaps in a
  # loss of your own with the same signature (docs/usage.md, "Your own loss").
  c.loss = ml_collections.ConfigDict({'function': ''})
  for name in LOSS_WEIGHTS[method]:
    c.loss[name] = ml_collections.config_dict.placeholder(float)
  c.eval = ml_collections.ConfigDict(dict(rerank=False))
  # At the end of a run, also write the adapted model as a PyTorch file (<workdir>/model.pth):
  # 'torchreid' (OSNet) or 'torchvision' (MobileNetV2); '' = only model.msgpack.
  c.export = ml_collections.ConfigDict(dict(torch_format=''))

  if method == 'abmt':
    # One two-branch network; DBSCAN on the k-reciprocal Jaccard distance with source mixing
    # (lambda 0.1), eps re-estimated every epoch (docs/reference.md section 4).
    c.model.arch = 'abmt'
    use_dbscan(c, rho=2e-3 * SYNTHETIC_RHO_SCALE, every_epoch=True)
    c.cluster.lam = 0.1
  return c


def use_dbscan(c: ml_collections.ConfigDict, rho: float = 1.6e-3, every_epoch: bool = False):
  """DBSCAN on the k-reciprocal Jaccard distance instead of K-means; MMT fixes eps at epoch 0
  (docs/reference.md section 3), ABMT re-estimates it every epoch."""
  c.cluster.update(dict(method='dbscan', rho=rho, eps_every_epoch=every_epoch))


def parse_arg(arg: str, default: str, options: tuple[str, ...] = ()) -> tuple[str, set[str]]:
  """'mmt,dbscan' -> ('mmt', {'dbscan'}): a method (`default` when none is named) and options
  ('pretrain,abmt': pre-training the two-branch network); anything else is an error listing what
  is allowed (a typo must not be ignored)."""
  words = [w for w in (arg or '').split(',') if w]
  methods = [w for w in words if w in METHODS]
  if 'pretrain' in methods and 'abmt' in methods and 'abmt' in options:
    methods.remove('abmt')  # 'pretrain,abmt': pre-training ABMT's two-branch network
  unknown = [w for w in words if w not in METHODS and w not in options]
  if unknown or len(methods) > 1:
    raise ValueError(
        f'config argument {arg!r}: expected one method of {", ".join(METHODS)}'
        + (f' and options from {", ".join(options)}' if options else '')
    )
  return (methods[0] if methods else default), set(words) - set(methods)


def options(arg: str, allowed: tuple[str, ...]) -> set[str]:
  """'dbscan' -> {'dbscan'}: the options of a method's config; anything else is an error."""
  words = {w for w in (arg or '').split(',') if w}
  if words - set(allowed):
    raise ValueError(
        f'config argument {arg!r}: the options are {", ".join(allowed) or "none"} '
        '(real data sets: configs/<source>2<target>.py:<method>)'
    )
  return words


def real_task(
    method: str,
    options: set[str],
    source: str,
    target: str,
    num_clusters: int,
    rho_scale: float = 1.0,
) -> ml_collections.ConfigDict:
  """`method` on real data: the named sets (read from config.data.root/<name>, or the `*_root`
  fields), K-means with `num_clusters` or, with the 'dbscan' option (and for ABMT), DBSCAN at the
  papers' rho times `rho_scale` (`rho_scale()` of the target set)."""
  c = get_config(method)
  c.data.source, c.data.target = source, target
  c.cluster.num_clusters = num_clusters
  if method == 'abmt':
    c.cluster.rho = 2e-3 * rho_scale
  elif 'dbscan' in options:
    use_dbscan(c, rho=1.6e-3 * rho_scale)
  if method == 'pretrain' and 'abmt' in options:
    c.model.arch = 'abmt'
  return c


def from_shared(c: ml_collections.ConfigDict, which: str, name: str) -> None:
  """Data set `name` of ../shared/data (Market layout) as the source or target."""
  c.data[which] = 'market1501'
  c.data[f'{which}_root'] = os.path.join(SHARED_DATA, name)


def from_published_model(c: ml_collections.ConfigDict, backbone: str, weights: str) -> None:
  """Start from a published model in ../shared/weights at 256x128, sized for the 2-core CPU:
  3 epochs x 100 iterations of batch 32, evaluated at the end (the papers' 40 x 400 is
  `--config.train.epochs=40 --config.train.iters=400`). A re-ID model (OSNet) is adapted
  directly; ImageNet weights are pre-trained on the source first, with the papers' lr."""
  c.data.height, c.data.width = 256, 128
  c.data.crop_pad = 10
  c.data.batch_size = 32
  c.data.eval_batch_size = 32  # small batches run faster through OSNet / MobileNetV2 on a CPU
  c.model.backbone = backbone
  c.init.pretrained = os.path.join(SHARED_WEIGHTS, weights)
  if backbone.startswith('osnet'):
    c.init.skip_pretrain = True
  else:
    c.pretrain.update(
        dict(epochs=20, iters=100, lr=3.5e-4, warmup_epochs=2, milestones=(15,), eval_every=20)
    )
  c.train.update(dict(epochs=3, iters=100, lr=3.5e-4, eval_every=3, log_every=25))


def papers_setting(c: ml_collections.ConfigDict) -> None:
  """The papers' setting: ResNet-50 at 256x128, batch 64 normalised in 16-image groups (the
  published runs' 4-GPU DataParallel), pre-training 80 x 100 (ABMT: x 200) with lr 3.5e-4,
  warm-up 10 and steps at 40 and 70, adaptation 40 x 400."""
  c.data.height, c.data.width = 256, 128
  c.data.crop_pad = 10
  c.data.batch_size = 64
  c.model.depth, c.model.width = 50, 64
  c.model.norm_group_size = 16
  c.pretrain.update(
      dict(epochs=80, iters=100, lr=3.5e-4, warmup_epochs=10, milestones=(40, 70), eval_every=40)
  )
  if c.method == 'abmt':
    c.pretrain.iters = 200
  c.train.update(dict(epochs=40, iters=400, lr=3.5e-4, eval_every=1, log_every=100))


def small_sets_setting(c: ml_collections.ConfigDict) -> None:
  """CUHK03 <-> PKU-Reid from ../shared/data at a budget that fits a 2-core CPU: the small
  ResNet at 64x32 from random initialisation, pre-training 20 x 50, adaptation 10 x 50."""
  for which in ('source', 'target'):
    from_shared(c, which, c.data[which])
  c.data.height, c.data.width = 64, 32
  c.data.crop_pad = 10  # the setting these sets' results were measured with
  c.pretrain.update(dict(epochs=20, iters=50, warmup_epochs=2, milestones=(16,), eval_every=10))
  c.train.update(dict(epochs=10, iters=50, lr=3.5e-4, eval_every=2))
