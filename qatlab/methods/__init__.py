"""Method plugins. Importing this package registers every built-in method."""

from qatlab.methods.base import QuantMethod
from qatlab.methods.registry import METHODS, build_method, register_method

# Registration happens on import; keep one line per built-in method.
from qatlab.methods import kd, rtn  # noqa: E402,F401
from qatlab.methods import bitdistiller  # noqa: E402,F401
from qatlab.methods import llm_qat  # noqa: E402,F401
from qatlab.methods import zeroquant  # noqa: E402,F401
from qatlab.methods import onebit  # noqa: E402,F401
from qatlab.methods import gptq  # noqa: E402,F401

__all__ = ["METHODS", "QuantMethod", "build_method", "register_method"]
