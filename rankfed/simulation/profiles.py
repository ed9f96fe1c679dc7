"""Device profiles of simulated devices: the capability each reports at Join."""

from __future__ import annotations

from rankfed.protocol import Capability, DeviceClass

GB = 1_000_000_000

# Device profiles: capabilities that the coordinator's default rank tiers
# (deploy/coordinator.example.toml) map to ranks 16, 8, 8, 4 and 2.
PROFILES: dict[str, Capability] = {
    "cuda-large": Capability(DeviceClass.CUDA, 64 * GB, 48 * GB, 16, 20_000.0, 12.5e6, 50e6, "simulated A100", 40 * GB),
    "cuda": Capability(DeviceClass.CUDA, 32 * GB, 24 * GB, 8, 8_000.0, 12.5e6, 50e6, "simulated laptop GPU", 8 * GB),
    "cpu-fast": Capability(DeviceClass.CPU, 16 * GB, 8 * GB, 8, 120.0, 5e6, 25e6),
    "cpu": Capability(DeviceClass.CPU, 8 * GB, 4 * GB, 4, 30.0, 2.5e6, 12.5e6),
    "mobile": Capability(DeviceClass.MOBILE, 6 * GB, 2 * GB, 8, 15.0, 1e6, 5e6),
}
# The rank each profile gets under the default tiers with lora.max_rank = 16.
PROFILE_RANK = {"cuda-large": 16, "cuda": 8, "cpu-fast": 8, "cpu": 4, "mobile": 2}
RANK_PROFILE = {16: "cuda-large", 8: "cuda", 4: "cpu", 2: "mobile"}
