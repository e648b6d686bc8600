"""Running a click command as every IronFleet entry point does: one definition of the
exit status, in the lowest package (`agent` and `fleet` import `firmware_bridge`, never
the reverse), so `ironfleet-sim`, `ironfleet-agent` and `ironfleet-collector` answer a
usage error, `--help` and Ctrl-C alike."""

from __future__ import annotations

from collections.abc import Sequence

import click


def run_click(command: click.Command, argv: Sequence[str] | None, prog: str) -> int:
    """`command` on `argv` (None: sys.argv[1:]) as `prog`: its exit status; a usage error
    is shown as click's standalone mode would and returns 2; `--help` and `--version`
    return 0. Never raises SystemExit, so in-process callers (tests) get the status."""
    try:
        code = command.main(args=list(argv) if argv is not None else None, prog_name=prog,
                            standalone_mode=False)  # fmt: skip
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:  # Ctrl-C outside a command's own handler
        return 1
    return code if isinstance(code, int) else 0
