"""Update codecs: what crosses the wire between clients and server."""

from lightning_fed.codecs.base import Codec, DecodeArgs, EncodeArgs, Identity
from lightning_fed.codecs.blockwise import Blockwise4bit, Blockwise8bit
from lightning_fed.codecs.cast import Cast
from lightning_fed.codecs.differential import Differential
from lightning_fed.codecs.downlink_delta import DownlinkDelta
from lightning_fed.codecs.powersgd import PowerSGD
from lightning_fed.codecs.qsgd import QSGD
from lightning_fed.codecs.randk import RandomK
from lightning_fed.codecs.sign import Sign
from lightning_fed.codecs.tcs import TimeCorrelatedTopK
from lightning_fed.codecs.topk import TopK
from lightning_fed.codecs.vector import ValueCodec, VectorCodec
from lightning_fed.codecs.wire import MalformedMessage

__all__ = ["Codec", "DecodeArgs", "EncodeArgs", "Identity", "MalformedMessage"]
__all__ += [
    "QSGD", "Blockwise4bit", "Blockwise8bit", "Cast", "Differential", "DownlinkDelta", "PowerSGD", "RandomK", "Sign", "TimeCorrelatedTopK", "TopK", "ValueCodec", "VectorCodec",
]
