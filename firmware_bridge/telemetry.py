"""Realistic vehicle telemetry for `ironfleet-sim --profile vehicle` and the wire benchmarks.

The default simulator traffic is a counter and a uniform random float per event: fine for
proving that nothing is lost, useless for measuring what an encoding saves, since random
floats do not compress and real signals do. A vehicle's controllers report slowly moving
physical quantities at sensor precision: a GNSS fix (latitude and longitude to 1e-6
degrees, heading, satellites), speed, engine figures and a status word that rarely
changes. `VehicleModel` integrates a simple drive (accelerate, cruise, brake, idle) so
consecutive samples are correlated the way they are on a truck, from a seeded RNG so a
benchmark's input is the same on every run.
"""

from __future__ import annotations

import math
import random
from typing import Final

from firmware_bridge.protocol import Scalar

# The four stream families of a convoy vehicle, in the order streams are assigned.
FAMILIES: Final = ("position", "speed", "engine", "status")
_MODES: Final = ("idle", "drive", "drive", "drive", "halt")


class VehicleModel:
    """One vehicle's drive, sampled per stream family. Deterministic for a given seed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lat = 48.0 + rng.uniform(-1.0, 1.0)
        self.lon = 11.0 + rng.uniform(-1.0, 1.0)
        self.heading = rng.uniform(0.0, 360.0)
        self.speed = 0.0  # m/s
        self.target = 0.0
        self.rpm = 750.0
        self.coolant = 40.0
        self.fuel = rng.uniform(40.0, 95.0)
        self.odometer = rng.uniform(1e4, 3e5)  # km
        self.mode = "idle"
        self.faults = 0
        self.t = 0.0

    def step(self, dt: float) -> None:
        """Advance the drive by `dt` seconds."""
        rng = self.rng
        self.t += dt
        if rng.random() < dt / 30.0:  # a new driving phase about every 30 s
            self.mode = rng.choice(_MODES)
            self.target = {"idle": 0.0, "halt": 0.0}.get(self.mode, rng.uniform(8.0, 25.0))
        accel = max(-3.0, min(1.5, (self.target - self.speed) * 0.3))
        self.speed = max(0.0, self.speed + accel * dt)
        self.heading = (self.heading + rng.gauss(0.0, 2.0) * dt) % 360.0
        metres = self.speed * dt
        rad = math.radians(self.heading)
        self.lat += metres * math.cos(rad) / 111_320.0
        self.lon += metres * math.sin(rad) / (111_320.0 * math.cos(math.radians(self.lat)))
        self.odometer += metres / 1000.0
        self.rpm = 750.0 + self.speed * 70.0 + rng.gauss(0.0, 15.0)
        self.coolant = min(92.0, self.coolant + dt * 0.05) + rng.gauss(0.0, 0.05)
        self.fuel = max(0.0, self.fuel - self.speed * dt * 1e-5)
        if rng.random() < dt / 600.0:
            self.faults ^= 1 << rng.randrange(8)

    def sample(self, family: str) -> dict[str, Scalar]:
        """The signals of one event of `family` (one of FAMILIES) at the current instant."""
        rng = self.rng
        if family == "position":
            return {
                "lat": round(self.lat, 6),
                "lon": round(self.lon, 6),
                "alt": round(520.0 + rng.gauss(0.0, 0.4), 1),
                "hdg": round(self.heading, 1),
                "sats": 9 + rng.randrange(4),
                "hdop": round(0.8 + rng.random() * 0.3, 1),
            }
        if family == "speed":
            return {"kmh": round(self.speed * 3.6, 1), "odo": round(self.odometer, 2)}
        if family == "engine":
            return {
                "rpm": int(self.rpm),
                "coolant": round(self.coolant, 1),
                "oil_kpa": int(280 + self.rpm / 20),
                "fuel": round(self.fuel, 1),
                "load": int(min(100.0, 15.0 + self.speed * 2.5)),
            }
        return {"mode": self.mode, "ign": self.mode != "halt", "faults": self.faults}


# Sample rates of the families in ticks of 0.1 s: 10, 10, 5 and 1 Hz.
EVERY: Final = {"position": 1, "speed": 1, "engine": 2, "status": 10}


def drive(
    count: int, seed: int = 7, per_family: int = 1, prefix: str = "ecu0"
) -> list[tuple[str, int, float, dict[str, Scalar]]]:
    """`count` events (stream, seq, ts, signals) of one vehicle sampled at EVERY's rates,
    `per_family` streams of each family (`<prefix>/<family><k>`): the benchmarks' and
    tests' realistic input. Timestamps are wall-clock seconds at microsecond precision
    with a little jitter, as a controller with a synced clock stamps them."""
    rng = random.Random(seed)
    model = VehicleModel(rng)
    seqs: dict[str, int] = {}
    out: list[tuple[str, int, float, dict[str, Scalar]]] = []
    t, tick = 1_764_000_000.0, 0
    while len(out) < count:
        tick += 1
        model.step(0.1)
        t = round(t + 0.1 + rng.gauss(0.0, 0.002), 6)
        for family in FAMILIES:
            if tick % EVERY[family]:
                continue
            for k in range(per_family):
                stream = f"{prefix}/{family}{k}"
                seqs[stream] = seqs.get(stream, 0) + 1
                out.append((stream, seqs[stream], round(t + k * 1e-3, 6), model.sample(family)))
    return out[:count]
