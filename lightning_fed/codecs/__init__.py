"""Update codecs: what crosses the wire between clients and server."""

from lightning_fed.codecs.base import Codec, Identity
from lightning_fed.codecs.wire import MalformedMessage

__all__ = ["Codec", "Identity", "MalformedMessage"]
