"""Pure-JAX image augmentations for contrastive learning (SimCLR-style).

SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
Visual Representations") learns by making two random views of each image agree.
The views must differ in everything the representation should *ignore*
(position, scale, lighting, noise, occlusion) and keep what it should capture
(the object), so the augmentation pipeline is the inductive bias. Its ablations
single out random cropping + colour distortion as the essential pair.

Everything here runs inside the jitted, vmapped round, so:

  * shapes are static: crops are `lax.dynamic_slice` windows of a padded image
    or `jax.image.scale_and_translate` resamples back to `[H, W]`; cutout is a
    mask, never a slice of data-dependent size;
  * randomness is per example: example i uses `fold_in(rng, i)`, and the
    per-image function is vmapped over those keys, so its view depends only
    on (rng, i, its pixels) -- not on the batch size or on other examples;
  * each example's random numbers (crop offsets, jitter factors, coin flips,
    the noise field) come from *one* `uniform(key, [n])` draw that the ops
    slice: every separate PRNG call is a separately compiled threefry, and on
    CPU those dominate compile time (~10 calls -> 1);
  * knobs are Python values (static): a disabled op is not traced at all, so
    e.g. `brightness=0` costs nothing and is exactly the identity.

Images are `[B, H, W]` or `[B, H, W, C]` floats, by default assumed in
`[0, 1]` (what `fedjax_eff.data.sources` yields); `clip=None` lifts that.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

Image = jax.Array     # [H, W, C] inside the per-example functions
Uniforms = jax.Array  # [n] float32 in [0, 1): one example's random scalars

# SimCLR's colour-jitter strength s = 0.5 (the CIFAR setting): 0.8 s for
# brightness, contrast and saturation, applied with probability 0.8.
DEFAULT_KNOBS = dict(
    crop_pad=2, pad_mode='constant', min_scale=1.0, max_aspect=1.0,
    flip=False, brightness=0.4, contrast=0.4, saturation=0.4, jitter_prob=0.8,
    grayscale_prob=0.0, noise_std=0.0, cutout=0, cutout_prob=0.5,
    clip=(0.0, 1.0))


def _lerp(u: jax.Array, lo, hi) -> jax.Array:
  """U[lo, hi) from U[0, 1)."""
  return lo + (hi - lo) * u


def _randint(u: jax.Array, n: int) -> jax.Array:
  """Uniform on {0..n-1} from U[0, 1) (the min guards u * n rounding to n)."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


# ---------------------------------------------------------------------------
# Per-example ops: an [H, W, C] image and its uniforms in, same shape out.
# ---------------------------------------------------------------------------

def _crop_one(img: Image, u: Uniforms, pad: int,
              pad_mode: str = 'constant') -> Image:
  """Shift by up to ±pad pixels: pad to [H+2p, W+2p], take an [H, W] window.

  The window offset is uniform in {0..2p}² so the shift is uniform in
  {-p..p}², the classic CIFAR "pad 4 and crop" augmentation. Uses u[0:2].
  """
  h, w, c = img.shape
  padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
  dy, dx = _randint(u[0], 2 * pad + 1), _randint(u[1], 2 * pad + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))


def _resized_crop_one(img: Image, u: Uniforms, min_scale: float,
                      max_aspect: float = 1.0) -> Image:
  """SimCLR's random resized crop: a random sub-window resampled to [H, W].

  The window covers a fraction `s ~ U[min_scale, 1]` of the area with aspect
  ratio `r` log-uniform in `[1/max_aspect, max_aspect]` (height `H sqrt(s/r)`,
  width `W sqrt(s r)`, each clipped to the full side), at a uniform position.
  Resampling is bilinear: `scale_and_translate` maps output pixel centre
  `o + 1/2` to input coordinate `(o + 1/2 - t) / k`, so a window starting at
  `y0` of height `hc` uses `k = H / hc`, `t = -y0 k`. Both are traced values,
  so the output shape stays static. Uses u[0:4].
  """
  h, w, _ = img.shape
  area = _lerp(u[0], min_scale, 1.0)
  log_r = jnp.log(jnp.float32(max_aspect))
  ratio = jnp.exp(_lerp(u[1], -log_r, log_r))
  size = jnp.stack([jnp.minimum(h * jnp.sqrt(area / ratio), h),
                    jnp.minimum(w * jnp.sqrt(area * ratio), w)])
  full = jnp.array([h, w], jnp.float32)
  start = u[2:4] * (full - size)
  scale = full / size
  out = jax.image.scale_and_translate(
      img.astype(jnp.float32), img.shape, (0, 1), scale, -start * scale,
      method='linear', antialias=False)
  return out.astype(img.dtype)


def _flip_one(img: Image, u: Uniforms) -> Image:
  """Mirror left-right with probability 1/2. Uses u[0]."""
  return jnp.where(u[0] < 0.5, img[:, ::-1], img)


def _grey(img: Image) -> jax.Array:
  """[H, W] luma (ITU-R 601 weights) for RGB, the channel mean otherwise."""
  if img.shape[-1] == 3:
    return img @ jnp.array([0.299, 0.587, 0.114], img.dtype)
  return jnp.mean(img, -1)


def _jitter_one(img: Image, u: Uniforms, brightness: float, contrast: float,
                saturation: float, prob: float) -> Image:
  """Colour jitter (torchvision semantics), applied with probability `prob`.

  brightness: `x * f`,                       f ~ U[1-b, 1+b]
  contrast:   `m + (x - m) * f`, m = mean grey level of the image
  saturation: `g + (x - g) * f`, g = per-pixel grey (RGB only; C == 3)
  Multiplicative brightness keeps a black background black (digits).
  Uses u[0] (apply?) and u[1:4] (factors).
  """
  out = img
  if brightness:
    out = out * _lerp(u[1], 1 - brightness, 1 + brightness)
  if contrast:
    mean = jnp.mean(_grey(out))
    out = mean + (out - mean) * _lerp(u[2], 1 - contrast, 1 + contrast)
  if saturation and img.shape[-1] == 3:
    grey = _grey(out)[..., None]
    out = grey + (out - grey) * _lerp(u[3], 1 - saturation, 1 + saturation)
  if prob >= 1.0:
    return out
  return jnp.where(u[0] < prob, out, img)


def _grayscale_one(img: Image, u: Uniforms, prob: float) -> Image:
  """SimCLR's colour drop: RGB -> its grey level w.p. `prob`. Uses u[0]."""
  grey = jnp.broadcast_to(_grey(img)[..., None], img.shape)
  return jnp.where(u[0] < prob, grey, img)


def _cutout_one(img: Image, u: Uniforms, size: int, prob: float = 1.0,
                value: float = 0.0) -> Image:
  """Random erasing (DeVries & Taylor 2017): fill a size x size square.

  Applied w.p. `prob`. The square's top-left corner is uniform over positions
  that keep at least half of it inside the image, so it may hang over the
  border, as in the paper. Done with an iota mask: no data-dependent shapes.
  Uses u[0] (apply?) and u[1:3] (corner).
  """
  h, w, _ = img.shape
  half = size // 2
  y0 = _randint(u[1], h + 1) - half
  x0 = _randint(u[2], w + 1) - half
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  square = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
  square = square & (u[0] < prob)
  return jnp.where(square[..., None], jnp.asarray(value, img.dtype), img)


def _noise_one(img: Image, u: Uniforms, std: float) -> Image:
  """Additive i.i.d. Gaussian pixel noise N(0, std²). Uses u[:H*W*C].

  Normals by inversion, `sqrt(2) erfinv(2u - 1)` with u kept off 0 (what
  `jax.random.normal` does), so the field shares the example's one draw.
  """
  u = u[:img.size].reshape(img.shape)
  v = _lerp(u, jnp.nextafter(jnp.float32(-1), 0), 1.0)
  return img + (std * jnp.sqrt(2.0) * jax.scipy.special.erfinv(v)).astype(
      img.dtype)


# ---------------------------------------------------------------------------
# Batch wrappers.
# ---------------------------------------------------------------------------

def _per_example(fn: Callable[..., Image],
                 num_uniforms: int | None) -> Callable[..., jax.Array]:
  """Lift `fn(img [H, W, C], u_or_key, ...)` to `[B, H, W(, C)]` and one key.

  Example i gets `key_i = fold_in(rng, i)` (as clients do in `core/round.py`),
  so views are independent across examples, reproducible per key, and
  example i's view depends only on (rng, i, its pixels): appending padding
  rows leaves the real rows' views unchanged. `fn` receives
  `uniform(key_i, [num_uniforms])` (`num_uniforms(img)` if callable), or
  `key_i` itself when `num_uniforms` is None. `[B, H, W]` inputs get a unit
  channel axis for the call.
  """
  @functools.wraps(fn)
  def batched(images, rng, *args, **kwargs):
    squeeze = images.ndim == 3
    x = images[..., None] if squeeze else images
    if x.ndim != 4:
      raise ValueError(
          f'expected [B, H, W] or [B, H, W, C], got {images.shape}')

    def one(img, i):
      key = jax.random.fold_in(rng, i)
      if num_uniforms is None:
        r = key
      else:
        n = num_uniforms(img) if callable(num_uniforms) else num_uniforms
        r = jax.random.uniform(key, (n,))
      return fn(img, r, *args, **kwargs)

    out = jax.vmap(one)(x, jnp.arange(x.shape[0])).astype(images.dtype)
    return out[..., 0] if squeeze else out
  return batched


random_crop = _per_example(_crop_one, 2)
random_resized_crop = _per_example(_resized_crop_one, 4)
random_flip = _per_example(_flip_one, 1)
color_jitter = _per_example(_jitter_one, 4)
random_grayscale = _per_example(_grayscale_one, 1)
cutout = _per_example(_cutout_one, 3)
gaussian_noise = _per_example(_noise_one, lambda img: img.size)

_NUM_UNIFORMS = 4 + 2 + 1 + 4 + 1 + 3


def _simclr_one(img: Image, key: jax.Array, *, crop_pad, pad_mode, min_scale,
                max_aspect, flip, brightness, contrast, saturation,
                jitter_prob, grayscale_prob, noise_std, cutout, cutout_prob,
                clip) -> Image:
  """The SimCLR pipeline on one image; each disabled stage is skipped.

  One uniform draw serves every stage (disjoint slices, so stages are
  independent), the noise field included (its H*W*C values come last).
  """
  n_noise = img.size if noise_std else 0
  u = jax.random.uniform(key, (_NUM_UNIFORMS + n_noise,))
  u_resize, u_crop, u_flip, u_jit, u_grey, u_cut, u_noise = jnp.split(
      u, [4, 6, 7, 11, 12, _NUM_UNIFORMS])
  dtype = img.dtype
  img = img.astype(jnp.float32)
  if min_scale < 1.0 or max_aspect > 1.0:
    img = _resized_crop_one(img, u_resize, min_scale, max_aspect)
  if crop_pad:
    img = _crop_one(img, u_crop, crop_pad, pad_mode)
  if flip:
    img = _flip_one(img, u_flip)
  if jitter_prob and (brightness or contrast or saturation):
    img = _jitter_one(img, u_jit, brightness, contrast, saturation,
                      jitter_prob)
  if grayscale_prob and img.shape[-1] == 3:
    img = _grayscale_one(img, u_grey, grayscale_prob)
  if noise_std:
    img = _noise_one(img, u_noise, noise_std)
  if clip is not None:
    img = jnp.clip(img, clip[0], clip[1])
  if cutout and cutout_prob:
    img = _cutout_one(img, u_cut, cutout, cutout_prob)
  return img.astype(dtype)


def check_knobs(**knobs) -> dict:
  """`DEFAULT_KNOBS` updated by `knobs`; TypeError on an unknown name."""
  unknown = set(knobs) - set(DEFAULT_KNOBS)
  if unknown:
    raise TypeError(f'unknown augmentation knobs {sorted(unknown)}; '
                    f'known: {sorted(DEFAULT_KNOBS)}')
  return {**DEFAULT_KNOBS, **knobs}


def simclr_augment(images: jax.Array, rng: jax.Array, **knobs) -> jax.Array:
  """One random SimCLR view of each image: `[B, H, W(, C)]` -> same shape/dtype.

  Pipeline (each stage skipped when its knob disables it):
    random resized crop  `min_scale` < 1 (area fraction), `max_aspect`
    pad-and-crop shift   `crop_pad` pixels (`pad_mode` as in `jnp.pad`)
    horizontal flip      `flip` (off by default: digits and letters are not
                         mirror-symmetric; turn on for natural images)
    colour jitter        `brightness`, `contrast`, `saturation` (RGB only),
                         applied with probability `jitter_prob`
    colour drop          `grayscale_prob` (RGB only)
    Gaussian noise       `noise_std`
    clip                 `clip=(lo, hi)` or None
    cutout               `cutout` (square side, pixels) w.p. `cutout_prob`
  Defaults are `DEFAULT_KNOBS`. Call twice with different keys for the two
  views. Knobs are static Python values; jit/vmap over `images` and `rng`.
  """
  one = functools.partial(_simclr_one, **check_knobs(**knobs))
  return _per_example(one, None)(images, rng)
