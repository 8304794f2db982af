"""Rendering the synthetic world's people: what an identity looks like (clothing colours and
patterns, carried items, hair, body shape) and what a camera does to it (illumination, colour
cast, saturation, blur, noise, background, viewpoint and framing), per domain.

The many small appearance and camera factors are kept together here because they only make sense
read together; `jaxreid.data.synthetic` plans the world and writes it to disk with them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageFilter

# ---------------------------------------------------------------------------------------------
# Palettes and domain styles
# ---------------------------------------------------------------------------------------------

_CLOTHES = np.array(
    [
        [200, 30, 35],
        [230, 120, 30],
        [235, 205, 40],
        [40, 150, 60],
        [30, 90, 190],
        [120, 60, 160],
        [240, 240, 235],
        [25, 25, 28],
        [120, 120, 125],
        [140, 90, 50],
        [230, 140, 170],
        [40, 170, 180],
        [20, 40, 90],
        [90, 100, 45],
        [110, 20, 35],
        [200, 185, 150],
    ],
    np.float32,
)
# relative frequency of each palette colour per domain: b is dark / winter-like.
_CLOTHES_W = {
    'a': np.array([3, 2, 2, 2, 3, 1, 3, 3, 2, 1, 1, 1, 2, 1, 1, 2], np.float32),
    'b': np.array([1, 0.3, 0.3, 1, 1, 0.5, 1, 6, 4, 2, 0.3, 0.3, 4, 2, 2, 1], np.float32),
}
_SKIN = np.array(
    [[245, 205, 170], [225, 175, 135], [190, 140, 100], [140, 95, 65], [95, 65, 45]], np.float32
)
_HAIR = np.array(
    [[20, 15, 15], [60, 40, 25], [110, 75, 40], [200, 170, 100], [150, 150, 150], [140, 60, 30]],
    np.float32,
)
_HAIR_W = np.array([5, 4, 2, 1, 0.5, 0.5], np.float32)
_SHOES = np.array([[20, 20, 20], [60, 40, 30], [235, 235, 235], [40, 40, 70]], np.float32)

# Camera style ranges per domain. b: darker, strong colour casts, desaturated, blurrier, noisier,
# darker/different backgrounds, people smaller in the frame and less centred.
_STYLE = {
    'a': dict(
        gain=(0.95, 1.15),
        cast=0.08,
        sat=(0.9, 1.15),
        gamma=(0.9, 1.1),
        blur=(0.0, 0.4),
        noise=(1.5, 4.0),
        bg_val=(150, 235),
        floor_val=(110, 190),
        textures=('gradient', 'tiles', 'bands'),
        scale=(0.92, 1.0),
        shift=0.04,
    ),
    'b': dict(
        gain=(0.8, 0.92),
        cast=0.0,
        sat=(0.7, 0.9),
        gamma=(1.0, 1.12),
        blur=(0.5, 0.9),
        noise=(3.0, 6.0),
        bg_val=(70, 150),
        floor_val=(50, 110),
        textures=('blobs', 'bands', 'gradient'),
        scale=(0.8, 0.9),
        shift=0.08,
    ),
}
# Strong, distinct per-camera tints for domain b (cool blue, green, magenta, sodium orange, cyan).
_B_CASTS = np.array(
    [[0.75, 0.95, 1.3], [0.85, 1.2, 0.8], [1.2, 0.8, 1.15], [1.3, 1.0, 0.65], [0.7, 1.15, 1.2]],
    np.float32,
)
_B_DOMAIN_CAST = np.array([0.8, 0.95, 1.2], np.float32)
VIEWS = ('front', 'back', 'left', 'right')


def choice(rng, n, w=None):
  p = None if w is None else np.asarray(w, np.float64) / np.sum(np.asarray(w, np.float64))
  return int(rng.choice(n, p=p))


def _colour(rng, palette, weights=None, jitter=18.0):
  c = palette[choice(rng, len(palette), weights)]
  return np.clip(c + rng.uniform(-jitter, jitter, 3), 0, 255).astype(np.float32)


def _towards(near, far, gap: float):
  """`near` moved a share `gap` of the way to `far` (numbers, arrays and tuples of them)."""
  if isinstance(near, tuple):
    return tuple(_towards(a, b, gap) for a, b in zip(near, far))
  if isinstance(near, str):
    return far
  if isinstance(near, (int, float)):
    return near + gap * (far - near)
  return near + gap * (np.asarray(far, np.float32) - near)


def sample_identity(rng: np.random.Generator, domain: str, gap: float = 1.0) -> dict:
  """Appearance of one person: the only thing (beyond camera and pose) that decides pixels.
  Domain b's clothing distribution is a's moved a share `gap` towards its own (darker, more long
  sleeves and trousers)."""
  w, long_sleeve_p, bottom_w = _CLOTHES_W['a'], 0.5, np.array([0.55, 0.3, 0.15])
  if domain == 'b':
    w = _towards(w, _CLOTHES_W['b'], gap)
    long_sleeve_p = _towards(long_sleeve_p, 0.85, gap)
    bottom_w = _towards(bottom_w, np.array([0.8, 0.1, 0.1]), gap)
  top = _colour(rng, _CLOTHES, w)
  pattern = ('plain', 'stripes', 'checks')[choice(rng, 3, [0.5, 0.25, 0.25])]
  return dict(
      height=float(rng.uniform(0.80, 0.95)),
      build=float(rng.uniform(0.85, 1.2)),
      skin=_colour(rng, _SKIN, jitter=10),
      hair=_colour(rng, _HAIR, _HAIR_W, jitter=10),
      long_hair=bool(rng.random() < 0.35),
      hat=_colour(rng, _CLOTHES, w) if rng.random() < 0.15 else None,
      top=top,
      pattern=pattern,
      pattern_colour=_colour(rng, _CLOTHES, w),
      pattern_period=float(rng.uniform(0.035, 0.07)),  # fraction of body length
      long_sleeves=bool(rng.random() < long_sleeve_p),
      bottom=_colour(rng, _CLOTHES, w),
      bottom_type=('trousers', 'shorts', 'skirt')[choice(rng, 3, bottom_w)],
      shoes=_colour(rng, _SHOES, jitter=10),
      item=('none', 'bag', 'backpack')[choice(rng, 3, [0.45, 0.25, 0.3])],
      item_colour=_colour(rng, _CLOTHES, w),
      item_side=int(rng.choice([-1, 1])),
  )


def sample_camera(rng: np.random.Generator, domain: str, index: int, gap: float = 1.0) -> dict:
  """Imaging style of one camera of a domain; domain b's style ranges are a's moved a share `gap`
  towards its own."""
  s = _STYLE[domain]
  if domain == 'b':
    s = {k: _towards(_STYLE['a'][k], v, gap) for k, v in s.items()}
    # One cool cast for the whole domain plus a mild per-camera variation: the shift is between
    # the domains (what adaptation must bridge); within b, cross-camera matching stays
    # possible, as it is within a. (Per-camera tints as strong as _B_CASTS made b a
    # camera-invariance problem on which no source model rose above chance.)
    cast = (
        _towards(np.array([1.04, 1.0, 1.0], np.float32), _B_DOMAIN_CAST, gap)
        * (1.0 + 0.1 * (_B_CASTS[index % len(_B_CASTS)] - 1.0))
        * rng.uniform(0.97, 1.03, 3)
    )
  else:
    cast = 1.0 + rng.uniform(-s['cast'], s['cast'], 3)
    cast[0] += 0.04  # domain a: slightly warm daylight
  base = rng.uniform(*s['bg_val'])
  tint = rng.uniform(-25, 25, 3)
  views = rng.dirichlet(np.ones(4) * 1.5)
  return dict(
      gain=float(rng.uniform(*s['gain'])),
      cast=cast.astype(np.float32),
      sat=float(rng.uniform(*s['sat'])),
      gamma=float(rng.uniform(*s['gamma'])),
      blur=float(rng.uniform(*s['blur'])),
      noise=float(rng.uniform(*s['noise'])),
      bg1=np.clip(base + tint, 0, 255).astype(np.float32),
      bg2=np.clip(base * rng.uniform(0.7, 1.2) + rng.uniform(-35, 35, 3), 0, 255).astype(
          np.float32
      ),
      floor=np.clip(rng.uniform(*s['floor_val']) + rng.uniform(-15, 15, 3), 0, 255).astype(
          np.float32
      ),
      floor_y=float(rng.uniform(0.78, 0.9)),
      texture=s['textures'][index % len(s['textures'])],
      period=float(rng.uniform(0.15, 0.45)),
      phase=float(rng.uniform(0, 2 * np.pi)),
      views=views,
      scale=float(rng.uniform(*s['scale'])),
      shift=s['shift'],
  )


# ---------------------------------------------------------------------------------------------
# Rendering (numpy on a 2x super-sampled canvas, averaged down: cheap anti-aliasing)
# ---------------------------------------------------------------------------------------------


class _Canvas:

  def __init__(self, h: int, w: int):
    self.h, self.w = h, w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    self.yy, self.xx = yy + 0.5, xx + 0.5
    self.img = np.zeros((h, w, 3), np.float32)

  def ellipse(self, cy, cx, ry, rx):
    return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0

  def capsule(self, y0, x0, y1, x1, r):
    dy, dx = y1 - y0, x1 - x0
    t = ((self.yy - y0) * dy + (self.xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return (self.yy - y0 - t * dy) ** 2 + (self.xx - x0 - t * dx) ** 2 <= r * r

  def trapezoid(self, y0, y1, cx0, hw0, cx1, hw1):
    """Rows y0..y1, centre and half width interpolated linearly from top to bottom."""
    t = np.clip((self.yy - y0) / max(y1 - y0, 1e-6), 0, 1)
    cx, hw = cx0 + t * (cx1 - cx0), hw0 + t * (hw1 - hw0)
    return (self.yy >= y0) & (self.yy <= y1) & (np.abs(self.xx - cx) <= hw)

  def rect(self, y0, y1, x0, x1):
    return (self.yy >= y0) & (self.yy <= y1) & (self.xx >= x0) & (self.xx <= x1)

  def paint(self, mask, colour, shade_cx=None, shade_hw=None, shade=0.3):
    """Fill `mask`; optional horizontal shading (darker towards the body's edges) so that
    limbs and torso read as rounded."""
    c = np.asarray(colour, np.float32)
    if shade_cx is not None:
      f = 1.0 - shade * np.minimum(((self.xx[:1] - shade_cx) / max(shade_hw, 1e-3)) ** 2, 1)
      c = f[..., None] * c  # (1, W, 3): shading only varies along x
    np.copyto(self.img, c, where=mask[..., None])


def _background(cv: _Canvas, cam: dict, rng: np.random.Generator):
  h, w = cv.h, cv.w
  y, x = cv.yy / h, cv.xx / w
  phase = cam['phase'] + rng.uniform(-0.3, 0.3)
  t = cam['texture']
  if t == 'gradient':
    a = y[..., None]
  elif t == 'bands':
    a = (np.sin(2 * np.pi * x / cam['period'] + phase) > 0).astype(np.float32)[..., None]
  elif t == 'tiles':
    a = ((np.floor(x / cam['period'] + phase) + np.floor(y / cam['period'])) % 2)[..., None]
    a = 0.35 * a + 0.65 * y[..., None]
  else:  # blobs: smooth low-frequency mixture
    a = 0.5 + 0.25 * (
        np.sin(2 * np.pi * (x * 1.3 + y * 0.7) / cam['period'] + phase)
        + np.sin(2 * np.pi * (y * 1.7 - x * 0.4) / cam['period'] - phase)
    )
    a = a[..., None]
  cv.img[:] = cam['bg1'] * (1 - a) + cam['bg2'] * a
  fy = cam['floor_y'] * h
  floor = cv.yy >= fy
  depth = np.clip((cv.yy - fy) / max(h - fy, 1), 0, 1)[..., None]
  cv.img[floor] = (cam['floor'] * (0.85 + 0.3 * depth))[floor]


def _pattern_mask(cv: _Canvas, pattern: str, period: float, y_ref: float, x_ref: float):
  if pattern == 'stripes':
    return ((np.floor((cv.yy - y_ref) / (period / 2))) % 2) == 1
  if pattern == 'checks':
    return ((np.floor((cv.yy - y_ref) / period) + np.floor((cv.xx - x_ref) / period)) % 2) == 1
  return np.zeros_like(cv.yy, bool)


def render_person(
    ident: dict,
    cam: dict,
    rng: np.random.Generator,
    height: int = 64,
    width: int = 32,
    view: str | None = None,
) -> np.ndarray:
  """Render one crop -> uint8 (height, width, 3). Randomness (pose, framing, noise) from rng."""
  ss = 2
  cv = _Canvas(height * ss, width * ss)
  H, W = cv.h, cv.w
  _background(cv, cam, rng)

  view = view or VIEWS[choice(rng, 4, cam['views'])]
  L = ident['height'] * cam['scale'] * rng.uniform(0.95, 1.04) * H
  top = (H - L) * rng.uniform(0.3, 0.7)
  cx = W / 2 + rng.normal(0, cam['shift']) * W
  bw = ident['build']
  phase = rng.uniform(0, 2 * np.pi)
  swing = np.sin(phase)

  def Y(f):  # body fraction -> canvas row
    return top + f * L

  sw, hw = 0.125 * L * bw, 0.105 * L * bw  # shoulder / hip half widths
  lr, ar = 0.045 * L * bw, 0.03 * L * bw  # leg / arm radii
  side = view in ('left', 'right')
  face = -1.0 if view == 'left' else 1.0
  if side:
    sw, hw = sw * 0.62, hw * 0.7

  def leg(x_hip, x_ankle, darken=1.0):
    bt = ident['bottom_type']
    bottom = ident['bottom'] * darken
    skin = ident['skin'] * darken
    knee_y = Y(0.74)
    x_knee = x_hip + 0.45 * (x_ankle - x_hip)
    if bt == 'trousers':
      cv.paint(cv.capsule(Y(0.52), x_hip, Y(0.95), x_ankle, lr), bottom, x_hip, lr * 1.5)
    else:
      cv.paint(cv.capsule(Y(0.6), x_hip, Y(0.95), x_ankle, lr * 0.8), skin, x_hip, lr * 2)
      if bt == 'shorts':
        cv.paint(
            cv.capsule(Y(0.52), x_hip, knee_y - 0.05 * L, x_knee, lr * 1.05),
            bottom,
            x_hip,
            lr * 1.5,
        )
    cv.paint(
        cv.ellipse(Y(0.975), x_ankle + (0.025 * L * face if side else 0), 0.028 * L, 0.05 * L),
        ident['shoes'] * darken,
    )

  def arm(x_sh, x_hand, y_hand, darken=1.0):
    y_sh = Y(0.17)
    top_c = ident['top'] * darken
    if ident['long_sleeves']:
      cv.paint(cv.capsule(y_sh, x_sh, y_hand, x_hand, ar), top_c, x_sh, ar * 2)
    else:
      cv.paint(
          cv.capsule(y_sh, x_sh, y_hand, x_hand, ar * 0.85), ident['skin'] * darken, x_sh, ar * 2
      )
      ye, xe = y_sh + 0.4 * (y_hand - y_sh), x_sh + 0.4 * (x_hand - x_sh)
      cv.paint(cv.capsule(y_sh, x_sh, ye, xe, ar * 1.1), top_c, x_sh, ar * 2)
    cv.paint(cv.ellipse(y_hand + 0.01 * L, x_hand, 0.022 * L, 0.018 * L), ident['skin'] * darken)

  item, ic = ident['item'], ident['item_colour']
  # --- things behind the body
  if item == 'backpack' and side:
    x_back = cx - face * (sw + 0.05 * L)
    cv.paint(cv.rect(Y(0.18), Y(0.45), x_back - 0.06 * L, x_back + 0.06 * L), ic * 0.9)
  if ident['long_hair'] and view != 'back':
    cv.paint(
        cv.rect(
            Y(0.06),
            Y(0.21),
            cx - 0.06 * L * (0.6 if side else 1),
            cx + 0.06 * L * (0.6 if side else 1),
        ),
        ident['hair'],
    )
  # --- legs (far leg first in side view)
  if side:
    d = 0.11 * L * swing
    leg(cx, cx - d, darken=0.8)
    leg(cx, cx + d)
  else:
    sp = 0.015 * L * swing
    leg(cx - 0.05 * L * bw, cx - 0.055 * L * bw - sp)
    leg(cx + 0.05 * L * bw, cx + 0.055 * L * bw + sp)
  if ident['bottom_type'] == 'skirt':
    cv.paint(
        cv.trapezoid(Y(0.5), Y(0.72), cx, hw, cx, hw * (1.15 if side else 1.45)),
        ident['bottom'],
        cx,
        hw * 1.5,
        shade=0.2,
    )
  # --- far arm (side view)
  if side:
    arm(cx, cx - face * 0.07 * L * swing, Y(0.5), darken=0.75)
  # --- torso with pattern
  torso = cv.trapezoid(Y(0.16), Y(0.54), cx, sw, cx, hw) | cv.ellipse(Y(0.19), cx, 0.05 * L, sw)
  cv.paint(torso, ident['top'], cx, sw * 1.3, shade=0.25)
  pm = torso & _pattern_mask(cv, ident['pattern'], ident['pattern_period'] * L, Y(0.16), cx)
  cv.paint(pm, ident['pattern_colour'], cx, sw * 1.3, shade=0.25)
  # --- carried items in front of / on the torso
  if item == 'backpack' and view == 'back':
    cv.paint(cv.rect(Y(0.19), Y(0.46), cx - 0.75 * sw, cx + 0.75 * sw), ic, cx, sw, 0.2)
  elif item == 'backpack' and view == 'front':
    for s in (-1, 1):
      cv.paint(
          cv.rect(Y(0.16), Y(0.40), cx + s * 0.55 * sw - 0.012 * L, cx + s * 0.55 * sw + 0.012 * L),
          ic,
      )
  if item == 'bag':
    s = ident['item_side'] * (-1 if view == 'back' else 1)
    if side:
      s = face * 0.3
    cv.paint(
        cv.capsule(Y(0.17), cx - s * sw * 0.8, Y(0.5), cx + s * (hw + 0.02 * L), 0.01 * L), ic * 0.8
    )
    bx = cx + s * (hw + 0.04 * L)
    cv.paint(cv.rect(Y(0.47), Y(0.6), bx - 0.05 * L, bx + 0.05 * L), ic)
  # --- arms (front/back: both; side: near arm)
  if side:
    arm(cx, cx + face * 0.07 * L * swing, Y(0.5))
  else:
    for s in (-1, 1):
      xs = cx + s * (sw - ar * 0.5)
      arm(xs, xs + s * 0.02 * L, Y(0.5) - 0.01 * L * abs(swing))
  # --- head, hair, hat
  hy, hx = Y(0.075), cx + (0.01 * L * face if side else 0)
  ry, rx = 0.068 * L, 0.05 * L * min(bw, 1.1)
  head = cv.ellipse(hy, hx, ry, rx)
  cv.paint(cv.rect(Y(0.12), Y(0.17), cx - 0.02 * L, cx + 0.02 * L), ident['skin'] * 0.85)
  cv.paint(head, ident['skin'], hx, rx * 1.3, shade=0.2)
  if view == 'back':
    hair = head
    if ident['long_hair']:
      hair = hair | cv.rect(hy, Y(0.22), hx - rx, hx + rx)
  elif side:
    hair = head & ((cv.yy < hy - 0.3 * ry) | ((cv.xx - hx) * face < -0.2 * rx))
  else:
    hair = head & ((cv.yy < hy - 0.35 * ry) | (np.abs(cv.xx - hx) > 0.8 * rx))
  cv.paint(hair, ident['hair'])
  if ident['hat'] is not None:
    cv.paint(
        cv.ellipse(hy - 0.45 * ry, hx, 0.5 * ry, rx * 1.1) & (cv.yy < hy - 0.2 * ry), ident['hat']
    )

  # --- camera: colour cast and illumination, saturation, gamma; then downsample, blur, noise
  img = cv.img * (cam['cast'] * cam['gain'] * rng.uniform(0.92, 1.08))
  grey = img.mean(-1, keepdims=True)
  img = grey + cam['sat'] * (img - grey)
  img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** cam['gamma']
  img = img.reshape(height, ss, width, ss, 3).mean((1, 3))
  pil = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
  if cam['blur'] > 0.05:
    pil = pil.filter(ImageFilter.GaussianBlur(cam['blur']))
  img = np.asarray(pil, np.float32) + rng.normal(0, cam['noise'], (height, width, 3))
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The world on disk
