"""QuantConfig: the grid one quantizer (weights or activations) maps values onto, validated up front.

It says WHAT grid (bits, symmetric or not, full or restricted range, int or NF codebook, which
elements share a scale); the quantizer module (qatlab.quantizers) says HOW its qparams are found
(MinMax every forward, learned LSQ steps, ParetoQ's SEQ, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Mapping

from qatlab.errors import QatlabError, require

GRANULARITIES = ("tensor", "channel", "group", "token", "chunks")
GRIDS = ("int", "nf")
RANGES = ("restricted", "full")
STES = ("clipped", "identity")
ROUNDINGS = ("half_even", "half_away")
NF_BITS = (2, 3, 4)  # normal-float codebooks (qatlab.quantizers.nf_grid) exist for these widths


@dataclass(frozen=True)
class QuantConfig:
    """One quantizer's settings.

    granularity (which elements share one scale; always reduced along the last dim):
      tensor  - one scale for the whole tensor
      channel - one per row: per output channel for a weight (out, in), per token for activations
      token   - alias of channel, reads better for activations
      group   - one per `group_size` consecutive elements of a row
      chunks  - `num_groups` equal chunks of the FLATTENED tensor (DeepSpeed's quantize_groups, which ZeroQuant's
                reference uses: 64 groups of a 4096 x 4096 weight are 64 rows each)

    range (symmetric int grids of 2+ bits):
      restricted - codes -(2^(b-1)-1)..2^(b-1)-1, symmetric around 0 (LLM-QAT). At 2 bits: TERNARY {-1, 0, 1}.
      full       - codes -2^(b-1)..2^(b-1)-1, the 2^b codes engines store (GGUF Q4_0/Q8_0,
                   compressed-tensors, ZeroQuant's reference). At 2 bits: 4 levels {-2, -1, 0, 1}.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: str = "group"
    group_size: int | None = 128
    num_groups: int | None = None  # granularity=chunks: how many chunks share the tensor
    grid: str = "int"  # int: evenly spaced codes; nf: normal-float codebook (see qatlab.quantizers.nf_grid)
    range: str = "restricted"  # symmetric int grids: restricted (-qmax..qmax) | full (-2^(b-1)..2^(b-1)-1)
    # The straight-through gradient of MinMax fake quantization (learned quantizers define their own):
    ste: str = "clipped"  # clipped: zero where the clamp changed x | identity: pass everywhere (DeepSpeed/ZeroQuant)
    grad_clip: float | None = None  # also zero it where |x| >= grad_clip (LLM-QAT's reference: 2.0)
    rounding: str = "half_even"  # half_even: torch.round | half_away: sign(x) floor(|x| + 0.5) (BitDistiller's Round)
    widen: bool = True  # asymmetric MinMax: widen [min, max] to include 0 (GPTQ, qatlab) | false: the group's own
                        # min and max (BitDistiller, EfficientQAT)
    name: str = field(default="weight", compare=False)  # only used to prefix error messages

    def __post_init__(self) -> None:
        n = self.name
        require(
            isinstance(self.bits, int) and not isinstance(self.bits, bool),
            f"{n}.bits={self.bits!r} must be an integer; use 1-8",
        )
        require(
            1 <= self.bits <= 8,
            f"{n}.bits={self.bits} is out of range; use 1-8 "
            f"(to leave it unquantized, set {n} to null instead of a bit width)",
        )
        require(
            isinstance(self.symmetric, bool),
            f"{n}.symmetric={self.symmetric!r} must be true or false",
        )
        require(
            self.granularity in GRANULARITIES,
            f"{n}.granularity={self.granularity!r} is not supported; use one of {', '.join(GRANULARITIES)}",
        )
        self._check_group_size()
        require(self.grid in GRIDS, f"{n}.grid={self.grid!r} is not supported; use one of {', '.join(GRIDS)}")
        require(self.ste in STES, f"{n}.ste={self.ste!r} is not supported; use one of {', '.join(STES)}")
        g = self.grad_clip
        require(g is None or (isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g > 0),
                f"{n}.grad_clip={g!r} must be a positive number (|x| at or beyond it gets no gradient) or null")
        require(self.rounding in ROUNDINGS, f"{n}.rounding={self.rounding!r} is not supported; use one of {', '.join(ROUNDINGS)}")
        require(isinstance(self.widen, bool), f"{n}.widen={self.widen!r} must be true or false")
        require(self.range in RANGES, f"{n}.range={self.range!r} is not supported; use one of {', '.join(RANGES)}")
        require(
            self.range == "restricted" or (self.symmetric and self.grid == "int" and self.bits >= 2),
            f"{n}.range=full applies to symmetric int grids of 2+ bits; remove it (or set symmetric: true, grid: int)",
        )
        require(
            self.grid != "nf" or self.bits in NF_BITS,
            f"{n}.bits={self.bits} has no normal-float codebook; use bits 2-4 with grid=nf, or grid=int",
        )

    def _check_group_size(self) -> None:
        if self.granularity != "chunks":
            object.__setattr__(self, "num_groups", None)
        else:
            g = self.num_groups
            require(isinstance(g, int) and not isinstance(g, bool) and g > 0,
                    f"{self.name}.num_groups={g!r} must be a positive integer when granularity=chunks (e.g. 64)")
        if self.granularity != "group":
            object.__setattr__(self, "group_size", None)  # ignored, so don't let it affect equality
            return
        g = self.group_size
        require(
            isinstance(g, int) and not isinstance(g, bool) and g > 0,
            f"{self.name}.group_size={g!r} must be a positive integer when granularity=group "
            f"(e.g. 128), or use granularity=channel",
        )

    @property
    def binary(self) -> bool:
        """1-bit symmetric: codes 0/1 stand for -s/+s."""
        return self.bits == 1 and self.symmetric

    @property
    def nf(self) -> bool:
        """Normal-float grid: codes are indices 0..2^bits-1 into the codebook."""
        return self.grid == "nf"

    @property
    def full_range(self) -> bool:
        """A symmetric int grid with all 2^bits codes (one more negative code than positive)."""
        return self.symmetric and not self.binary and not self.nf and self.range == "full"

    @property
    def ternary(self) -> bool:
        """Symmetric restricted 2-bit: three levels {-s, 0, s}, not four."""
        return self.bits == 2 and self.symmetric and not self.nf and not self.full_range

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if self.full_range:
            return -(2 ** (self.bits - 1))
        if self.symmetric and not self.binary and not self.nf:
            return -self.qmax
        return 0

    @property
    def qmax(self) -> int:
        """Largest integer code (restricted range when symmetric: -qmax..qmax; NF: the last index)."""
        if self.nf:
            return 2**self.bits - 1
        if self.binary:
            return 1
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    @property
    def levels(self) -> int:
        """How many distinct values the grid has (ternary: 3)."""
        return self.qmax - self.qmin + 1

    def describe(self) -> str:
        """Short label like '4-bit sym group128' for reprs and logs."""
        kind = "sym" if self.symmetric else "asym"
        if self.nf:
            kind += " nf"
        elif self.ternary:
            kind += " ternary"
        elif self.full_range:
            kind += " full"
        gran = {"group": f"group{self.group_size}", "chunks": f"{self.num_groups} chunks"}.get(self.granularity,
                                                                                              self.granularity)
        return f"{self.bits}-bit {kind} {gran}"

    def storage_bits(self, rows: int, width: int) -> int:
        """Bits to store a (rows, width) weight at this setting: the codes plus fp16 scales (and zero
        points when asymmetric; NF's asymmetric form stores two half-scales instead, same count)."""
        per_row = {"group": width // self.group_size if self.group_size else 1, "channel": 1, "token": 1}
        scales = {"tensor": 1, "chunks": self.num_groups}.get(self.granularity) or rows * per_row[self.granularity]
        params_per_scale = 1 if self.symmetric or self.binary else 2
        return rows * width * self.bits + scales * params_per_scale * 16

    def check_numel(self, numel: int, layer: str = "") -> None:
        """Fail early when num_groups does not divide a tensor of `numel` elements (granularity=chunks)."""
        where = f" of layer '{layer}'" if layer else ""
        require(self.granularity != "chunks" or numel % self.num_groups == 0,
                f"{self.name}.num_groups={self.num_groups} does not divide the {numel} weights{where}; choose a divisor")

    def check_width(self, width: int, layer: str = "") -> None:
        """Fail early when group_size does not divide a row of length `width`."""
        if self.granularity != "group" or width % self.group_size == 0:
            return
        where = f" of layer '{layer}'" if layer else ""
        hints = ", ".join(str(d) for d in _divisors_near(width, self.group_size))
        raise QatlabError(
            f"{self.name}.group_size={self.group_size} does not divide the input width {width}{where}; "
            f"choose a group size that divides it (e.g. {hints}) or granularity=channel"
        )

    @classmethod
    def from_dict(cls, d: Mapping | None, name: str) -> QuantConfig | None:
        """Build from a config mapping; None (null in YAML) means 'not quantized' and returns None.

        Any bit width outside 1-8 is an error, 16 included: a typo must never leave layers in full
        precision while the results row still names a bit width."""
        if d is None:
            return None
        require(isinstance(d, Mapping), f"{name}={d!r} must be a mapping of quantizer keys (bits, ...) or null")
        d = {k: d[k] for k in d}
        valid = [f.name for f in fields(cls) if f.name != "name"]
        unknown = sorted(set(d) - set(valid))
        require(not unknown, f"{name}: unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**d, name=name)

    def to_dict(self) -> dict:
        """The keyword form from_dict takes (no name)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


def _divisors_near(width: int, target: int, count: int = 3) -> list[int]:
    """The `count` divisors of width closest to target (by ratio), ascending."""
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    divisors.sort(key=lambda d: abs(math.log(d / target)))
    return sorted(divisors[:count])
