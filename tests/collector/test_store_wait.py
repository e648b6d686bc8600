"""A collector started while its database is unreachable keeps trying for `--store-wait`
seconds (PostgreSQL restarting, the network not up yet), saying so, then gives up with
the reason and exit 1: it neither dies at once nor hangs."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

COLLECTOR = Path(sys.executable).with_name("ironfleet-collector")


def test_an_unreachable_database_is_retried_then_refused() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run(
        [str(COLLECTOR), "run", "--unsigned", "--broker", "127.0.0.1:1", "--store-wait", "1.5",
         "--db", f"postgresql://ironfleet@127.0.0.1:{port}/fleet"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "cannot connect to PostgreSQL" in res.stderr
    assert res.stdout.count("collector_store_unavailable") >= 2, res.stdout  # the log
