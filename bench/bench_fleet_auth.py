"""Cost of authenticating fleet messages: Ed25519 verify per ack, against its baselines.

Prints, per ack: the full inbox path of a genuine signed ack (decode + digest compare +
verify, `FleetInbox.ack`), Ed25519 verify alone, the decode alone (what an unsigned agent
pays), an HMAC-SHA256 verify (the rejected per-vehicle shared-secret alternative), the
SHA-256 of a 64 KiB batch (computed once per batch sent), the collector's signing cost,
and what a refused forgery costs. Also acks/s one core can verify, against the fleet-ack
rate the design measured (34.5k ev/s at 500 events per batch = ~69 acks/s).
Run: .venv/bin/python bench/bench_fleet_auth.py [--n 20000]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet import Ack, batch_digest
from agent.fleet_auth import FleetAuth, FleetSigner, ack_signed_bytes
from agent.fleet_inbox import FleetInbox

VEHICLE = "truck-0042"
ACKS_PER_SECOND_AT_DESIGN_RATE = 34_500 / 500  # docs: fleet ack 34.5k ev/s, 500 per batch


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Median of 5 runs of n calls, in CPU microseconds per call (process time: a loaded
    machine stretches wall time, much less the CPU time a call takes)."""
    runs = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            fn()
        runs.append((time.process_time() - start) / n * 1e6)
    return sorted(runs)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="calls per measurement")
    n = parser.parse_args().n
    logging.disable(logging.WARNING)  # the refused forgeries would log
    key = Ed25519PrivateKey.generate()
    signer = FleetSigner(key)
    batch = os.urandom(64 * 1024)
    digest = batch_digest(batch)
    ack = signer.sign_ack(VEHICLE, Ack(1 << 32 | 7, "events", 500, 0, digest, 1_700_000_000_000))
    wire = ack.encode()
    signed = ack_signed_bytes(VEHICLE, ack)
    public = key.public_key()
    inbox = FleetInbox(FleetAuth(VEHICLE, public), lambda _batch: digest)
    forged = Ack(ack.batch_id, "events", 500, 0, digest, 1, bytes(64)).encode()
    secret = os.urandom(32)
    tag = hmac.new(secret, signed, hashlib.sha256).digest()
    figures = {
        "inbox path, genuine signed ack (decode+digest+verify)": per_call_us(
            lambda: inbox.ack(wire, 0.0), n
        ),
        "Ed25519 verify alone": per_call_us(lambda: public.verify(ack.signature, signed), n),
        "decode alone (unsigned lab mode)": per_call_us(lambda: Ack.decode(wire), n),
        "HMAC-SHA256 verify (rejected alternative)": per_call_us(
            lambda: hmac.compare_digest(hmac.new(secret, signed, hashlib.sha256).digest(), tag),
            n,
        ),
        "SHA-256 of a 64 KiB batch (once per batch sent)": per_call_us(
            lambda: batch_digest(batch), n // 10
        ),
        "collector: sign one ack": per_call_us(
            lambda: signer.sign_ack(VEHICLE, Ack(1, "events", 500, 0, digest, 1)), n
        ),
        "forged ack refused (bad signature)": per_call_us(lambda: inbox.ack(forged, 0.0), n),
    }
    print(f"load average {os.getloadavg()[0]:.2f} (2 cores shared: compare ratios)")
    for name, us in figures.items():
        print(f"{name:<56} {us:8.1f} us")
    full = figures["inbox path, genuine signed ack (decode+digest+verify)"]
    plain = figures["decode alone (unsigned lab mode)"]
    print(f"signed / unsigned ack handling: {full / plain:.1f}x; one core verifies "
          f"{1e6 / full:,.0f} acks/s, {1e6 / full / ACKS_PER_SECOND_AT_DESIGN_RATE:,.0f}x the "
          f"design's fleet-ack rate (~{ACKS_PER_SECOND_AT_DESIGN_RATE:.0f} acks/s): "
          f"{full * ACKS_PER_SECOND_AT_DESIGN_RATE / 1e4:.2f} % of a core")  # fmt: skip


if __name__ == "__main__":
    main()
