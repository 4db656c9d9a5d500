"""Privacy protocols: secure aggregation (SecAgg+) and the secret sharing it uses."""

from lightning_fed.privacy.secagg import ProtocolViolation, SecAggAborted, SecAggServer

__all__ = ["ProtocolViolation", "SecAggAborted", "SecAggServer"]
