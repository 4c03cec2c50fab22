"""Checks that dimension 0 of a captured tensor really indexes the probe's examples.

The fast path reads the example axis off shapes: a call whose outputs have ``n`` rows in dimension 0
is taken to hold example ``i`` in row ``i``. A shape can agree by coincidence: a vision tower that
sees ``n`` images when one example carries two and another none, patches flattened across images,
a shared table whose length happens to be ``n``. The per-example gradients of such a call would be
attributed to the wrong examples (or its products would fail on inconsistent shapes), so the fast
path verifies the two assumptions it relies on and leaves a parameter to exact autograd when either
fails.

**Locality of the output gradients.** Row ``r`` of a captured output ``y`` influences only the loss
of example ``r`` iff, for every weighting ``c`` of the per-example losses,

    d(sum_i c_i l_i) / d y_r = c_r * d(sum_i l_i) / d y_r.

One extra backward pass with weights ``c`` checks this for every captured call at once. The weights
are distinct signed powers of two, ``c = (1, -1, 2, -2, 4, -4, ...)`` (period 32): every backward
operation is linear in the incoming gradient and built from products and sums, and scaling by a
power of two commutes with floating-point rounding, so for a local row both sides agree to the
last bit (up to non-deterministic accumulation order, e.g. atomics on GPUs; hence a small
tolerance), while a row that belongs to, or also feeds, another example is off by at least a
factor 2 or a sign.

**Rows of several examples.** A call whose dimension 0 is not the examples at all (patches flattened
across images) is not tested for ``w_r = c_r u_r`` but asked *which* ``c_e`` its row carries:
:func:`~.row_map.discover_row_map` reads ``e`` off the same two gradients (``w_r = c_e u_r``; the
``c_e`` are distinct for ``n <= WEIGHT_PERIOD`` only, so beyond that such calls go to exact autograd).

**Reproduction by a per-example re-run.** A module re-run one example at a time (:mod:`.module_grads`)
gets row ``i`` of the inputs whose dimension 0 is ``n`` and the other inputs whole. That
classification is right iff the re-run reproduces row ``i`` of every recorded output, which is
compared directly (an output changed in place after its call can only be compared by shape).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WEIGHT_PERIOD = 32  # distinct weights; examples i and i + 32 share one


def check_weights(n: int, like: Tensor) -> Tensor:
    """``c_i = (-1)^i 2^floor((i mod 32) / 2)``: distinct signed powers of two, shaped and typed like ``like``."""
    j = torch.arange(n, device=like.device) % WEIGHT_PERIOD
    sign = 1.0 - 2.0 * (j % 2).to(like.dtype)
    return sign * torch.pow(2.0, (j // 2).to(like.dtype))


def locality_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the locality check: rounding of accumulation order only."""
    return max(4.0 * torch.finfo(dtype).eps, 1e-5)


def rows_local(dy_weighted: Tensor | None, dy_unit: Tensor | None, weights: Tensor) -> bool:
    """Whether ``dy_weighted[r] == weights[r] * dy_unit[r]`` for every row ``r`` (to rounding).

    Tested as ``max|dy_weighted - w dy_unit| <= tol * max|w dy_unit|`` with one temporary (it runs on
    every captured output). ``None`` stands for a zero gradient (an output the loss does not
    reach). A non-finite unit gradient makes the check moot (every path gives non-finite values),
    so it passes; a weighted gradient that overflowed while the unit one is finite fails (nothing
    can be verified).
    """
    if dy_unit is None and dy_weighted is None:
        return True
    if dy_unit is None or dy_weighted is None:
        other = dy_weighted if dy_unit is None else dy_unit
        assert other is not None
        return not bool(other.any())
    n = weights.shape[0]
    if dy_unit.shape != dy_weighted.shape or dy_unit.dim() == 0 or dy_unit.shape[0] != n:
        return False
    if dy_unit.numel() == 0:
        return True
    w = weights.to(dy_unit.device, dy_unit.dtype).reshape(-1, *([1] * (dy_unit.dim() - 1)))
    expected = dy_unit * w
    lo, hi = torch.aminmax(expected)
    expected.sub_(dy_weighted)  # reuse the buffer: this is the largest temporary of the check
    lo_d, hi_d = torch.aminmax(expected)
    lo, hi, lo_d, hi_d = torch.stack([lo, hi, lo_d, hi_d]).tolist()
    scale, err = max(-lo, hi), max(-lo_d, hi_d)
    if not math.isfinite(scale):
        return True
    return err <= locality_tolerance(dy_unit.dtype) * scale  # False for a NaN or inf err


def reproduces(rerun: Tensor, recorded: Tensor, shape_only: bool = False) -> bool:
    """Whether a re-run output equals a recorded one: same shape and ``max|d| <= sqrt(eps) max|y|``.

    The tolerance absorbs the different kernels a batched (vmap) re-run may use; a wrong split of
    the inputs changes outputs at the scale of the outputs themselves.
    """
    if rerun.shape != recorded.shape:
        return False
    if shape_only or recorded.numel() == 0:
        return True
    a = rerun.detach().to(recorded.dtype)
    b = recorded.detach()
    if not bool(torch.isfinite(b).all()):
        return bool(torch.equal(torch.isfinite(a), torch.isfinite(b)))
    if a.is_complex() or a.is_floating_point():
        tol = torch.finfo(b.real.dtype if b.is_complex() else b.dtype).eps ** 0.5
        return float((a - b).abs().max()) <= tol * float(b.abs().max())
    return bool(torch.equal(a, b))
