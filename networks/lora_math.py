"""Re-factoring LoRA updates: exact sums, truncated SVD, and the rank rules of kohya's LoRA tools.

ΔW = U S Vh. Keeping the r largest singular values gives the closest rank-r matrix in Frobenius norm
(Eckart-Young), which is what resize_lora, svd_merge_lora and extract_lora_from_models write. What is kept is
reported as kohya does:
- fro retained = sqrt(sum_{i<r} S_i^2 / sum S_i^2): the Frobenius norm kept (its square is the energy kept);
- sum(S) retained = sum_{i<r} S_i / sum S_i;
- max(S) ratio = S_0 / S_{r-1}.

A LoRA's ΔW, and a weighted sum of several, is a product of thin factors A @ B (A = the ups side by side, B = the
downs stacked). Its exact SVD needs no full matrix: with A = Qa Ra and B^T = Qb Rb (QR), A @ B = Qa (Ra Rb^T) Qb^T,
and the small core Ra Rb^T (at most rank x rank) has the same singular values. This is faster and more accurate
than an SVD of the full [out, in * kh * kw] delta, so it is used wherever the input is LoRA factors; only
extraction from two models takes the SVD of a full difference matrix.

Factors come out as kohya writes them: up = U S / scale, down = Vh, alpha = scale * rank (so ΔW = up @ down *
alpha / rank), conv factors reshaped to [out, r, 1, 1] / [r, in, kh, kw].
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

import torch

from networks.lora_files import LoRAFactors, LoRAFileError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    rank: int
    sum_retained: float
    fro_retained: float
    max_ratio: float


@dataclass(frozen=True)
class DeltaSVD:
    """The thin SVD of one module's ΔW (flattened to [out, in * kh * kw]); S descending."""

    U: torch.Tensor  # [out, k]
    S: torch.Tensor  # [k]
    Vh: torch.Tensor  # [k, in * kh * kw]
    weight_shape: tuple[int, ...]

    @property
    def full_rank(self) -> int:
        """How many singular values there are: min(out, in * kh * kw, rank of the factors)."""
        return self.S.shape[0]

    def retention(self, rank: int) -> Retention:
        S = self.S.double()
        total, total_sq = float(S.sum()), float(S.pow(2).sum())
        if total == 0.0:
            return Retention(rank, 1.0, 1.0, 1.0)  # nothing to lose: an all-zero update
        kept_sq = float(S[:rank].pow(2).sum())
        smallest = float(S[rank - 1])
        return Retention(rank, float(S[:rank].sum()) / total, math.sqrt(kept_sq / total_sq),
                         float(S[0]) / smallest if smallest > 0 else math.inf)

    def factors(self, rank: int, *, scale: float = 1.0, clamp_quantile: float | None = None) -> LoRAFactors:
        """The best rank-`rank` LoRA of this ΔW with alpha / rank = `scale` (up = U S / scale, down = Vh)."""
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank {rank} outside 1..{self.full_rank}")
        up = self.U[:, :rank] * (self.S[:rank] / scale)
        down = self.Vh[:rank]
        if clamp_quantile is not None and clamp_quantile < 1.0:
            up, down = clamp_symmetric(up, down, clamp_quantile)
        up, down = up.float().cpu().contiguous(), down.float().cpu().contiguous()
        out, *in_shape = self.weight_shape
        if len(in_shape) == 3:  # conv: the kernel lives in down, up is 1x1
            up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *in_shape)
        return LoRAFactors(down, up, float(scale * rank))


def svd_of_factors(terms: list[tuple[LoRAFactors, float]], device: torch.device | str | None = None) -> DeltaSVD:
    """Exact thin SVD of sum_i weight_i * ΔW_i (float64), without forming the full matrix (see module doc)."""
    first = terms[0][0]
    A = torch.cat([f.up.to(device=device, dtype=torch.float64).flatten(1) * (w * f.scale) for f, w in terms], dim=1)
    B = torch.cat([f.down.to(device=device, dtype=torch.float64).flatten(1) for f, _ in terms], dim=0)
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(B.T)
    Uc, S, Vhc = torch.linalg.svd(Ra @ Rb.T, full_matrices=False)
    return DeltaSVD(Qa @ Uc, S, Vhc @ Qb.T, first.weight_shape)


def svd_of_matrix(delta: torch.Tensor, device: torch.device | str | None = None) -> DeltaSVD:
    """Thin SVD of a full ΔW (fp32, as kohya's extraction), e.g. tuned - original."""
    U, S, Vh = torch.linalg.svd(delta.to(device=device, dtype=torch.float32).flatten(1), full_matrices=False)
    return DeltaSVD(U, S, Vh, tuple(delta.shape))


def concat_factors(terms: list[tuple[LoRAFactors, float]]) -> LoRAFactors:
    """sum_i ratio_i * ΔW_i exactly, as one LoRA of rank sum_i r_i (merge_lora.py --concat). The first input's
    alpha / rank is kept, so its alpha grows with the rank; each term is rescaled to that scale."""
    scale = terms[0][0].scale
    parts = [f.times(ratio * f.scale / scale) for f, ratio in terms]
    rank = sum(p.rank for p in parts)
    return LoRAFactors(torch.cat([p.down.float() for p in parts], dim=0),
                       torch.cat([p.up.float() for p in parts], dim=1), scale * rank)


def quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile's linear interpolation, without its 16M-element limit (large conv deltas exceed it)."""
    flat = values.flatten().double().sort().values
    position = q * (flat.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, flat.numel() - 1)
    return float(flat[low] + (flat[high] - flat[low]) * (position - low))


def clamp_symmetric(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's --clamp_quantile: clip both factors' entries to +-h, h from the q-quantile of all their entries.
    h covers both tails (max of the q- and -(1-q)-quantiles), so q = 1 keeps everything; kohya's +-(q-quantile)
    clips the negative tail even at q = 1 when it is longer than the positive one."""
    values = torch.cat([up.flatten(), down.flatten()])
    hi = max(quantile(values, q), -quantile(values, 1.0 - q))
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


# ------------------------------------------------------------------------------------------------ rank rules


class DynamicMethod(enum.Enum):
    SV_RATIO = "sv_ratio"  # keep singular values >= S_max / param (param >= 1)
    SV_FRO = "sv_fro"  # smallest rank keeping >= param of the Frobenius norm (0 < param <= 1)
    SV_CUMULATIVE = "sv_cumulative"  # smallest rank keeping >= param of sum(S) (0 < param <= 1)


@dataclass(frozen=True)
class RankRule:
    """How many singular values a module keeps: `max_rank`, or fewer by a dynamic method (kohya's
    --new_rank is then the hard limit)."""

    max_rank: int
    method: DynamicMethod | None = None
    param: float | None = None

    def rank_for(self, S: torch.Tensor) -> int:
        """The smallest rank that meets the rule, at least 1 and at most max_rank and len(S).

        (kohya adds 1 twice when turning its index into a rank, so its dynamic resize keeps one singular value
        more than its rule asks; here the rank is exactly the smallest that meets the rule.)"""
        S = S.double()
        limit = min(self.max_rank, S.shape[0])
        if self.method is None or float(S.sum()) == 0.0:
            return max(1, limit)
        if self.method is DynamicMethod.SV_RATIO:
            rank = int((S >= S[0] / self.param).sum())
        else:
            values = S.pow(2) if self.method is DynamicMethod.SV_FRO else S
            target = self.param ** 2 if self.method is DynamicMethod.SV_FRO else self.param
            cumulative = torch.cumsum(values, 0) / values.sum()
            # A hair of tolerance, so that param = 1.0 is met by the full rank despite rounding.
            rank = int(torch.searchsorted(cumulative, torch.tensor(target - 1e-12, dtype=cumulative.dtype))) + 1
        return max(1, min(rank, limit))


def rank_rule(new_rank: int, method: str | None, param: float | None, *, flag: str = "--new_rank") -> RankRule:
    """Checked RankRule from kohya's flags (--new_rank / --dynamic_method / --dynamic_param)."""
    if new_rank is None or new_rank < 1:
        raise LoRAFileError(f"{flag} {new_rank}: the rank must be at least 1")
    if method is None:
        if param is not None:
            raise LoRAFileError("--dynamic_param needs --dynamic_method (sv_ratio, sv_fro or sv_cumulative)")
        return RankRule(new_rank)
    dynamic = DynamicMethod(method)
    if param is None:
        raise LoRAFileError(f"--dynamic_method {method} needs --dynamic_param (the target of the method)")
    if dynamic is DynamicMethod.SV_RATIO and not param >= 1.0:
        raise LoRAFileError(f"--dynamic_param {param}: sv_ratio keeps singular values >= S_max / param, so param "
                            "must be >= 1 (e.g. 2 .. 20)")
    if dynamic is not DynamicMethod.SV_RATIO and not 0.0 < param <= 1.0:
        raise LoRAFileError(f"--dynamic_param {param}: {method} is the fraction to retain, in (0, 1] (e.g. 0.9)")
    return RankRule(new_rank, dynamic, param)


def check_rank_fits(flag: str, requested: int, limits: dict[str, int]) -> None:
    """A requested rank must fit some layer: each layer's rank is at most min(out, in * kh * kw), and a layer
    below the request is capped at its limit (kohya does that too). A request above every limit is a mistake."""
    if not limits:
        return
    largest = max(limits.values())
    if requested > largest:
        example = max(limits, key=limits.get)
        raise LoRAFileError(f"{flag} {requested} is larger than any layer here allows: a layer's rank is at most "
                            f"min(out, in x kh x kw), and the largest such limit is {largest} ({example}). Use "
                            f"{flag} {largest} or less for a full-rank result.")
    capped = sorted(name for name, limit in limits.items() if limit < requested)
    if capped:
        logger.info("%s %d: %d module(s) are smaller and keep their full rank instead (e.g. %s: %d)", flag, requested,
                    len(capped), capped[0], limits[capped[0]])
