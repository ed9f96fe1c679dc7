"""In-process simulation of many devices over the real coordinator core and edge client code."""

from .engine import PROFILES, SimClient, SimConfig, SimResult, run_simulation

__all__ = ["PROFILES", "SimClient", "SimConfig", "SimResult", "run_simulation"]
