"""Canny edge maps exactly as OpenCV computes them (`cv2.cvtColor(BGR2GRAY)` + `cv2.Canny`), in numpy/scipy.

kohya's tools/canny.py, and the ControlNet "canny" conditioning images users already have, come from
`cv2.Canny(gray, threshold1, threshold2)` with its defaults (Sobel aperture 3, L1 gradient). Reproducing it
bit for bit keeps edge maps made here interchangeable with those, without OpenCV as a dependency. The steps,
each in OpenCV's integer arithmetic (tests/test_canny.py checks them against stored OpenCV outputs):

1. gray = (9798 R + 19235 G + 3735 B + 2**14) >> 15 (OpenCV's fixed-point BT.601 luma for 8-bit images; PIL's
   `convert("L")` rounds differently and is off by one on about 1 colour in 2500);
2. 3x3 Sobel derivatives dx, dy with replicated borders. No Gaussian blur: cv2.Canny does not smooth (callers
   blur first if they want to; kohya does not);
3. magnitude |dx| + |dy| (or dx^2 + dy^2 compared with squared thresholds when `l2_gradient`);
4. non-maximum suppression along one of 4 directions picked by the fixed-point tangent of 22.5 degrees, with
   OpenCV's mix of strict and non-strict comparisons (they decide which pixel of a two-pixel-wide ridge
   survives); magnitudes outside the image count as 0;
5. hysteresis: a pixel above `low` that survived step 4 is an edge iff its 8-connected component of such pixels
   contains one above `high`. (OpenCV tracks this with a stack; connected components give the same set.)
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# OpenCV's 8-bit RGB -> gray weights (0.299, 0.587, 0.114) * 2**15, summing to exactly 2**15.
_GRAY_WEIGHTS_Q15 = (9798, 19235, 3735)
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)  # tan(22.5 deg) in Q15
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> uint8 [H, W] gray, bit-identical to `cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)`."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB array, got {rgb.dtype} {list(rgb.shape)}")
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    wr, wg, wb = _GRAY_WEIGHTS_Q15
    return ((wr * r + wg * g + wb * b + (1 << 14)) >> 15).astype(np.uint8)


def sobel_3x3(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy) int32, OpenCV's `Sobel(ksize=3, BORDER_REPLICATE)`: dx = [-1 0 1; -2 0 2; -1 0 1]."""
    p = np.pad(gray.astype(np.int32), 1, mode="edge")
    h, w = gray.shape
    # Rows above / at / below, and columns left / at / right of every pixel.
    left = p[:-2, :w] + 2 * p[1:-1, :w] + p[2:, :w]
    right = p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]
    up = p[:h, :-2] + 2 * p[:h, 1:-1] + p[:h, 2:]
    down = p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]
    return right - left, down - up


def canny(gray: np.ndarray, threshold1: float, threshold2: float, *, l2_gradient: bool = False) -> np.ndarray:
    """uint8 [H, W] edge map (0 or 255) of a uint8 [H, W] gray image, bit-identical to
    `cv2.Canny(gray, threshold1, threshold2, apertureSize=3, L2gradient=l2_gradient)`.

    As in OpenCV, the smaller threshold is the low (edge-continuing) one whichever order they come in."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a uint8 [H, W] gray array, got {gray.dtype} {list(gray.shape)}")
    low_t, high_t = sorted((float(threshold1), float(threshold2)))
    if l2_gradient:  # OpenCV compares squared magnitudes with squared (clamped) thresholds
        low_t, high_t = (min(32767.0, t) for t in (low_t, high_t))
        low_t, high_t = (t * t if t > 0 else t for t in (low_t, high_t))
    low, high = math.floor(low_t), math.floor(high_t)

    dx, dy = sobel_3x3(gray)
    mag = dx * dx + dy * dy if l2_gradient else np.abs(dx) + np.abs(dy)  # int32: at most 2 * 1020**2
    h, w = gray.shape
    m = np.pad(mag, 1)  # magnitudes outside the image are 0
    centre = m[1:-1, 1:-1]

    # Direction sector from |dy| / |dx| against tan(22.5) and tan(67.5) = tan(22.5) + 2, in Q15 integers.
    ax = np.abs(dx).astype(np.int64)
    ay = np.abs(dy).astype(np.int64) << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x  # gradient along x: compare with left / right
    vertical = ~horizontal & (ay > tg67x)  # gradient along y: compare with up / down
    diagonal = ~horizontal & ~vertical
    # OpenCV: s = -1 when dx and dy have opposite signs ((xs ^ ys) < 0); then compare up-right / down-left,
    # else up-left / down-right.
    anti = (dx ^ dy) < 0

    def at(di: int, dj: int) -> np.ndarray:
        return m[1 + di:1 + di + h, 1 + dj:1 + dj + w]

    keep_h = (centre > at(0, -1)) & (centre >= at(0, 1))
    keep_v = (centre > at(-1, 0)) & (centre >= at(1, 0))
    keep_d = np.where(anti, (centre > at(-1, 1)) & (centre > at(1, -1)),
                      (centre > at(-1, -1)) & (centre > at(1, 1)))
    maximum = np.where(horizontal, keep_h, np.where(vertical, keep_v, keep_d & diagonal))
    candidate = (centre > low) & maximum
    strong = candidate & (centre > high)

    labels, count = ndimage.label(candidate, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros((h, w), np.uint8)
    has_strong = np.zeros(count + 1, dtype=bool)
    has_strong[labels[strong]] = True
    has_strong[0] = False
    return np.where(has_strong[labels], np.uint8(255), np.uint8(0))
