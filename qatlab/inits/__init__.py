"""One-time inits between conversion and training (conf/init/*.yaml): clip search, GPTQ, SVID."""

from qatlab.inits.base import Init
from qatlab.inits.clip import ClipSearch
from qatlab.inits.gptq import GPTQ
from qatlab.inits.svid import SVID

__all__ = ["Init", "ClipSearch", "GPTQ", "SVID"]
