"""`ironfleet`: the technician's read-only view of the agent and its event store.

Every command opens the store with `agent.store.connect(readonly=True)` (`mode=ro` plus
`query_only`: it can neither write nor take the write lock), reads what it needs inside
one short transaction under a deadline (`--timeout`), closes the connection, and only then
prints. A reader never holds a transaction across output, so it never holds back the
daemon's WAL checkpoints (DESIGN.md invariant 12 and "Readers must be brief").

Live values (serial link, uplink, breaker, counters) come from the daemon's live snapshot
(`agent.livestate`), which it rewrites about once a second; its heartbeat dates them and
every view shows its age, so a stale picture is obvious.

This module holds the click commands, which only parse, call and format. Guarded access
to the database is in `agent.cliaccess`, reading and shaping data in `agent.views`, the
checks of `doctor` in `agent.doctor`, and the text each command prints in `agent.clitext`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import click
from click.core import ParameterSource

from agent import config as config_mod
from agent.cliaccess import DEFAULT_TIMEOUT, LIMIT, TIMEOUT, CliError, FiniteFloatRange, reading
from agent.clitext import (
    EVENT_HEADERS,
    breaker_text,
    checkpoints_text,
    cut_note,
    doctor_text,
    event_line,
    events_rows,
    export_summary,
    export_text,
    gaps_text,
    link_text,
    more_note,
    plan_text,
    query_text,
    replay_text,
    shed_text,
    status_text,
    streams_text,
)
from agent.config import Config
from agent.doctor import doctor_checks
from agent.errors import AgentError, ConfigError
from agent.export import (
    CHUNK_EVENTS,
    EXPORT_NICE,
    MAX_CHUNK_EVENTS,
    export_bundle,
    plan,
)
from agent.filecheck import SYSTEMD_CREDENTIALS
from agent.fleet_auth import FleetAuth, key_fingerprint, load_fleet_auth, load_private_key
from agent.pages import PAGE_ROWS, Page, read_checkpoints, read_replay, read_streams
from agent.readsafe import limit_process_heap
from agent.receipts import (
    MAX_LEDGERS,
    exports_text,
    exports_view,
    prune_ledgers,
    queue_receipt,
    receipt_text,
)
from agent.render import echo_hint, emit, json_text, table
from agent.store import read_cursor
from agent.storedb import EXPORTS_DIR
from agent.version import DISTRIBUTION
from agent.views import (
    FOLLOW_BATCH,
    EventFilter,
    Row,
    parse_when,
    read_breaker,
    read_events,
    read_events_after,
    read_fleet,
    read_gap_summary,
    read_gaps,
    read_link,
    read_shed,
    read_shed_totals,
    read_status,
    run_query,
)

DEFAULT_CONFIG: Final = "/etc/ironfleet/agent.toml"
DB_ENV: Final = "IRONFLEET_DB"
FOLLOW_INTERVAL: Final = 0.5  # seconds between two polls of `events --follow`

T = TypeVar("T")


# -- command line -------------------------------------------------------------------------


@dataclass
class Options:
    """Global options: where the database and the configuration are, read deadline."""

    db: str | None
    db_source: str
    config_path: str
    timeout: float

    def config(self) -> Config:
        """The configuration file, loaded and validated; raises ConfigError."""
        return config_mod.load(self.config_path)

    def database(self, must_exist: bool = True) -> Path:
        """The database path from --db, IRONFLEET_DB, or the configuration's state_dir."""
        if self.db:
            path, source = Path(self.db).absolute(), self.db_source
        else:
            try:
                path = self.config().database
            except ConfigError as exc:
                raise CliError(
                    f"cannot locate the database ({exc}): pass --db PATH or --config FILE"
                ) from None
            source = f"[agent] state_dir in {self.config_path}"
            path = path.absolute()
        if must_exist:
            try:
                path.stat()
            except FileNotFoundError:
                raise CliError(
                    f"no database at {path} (from {source}): pass --db PATH (or set {DB_ENV}), "
                    "or --config FILE whose [agent] state_dir holds agent.db"
                ) from None
            except PermissionError:
                raise CliError(
                    f"permission denied reading {path}: technicians need the 'ironfleet' group"
                ) from None
        return path

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one short read transaction on the database, then close it."""
        with reading(self.database(), self.timeout) as conn:
            return fn(conn)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The --json flag every command has."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--db",
    envvar=DB_ENV,
    type=click.Path(dir_okay=False),
    help=f"Agent database (default: [agent] state_dir/agent.db of --config; env {DB_ENV}).",
)
@click.option(
    "--config",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Agent configuration file.",
)
@click.option(
    "--timeout",
    default=DEFAULT_TIMEOUT,
    show_default=True,
    type=TIMEOUT,
    help="Stop any database read after this many seconds.",
)
@click.version_option(package_name=DISTRIBUTION, prog_name="ironfleet")
@click.pass_context
def cli(ctx: click.Context, db: str | None, config_path: str, timeout: float) -> None:
    """Read-only view of the IronFleet agent: link, buffer, fleet acks, breaker, gaps.

    Every command reads the agent's database read-only and briefly; the agent never
    waits for it. Add --json to any command for machine-readable output.
    """
    source = "--db"
    if ctx.get_parameter_source("db") is ParameterSource.ENVIRONMENT:
        source = DB_ENV
    ctx.obj = Options(db, source, config_path, timeout)


@cli.command()
@json_option
@click.pass_obj
def status(opts: Options, as_json: bool) -> None:
    """Is the agent alive, how much is buffered, when did the fleet last acknowledge."""
    now = time.time()
    path = opts.database()
    data = opts.read(lambda conn: read_status(conn, path, now))
    emit(data, as_json, lambda: status_text(data))


def page_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--after and --limit of the listings that have one row per stream."""
    f = click.option("--limit", default=PAGE_ROWS, show_default=True, type=LIMIT,
                     help="Streams shown (one page).")(f)  # fmt: skip
    return click.option("--after", default="", metavar="NAME",
                        help="Start after this stream name (the next page).")(f)  # fmt: skip


def emit_page(command: str, page: Page, limit: int, as_json: bool, text: Callable[[], str]) -> None:
    """A page as a table or a JSON array, then how to get the next page if there is one."""
    emit(page.rows, as_json, text)
    if page.next_after is not None:
        echo_hint(more_note(command, page, limit), as_json)


@cli.command()
@page_options
@json_option
@click.pass_obj
def streams(opts: Options, after: str, limit: int, as_json: bool) -> None:
    """Streams by name (a page): controller, priority, latest sequence, checkpoint, gaps.

    With --json: a JSON array; when more streams follow, a hint on stderr names the
    --after value of the next page (the last stream shown).
    """
    now = time.time()
    page = opts.read(lambda conn: read_streams(conn, now, after, limit))
    emit_page("streams", page, limit, as_json, lambda: streams_text(page.rows))


def _when(_ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Click callback for --since/--until: see `parse_when`."""
    if value is None:
        return None
    try:
        return parse_when(value, time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _events_after(conn: sqlite3.Connection, flt: EventFilter, after_id: int) -> list[Row]:
    return read_events_after(conn, flt, after_id, time.time())


def poll_events(
    opts: Options, flt: EventFilter, after_id: int, stop: threading.Event
) -> Iterator[list[Row]]:
    """New matching events every FOLLOW_INTERVAL, each poll a fresh short read, until
    `stop` is set."""
    while not stop.is_set():
        rows = opts.read(functools.partial(_events_after, flt=flt, after_id=after_id))
        if rows:
            after_id = rows[-1]["id"]
            yield rows
        if len(rows) < FOLLOW_BATCH:
            stop.wait(FOLLOW_INTERVAL)


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[threading.Event]:
    """An event set by Ctrl-C (SIGINT): the handler only sets it, and the loop stops.

    A KeyboardInterrupt raised inside one of SQLite's callbacks (the progress handler)
    is swallowed by the sqlite3 module, and under load `events --follow` then ignored
    Ctrl-C for good (seen twice in loaded CI runs); a flag cannot be lost that way.
    """
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@cli.command()
@click.option("--stream", "streams_", multiple=True, help="Stream name or GLOB ('ecu0/*').")
@click.option("--kind", "kinds", multiple=True, help="Event kind (repeatable).")
@click.option("--since", callback=_when, help="Received at or after: 10m, 2h, 14:05, ISO time.")
@click.option("--until", callback=_when, help="Received before (same forms as --since).")
@click.option("--limit", default=20, show_default=True, type=LIMIT,
              help="Newest events shown.")  # fmt: skip
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events; Ctrl-C stops.")
@json_option
@click.pass_obj
def events(
    opts: Options,
    *,
    streams_: tuple[str, ...],
    kinds: tuple[str, ...],
    since: float | None,
    until: float | None,
    limit: int,
    follow: bool,
    as_json: bool,
) -> None:
    """Stored events, newest last, payloads decoded (times are the agent's clock).

    With --json: a JSON array; with --follow --json: one JSON object per line.
    """
    if follow and until is not None:
        raise click.UsageError("--follow and --until exclude each other")
    flt = EventFilter(streams_, kinds, since, until)
    now = time.time()
    rows, top = opts.read(lambda conn: read_events(conn, flt, limit, now))
    if not follow:
        emit(rows, as_json, lambda: table(EVENT_HEADERS, events_rows(rows, now)))
        return
    if not as_json:
        click.echo(event_line(None))
    with stop_on_interrupt() as stop:
        for batch in itertools.chain([rows], poll_events(opts, flt, top, stop)):
            for row in batch:
                click.echo(json_text(row, indent=None) if as_json else event_line(row))
            if stop.is_set():
                return


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Also gaps already filled by late events.")
@click.option("--limit", default=50, show_default=True, type=LIMIT,
              help="Newest gaps shown.")  # fmt: skip
@json_option
@click.pass_obj
def gaps(opts: Options, show_all: bool, limit: int, as_json: bool) -> None:
    """Missing sequence ranges per stream: open ones, or with --all filled ones too."""
    now = time.time()
    rows, summary = opts.read(
        lambda conn: (read_gaps(conn, not show_all, limit, now), read_gap_summary(conn))
    )
    emit(rows, as_json, lambda: gaps_text(rows, summary))


@cli.command()
@page_options
@json_option
@click.pass_obj
def replay(opts: Options, after: str, limit: int, as_json: bool) -> None:
    """The latest event of each stream (a page, by name), as the fleet gets it after a resync."""
    now = time.time()
    page = opts.read(lambda conn: read_replay(conn, now, after, limit))
    emit_page("replay", page, limit, as_json, lambda: replay_text(page.rows, now))


@cli.command()
@page_options
@json_option
@click.pass_obj
def checkpoints(opts: Options, after: str, limit: int, as_json: bool) -> None:
    """What the fleet has acknowledged per stream (a page, by name), and how far behind."""
    now = time.time()
    page, fleet = opts.read(
        lambda conn: (read_checkpoints(conn, now, after, limit), read_fleet(conn, now))
    )
    emit_page("checkpoints", page, limit, as_json, lambda: checkpoints_text(page.rows, fleet))


@cli.command()
@json_option
@click.pass_obj
def breaker(opts: Options, as_json: bool) -> None:
    """The uplink circuit breaker: state, counts, next probe, and why."""
    now = time.time()
    view = opts.read(lambda conn: read_breaker(conn, now))
    emit(view, as_json, lambda: breaker_text(view))


@cli.command()
@json_option
@click.pass_obj
def link(opts: Options, as_json: bool) -> None:
    """The serial link: is the controller talking, which one, frame counters."""
    now = time.time()
    view = opts.read(lambda conn: read_link(conn, now))
    emit(view, as_json, lambda: link_text(view))


@cli.command()
@click.option("--limit", default=50, show_default=True, type=LIMIT,
              help="Newest records shown.")  # fmt: skip
@json_option
@click.pass_obj
def shed(opts: Options, limit: int, as_json: bool) -> None:
    """Events the disk ladder removed before the fleet acknowledged them."""
    now = time.time()
    rows, totals = opts.read(lambda conn: (read_shed(conn, limit, now), read_shed_totals(conn)))
    emit(rows, as_json, lambda: shed_text(rows, totals, now))


@cli.command()
@click.option(
    "--max-ack-age",
    default=600.0,
    show_default=True,
    type=FiniteFloatRange(min=1.0, max=365 * 86400.0),
    help="Seconds without a fleet ack, while events wait, that make the uplink FAIL.",
)
@json_option
@click.pass_obj
def doctor(opts: Options, max_ack_age: float, as_json: bool) -> None:
    """Check config, permissions, database, device, disk, clock, daemon and uplink; exit 1
    on FAIL."""
    now = time.time()
    db = opts.database(must_exist=False)
    checks = doctor_checks(opts.config_path, db, opts.read, now, max_ack_age)
    ok = not any(c.status == "fail" for c in checks)
    emit({"ok": ok, "checks": [asdict(c) for c in checks]}, as_json, lambda: doctor_text(checks))
    if not ok:
        sys.exit(1)


@cli.command()
@click.argument("sql")
@click.option("--limit", default=1000, show_default=True, type=LIMIT,
              help="Rows shown at most.")  # fmt: skip
@json_option
@click.pass_obj
def query(opts: Options, sql: str, limit: int, as_json: bool) -> None:
    """Run one read-only SQL statement (docs/schema.md), stopped after --timeout.

    Bounded like every read: values up to 1 MiB, 32 MiB of SQLite memory, 4 MiB of
    results, and stopped early if the agent's WAL grows 3 MiB meanwhile.
    """
    columns, rows, cut = opts.read(lambda conn: run_query(conn, sql, limit))
    emit(rows, as_json, lambda: query_text(columns, rows, cut, limit))
    if cut and as_json:
        echo_hint(cut_note(cut, len(rows), limit), as_json)


@cli.command("export")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--chunk-events", default=CHUNK_EVENTS, show_default=True,
              type=click.IntRange(1, MAX_CHUNK_EVENTS), help="Events per chunk file.")  # fmt: skip
@click.option("--max-events", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("--same-filesystem", is_flag=True,
              help="Allow DIRECTORY on the database's file system (off the vehicle).")  # fmt: skip
@json_option
@click.pass_obj
def export(
    opts: Options,
    directory: Path | None,
    *,
    chunk_events: int,
    max_events: int | None,
    same_filesystem: bool,
    as_json: bool,
) -> None:
    """Write what the fleet has not acknowledged, and the latest state, to DIRECTORY (a USB
    stick) for `ironfleet-collector import`; without DIRECTORY, show what it would hold.

    One short read per chunk: the agent keeps ingesting. Nothing is deleted: the rows stay
    until the fleet's receipt comes back (`ironfleet import-receipt`).
    """
    db = opts.database()
    if directory is None:
        view = opts.read(plan)
        emit(view, as_json, lambda: plan_text(view))
        return
    try:
        agent = opts.config().agent
    except ConfigError as exc:
        raise CliError(f"export needs the vehicle id of the configuration: {exc}") from None
    vehicle, key = agent.vehicle_id, None
    if agent.signing_key_file:
        try:  # read before any file is written: an unreadable key stops the export
            key = load_private_key(agent.signing_key_file, "[agent] signing_key_file")
        except ConfigError as exc:
            why = f"{exc}; run as root or as the agent's user (the key is theirs)"
            raise CliError(f"{why}, or clear signing_key_file for an unsigned bundle") from None
    if len(prune_ledgers(db.parent, opts.read(read_cursor))) >= MAX_LEDGERS:
        raise CliError(f"{MAX_LEDGERS} exports await a receipt ({db.parent / EXPORTS_DIR}): "
                       "import their receipts first (ironfleet import-receipt)")  # fmt: skip
    with contextlib.suppress(OSError):
        os.nice(EXPORT_NICE)  # the vehicle's two cores belong to ingest first
    started = time.monotonic()
    read = functools.partial(reading, db, opts.timeout)
    try:
        m = export_bundle(read, directory, db.parent / EXPORTS_DIR, vehicle,
                          chunk_events=chunk_events, max_events=max_events,
                          database=None if same_filesystem else db,
                          signing_key=key)  # fmt: skip
    except (AgentError, OSError) as exc:
        raise CliError(str(exc)) from None
    signed_by = key_fingerprint(key) if key is not None else ""
    data = export_summary(directory, m, time.monotonic() - started, signed_by)
    emit(data, as_json, lambda: export_text(data))


@cli.command("import-receipt")
@click.argument("receipt", required=False, type=click.Path(exists=True, path_type=Path))
@json_option
@click.pass_obj
def import_receipt(opts: Options, receipt: Path | None, as_json: bool) -> None:
    """Hand the fleet's receipt for an export (a file, or the bundle directory holding it)
    to the agent, once its acks check out against the fleet key and the export's ledger;
    without RECEIPT, list the exports and the receipts waiting for the agent.

    The agent checks the receipt again, moves its delivery cursor, and only then frees the
    rows; a stopped agent does it at its next start.
    """
    db = opts.database()
    if receipt is None:
        view = opts.read(lambda conn: exports_view(conn, db.parent))
        emit(view, as_json, lambda: exports_text(view))
        return
    try:
        config = opts.config()
        if not config.uplink.enabled:
            raise CliError(
                "[uplink] enabled = false: the agent applies receipts on its uplink "
                "thread, which is off; enable it (an unreachable broker will do)"
            )
        done = queue_receipt(receipt, db.parent, receipt_auth(config))
    except AgentError as exc:
        raise CliError(str(exc)) from None
    emit(done, as_json, lambda: receipt_text(done))


def receipt_auth(config: Config) -> FleetAuth:
    """The fleet key to check a receipt with here. A systemd credential is the service's
    alone (and absent while it is stopped): then only the daemon checks the signatures,
    as it does for every receipt anyway, and the technician is told."""
    try:
        return load_fleet_auth(config)
    except ConfigError:
        if not config.uplink.fleet_key_file.startswith(SYSTEMD_CREDENTIALS):
            raise
    click.echo(f"ironfleet: {config.uplink.fleet_key_file} is the agent's systemd credential: "
               "the agent checks the receipt's signatures itself", err=True)  # fmt: skip
    return FleetAuth(config.agent.vehicle_id, None)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `ironfleet`."""
    if argv is None:
        # This process is `ironfleet` itself: cap SQLite's heap process-wide. In-process
        # callers (tests, the fuzzer) pass argv and keep their own process's settings.
        limit_process_heap()
    args = list(argv) if argv is not None else sys.argv[1:]
    for arg in args:
        # Bytes that are not UTF-8 reach Python as lone surrogates; SQLite cannot take
        # them (a traceback, found by fuzzing). Say which argument, as a usage error.
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            print(f"ironfleet: argument '{shown}' is not valid UTF-8", file=sys.stderr)
            return 2
    try:
        cli.main(args=args, prog_name="ironfleet")
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
