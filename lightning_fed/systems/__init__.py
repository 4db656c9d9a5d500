"""Devices, networks and time: client profiles and a deterministic simulated clock (see docs/systems.md)."""

from lightning_fed.systems.clock import SimulatedClock, Workload
from lightning_fed.systems.profiles import PRESETS, ClientProfiles, Profile

__all__ = ["PRESETS", "ClientProfiles", "Profile", "SimulatedClock", "Workload"]
