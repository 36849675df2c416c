"""Batched SimCLR views on the training device, with per-sample random parameters.

The recipe is SimCLR's (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", appendix A): random resized crop (area 0.08-1, aspect 3/4-4/3) back to the working
size, horizontal flip, colour jitter (brightness, contrast, saturation, hue, in a random order) with
probability 0.8, grayscale with probability 0.2, Gaussian blur (sigma 0.1-2, kernel 10% of the side)
with probability 0.5, then normalisation; BYOL's solarize is optional.

Every operation reproduces ``torchvision.transforms.v2.functional`` on float images: the crop is an
integer box (as RandomResizedCrop draws) resized with the antialiased bilinear weights of PyTorch's
``interpolate(..., antialias=True)``, as two batched matmuls; colour runs in float32, without the
uint8 rounding a PIL pipeline adds between steps. The only differences are float32 rounding (max
abs error ~2e-6 on the [0, 1] scale; ~1e-3 if matmuls are allowed TF32).

Randomness is a counter-based hash of (seed, epoch, sample index, view, slot) in int64 tensor ops on
the images' device, so a sample's two views in an epoch do not depend on the batch size, the order
within the batch, the device or the number of processes. (torchvision's v2 transforms applied to a
batch draw one setting for the whole batch, pytorch/vision#8484; here every sample draws its own.)

Layout: ``keyed.py`` the randomness; ``op.py`` what an op is (``Op``: name, slots, switch, sample,
apply) and the slot layout; ``geometry.py``, ``colour.py``, ``filters.py`` the ops; ``recipe.py``
the list ``OPS`` and ``only``; ``views.py`` ``SimCLRAugment``, which walks the list; ``stats.py``
channel statistics and normalisation.

Adding an op (say posterize) is one class and one line:

1. Its switch in ``config.py``: a field of ``AugmentConfig``, ``posterize_p: float = 0.0`` (a
   probability; 0 turns the op off).
2. The op, in the module of its kind (here ``filters.py``): a subclass of ``Op`` with ``name``,
   ``slots`` (uniform draws per sample and view), ``switch = "posterize_p"``, ``sample(u, cfg,
   frame)`` returning its per-sample parameters from ``u (N, slots)``, and ``apply(x, p, cfg,
   frame)`` on float ``(N, 3, S, S)`` in [0, 1].
3. Append an instance to ``OPS`` in ``recipe.py``. Appended, it leaves the other ops' draws, so
   every existing view of a seed, unchanged; it runs after the ops before it, before normalisation.

Nothing else: the draws' columns follow from ``OPS``, and fine-tuning (``only(...)`` in
``evaluation/finetune.py``) keeps only the ops it names, so the new op is off there unless added.
"""

from simclr_kit.augment.colour import BRIGHTNESS, CONTRAST, HUE, SATURATION
from simclr_kit.augment.filters import blur_kernel_size
from simclr_kit.augment.keyed import keyed_uniforms
from simclr_kit.augment.op import Frame, Op, slot_layout
from simclr_kit.augment.recipe import OPS, only
from simclr_kit.augment.stats import channel_stats, normalize
from simclr_kit.augment.views import SimCLRAugment, save_view_grid

__all__ = ["BRIGHTNESS", "CONTRAST", "HUE", "OPS", "SATURATION", "Frame", "Op", "SimCLRAugment",
           "blur_kernel_size", "channel_stats", "keyed_uniforms", "normalize", "only",
           "save_view_grid", "slot_layout"]
