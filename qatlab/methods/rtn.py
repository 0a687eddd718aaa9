"""RTN: post-training round-to-nearest with MinMax scales. The baseline every table needs."""

from qatlab.methods.base import QuantMethod
from qatlab.methods.registry import register_method


@register_method("rtn")
class RTN(QuantMethod):
    """convert() is the whole method: fake-quant every targeted Linear, no training."""

    trains = False
