"""The text each `ironfleet` command prints when `--json` is not given.

One renderer per command (and the shared daemon line), taking the rows that
`agent.views` and `agent.doctor` return. They are kept apart from the click commands so
that what a screen says can be read and changed in one place; the generic escaping and
table helpers they use are in `agent.render`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from agent.cliaccess import MAX_LIMIT
from agent.doctor import Check, flash_text
from agent.export import Manifest
from agent.pages import PAGE_ROWS, Page
from agent.readsafe import MAX_FETCH_BYTES
from agent.render import age_of as _age
from agent.render import (
    ago,
    cell,
    clock_time,
    controller_time,
    human_bytes,
    n,
    number,
    pairs,
    shell_arg,
    signals_text,
    span,
    table,
)
from agent.views import Row

# -- formatting ------------------------------------------------------------------------------


def daemon_line(d: Row) -> str:
    """'running, pid 42, heartbeat 0.6 s ago', or why the values shown are not live."""
    pid, beat = d["pid"] or "?", ago(d["heartbeat_age_s"])
    lines = {
        "never": "never published: has the agent run on this database?",
        "copy": f"a COPY, not a live agent: written by pid {pid} on host {d['host']!r}, last "
        f"heartbeat {beat}; values below are from then",
        "stopped": f"stopped cleanly {ago(d['stopped_age_s'])} (pid {pid}); values below are "
        "from the stop",
        "rebooted": f"NOT RUNNING since this machine rebooted: last heartbeat {beat} (pid {pid} "
        "of the earlier boot, no clean stop); values below are from then",
        "live": f"running, pid {pid}, heartbeat {beat}",
        "stuck": f"running, pid {pid}, but NOT PUBLISHING for {span(d['heartbeat_age_s'] or 0.0)}"
        ": it cannot write its database (disk full or read-only?); live values below are from "
        "then: see its log (journalctl -u ironfleet-agent)",
        "gone": f"NOT PUBLISHING: last heartbeat {beat} (pid {pid}); live values below are from "
        "then",
    }
    return lines[d["condition"]]


def _controller(link: Row, epoch: str = ", boot epoch {}") -> str:
    """A controller's id and boot epoch, as its link published them."""
    text = link["controller"] or "none"
    if link["boot_epoch"] is not None:
        text += epoch.format(link["boot_epoch"])
    return text


def _port(link: Row) -> str:
    return (link["port"] or "-") + (f" on {link['device']}" if link["device"] else "")


def _controller_lines(s: Row) -> list[tuple[str, str]]:
    """One controller: its id and serial port; several: one line each, named by its
    [[serial]] entry (names and ids are escaped with the values, never in a label)."""
    links = s.get("controllers") or [s["link"]]
    if len(links) == 1:
        link = s["link"]
        return [("controller", f"{_controller(link)}; serial link {link['state']}"),
                ("serial port", _port(link))]  # fmt: skip
    return [
        ("controller", f"{k['name'] or '?'}: {_controller(k)}; serial link {k['state']}; "
                       f"port {_port(k)}")
        for k in links
    ]  # fmt: skip


def status_text(s: Row) -> str:
    """The status screen."""
    d, link, buf, back, fleet = s["daemon"], s["link"], s["buffer"], s["backlog"], s["fleet"]
    gaps, shed = s["gaps"], s["shed"]
    unacked = f"{n(back['unacked_events'])} events"
    if back["unacked_events"]:
        unacked += f", oldest received {ago(back['oldest_unacked_age_s'])}"
    uplink = fleet["uplink"]
    if fleet["phase"]:
        uplink += f", phase {fleet['phase']}"
    if fleet["breaker"]:
        uplink += f", breaker {fleet['breaker']}"
    if fleet["broker"]:
        uplink += f"; broker {fleet['broker']}"
    if fleet["last_error"] and fleet["uplink"] != "connected":
        uplink += f"; last error: {fleet['last_error']}"
    counters = d["counters"]
    items = [
        ("database", f"{s['database']} ({human_bytes(buf['file_bytes'])}, "
                     f"WAL {human_bytes(buf['wal_bytes'])})"),
        ("daemon", daemon_line(d)),
        ("alarm", d["alarm"] or "none"),
        *_controller_lines(s),
        ("last event", ago(link["last_event_age_s"])),
        ("buffer", f"{n(buf['events'])} events in {n(buf['streams'])} streams, "
                   f"{human_bytes(buf['used_bytes'])} used"),
        ("not acked", unacked),
        ("fleet ack", f"last {ago(fleet['last_ack_age_s'])} "
                      f"(events below id {n(fleet['cursor'])} acknowledged)"
                      if fleet["last_ack_at"] else "never: the fleet has acknowledged nothing"),
        ("uplink", uplink),
        *([("budget", budget_text(s["budget"]))] if s.get("budget") else []),
        ("gaps", f"{n(gaps['open'])} open ({n(gaps['missing'])} events missing), "
                 f"{n(gaps['total'])} detected in all"),
        ("shed", f"{n(shed['events'])} events in {n(shed['records'])} records"
                 if shed["records"] else "none"),
    ]  # fmt: skip
    if counters:
        items.append(("commits", f"{n(counters.get('batches'))} batches, "
                                 f"{n(counters.get('commit_failures'))} failed"))  # fmt: skip
    if s["flash"]["write_bytes_per_s"] is not None:
        items.append(("flash", flash_text(s["flash"])))
    return pairs(items)


def budget_text(b: Row) -> str:
    """The byte budget and the backlog's drain under it (views.budget_view)."""
    parts = []
    if b["bytes_per_second"]:
        parts.append(f"{human_bytes(b['bytes_per_second'])}/s")
    if b["bytes_per_contact"]:
        window = f"{human_bytes(b['contact_bytes'])} of {human_bytes(b['bytes_per_contact'])}"
        if b["contact_window_left_s"]:
            window += f" spent, window ends in {span(b['contact_window_left_s'])}"
        else:
            window += " spent, no window open"
        parts.append(window)
    per_event = f"{number(b['bytes_per_event'])} B an event, {b['bytes_per_event_basis']}"
    backlog = f"backlog about {human_bytes(b['backlog_bytes'])} ({per_event})"
    if b["drain_s"] is not None:
        backlog += f": {span(b['drain_s'])} at the budget"
    if b["contact_windows_needed"]:
        more = " more" if b["contact_window_left_s"] else ""  # else the first is yet to open
        backlog += f", {n(b['contact_windows_needed'])}{more} contact windows"
    return "; ".join([*parts, backlog])


def streams_text(rows: list[Row]) -> str:
    """The streams table."""
    if not rows:
        return "no streams yet"
    body = []
    for r in rows:
        acked = f"{r['acked_boot_epoch']}/{r['acked_seq']}" if r["acked_seq"] is not None else "-"
        body.append([r["stream"], r["controller"], r["priority"], r["boot_epoch"],
                     r["high_seq"], n(r["received"]), acked, r["open_gaps"],
                     ago(r["last_seen_age_s"])])  # fmt: skip
    headers = ["stream", "controller", "prio", "epoch", "seq", "received", "acked",
               "open gaps", "last seen"]  # fmt: skip
    return table(headers, body)


def events_rows(rows: list[Row], now: float) -> list[list[object]]:
    """Table rows of events."""
    return [
        [r["id"], clock_time(r["received_at"], now), r["stream"], r["boot_epoch"], r["seq"],
         r["kind"], r["priority"], signals_text(r["signals"])]
        for r in rows
    ]  # fmt: skip


EVENT_HEADERS: Final = ("id", "received", "stream", "epoch", "seq", "kind", "prio", "signals")
# Fixed widths for `events --follow`, which prints rows as they come (no table to align).
FOLLOW_WIDTHS: Final = (8, 12, 14, 5, 7, 10, 4)


def event_line(row: Row | None) -> str:
    """One event as a fixed-width line for `events --follow`; the header line for None."""
    values = list(EVENT_HEADERS) if row is None else events_rows([row], time.time())[0]
    cells = [cell(v) for v in values]  # escaped: a stream name may hold ESC, CR, BEL...
    text = [f"{c:>{w}}" if i in (0, 3, 4, 6) else f"{c:<{w}}"
            for i, (c, w) in enumerate(zip(cells, FOLLOW_WIDTHS, strict=False))]  # fmt: skip
    return "  ".join([*text, cells[-1]])


def gaps_text(rows: list[Row], summary: Row) -> str:
    """The gaps table and its summary."""
    body = [
        [r["id"], r["stream"], r["boot_epoch"], f"{r['first_seq']}..{r['last_seq']}",
         r["missing"], ago(r["detected_age_s"]),
         "open" if r["open"] else f"filled {ago(r['closed_age_s'])}"]
        for r in rows
    ]  # fmt: skip
    head = table(["id", "stream", "epoch", "seq range", "missing", "detected", "state"], body)
    lines = [head if rows else "no gaps to show"]
    lines.append(
        f"\n{n(summary['open'])} open ({n(summary['missing'])} events still missing), "
        f"{n(summary['total'])} detected in all (--all lists the filled ones too)"
    )
    if summary["link_gaps"]:
        lines.append(
            f"serial link: {n(summary['link_gaps'])} frame gaps NACKed since the agent started "
            "(resent by the controller)"
        )
    return "\n".join(lines)


def replay_text(rows: list[Row], now: float) -> str:
    """The latest state per stream."""
    if not rows:
        return "no events stored"
    body = [
        [r["stream"], r["boot_epoch"], r["seq"], r["kind"], r["priority"],
         controller_time(r["ts"], r["ts_quality"]), ago(r["received_age_s"]),
         signals_text(r["signals"])]
        for r in rows
    ]  # fmt: skip
    headers = ["stream", "epoch", "seq", "kind", "prio", "controller time", "received", "signals"]
    return table(headers, body)


def checkpoints_text(rows: list[Row], fleet: Row) -> str:
    """Per-stream checkpoints and the fleet cursor."""
    body = []
    for r in rows:
        acked = "-" if r["acked_seq"] is None else f"{r['acked_boot_epoch']}/{r['acked_seq']}"
        latest = "-" if r["latest_seq"] is None else f"{r['latest_boot_epoch']}/{r['latest_seq']}"
        behind: object = r["behind"]
        if behind is None and r["latest_seq"] is not None:
            behind = "all" if r["acked_seq"] is None else "new epoch"
        body.append([r["stream"], acked, ago(r["acked_age_s"]), latest, behind])
    text = (
        table(["stream", "acked", "acked at", "stored", "behind"], body)
        if rows
        else ("no streams yet")
    )
    return (
        f"{text}\n\nfleet cursor: events below id {n(fleet['cursor'])} acknowledged, "
        f"last moved {ago(fleet['last_ack_age_s'])}; uplink {fleet['uplink']}"
    )


def shed_text(rows: list[Row], totals: list[tuple[str, int, int, float]], now: float) -> str:
    """Shed records and totals per reason."""
    if not totals:
        return "nothing shed: no event was removed before the fleet acknowledged it"
    body = [
        [r["id"], ago(r["age_s"]), r["reason"], r["stream"], r["boot_epoch"],
         f"{r['first_seq']}..{r['last_seq']}", n(r["count"])]
        for r in rows
    ]  # fmt: skip
    lines = [table(["id", "when", "reason", "stream", "epoch", "seq range", "events"], body), ""]
    for reason, records, events, at in totals:
        lines.append(
            f"{reason}: {n(events)} events in {n(records)} records, last {ago(_age(at, now))}"
        )
    return "\n".join(lines)


LINK_COUNTERS: Final = ("events_accepted", "acks_sent", "nacks_sent", "gaps",
                        "retransmits_reacked", "link_downs", "controller_reboots",
                        "outside_window", "foreign_session")  # fmt: skip


def _link_items(k: Row) -> list[tuple[str, str]]:
    """One link's counters and rejected frames."""
    counters = k["counters"]
    rejects = {name: c for name, c in k["rejects"].items() if c}
    items = []
    if counters:
        shown = " ".join(f"{c}={counters[c]}" for c in LINK_COUNTERS if counters.get(c))
        items.append(("counters", shown or "none"))
    items.append(("rejected frames", " ".join(f"{c}={v}" for c, v in rejects.items()) or "none"))
    return items


def link_text(v: Row) -> str:
    """The serial link screen: one block per controller when there are several."""
    last = ago(v["last_event_age_s"])
    if v["last_event_stream"]:
        last += f" ({v['last_event_stream']}); {n(v['events_last_10s'])} in the last 10 s"
    items = [("daemon", daemon_line(v["daemon"]))]
    links = v.get("controllers") or []
    if len(links) > 1:
        for k in links:
            items += [
                ("controller", f"{k['name'] or '?'}: {_controller(k)}"),
                ("link", f"{k['state']} (published {ago(v['published_age_s'])})"),
                ("port", _port(k)),
                *_link_items(k),
            ]
        items.append(("last event", last))
        return pairs(items)
    items += [
        ("link", f"{v['state']} (published {ago(v['published_age_s'])})"),
        ("controller", _controller(v, " (boot epoch {})")),
        ("port", _port(v)),
        ("last event", last),
        *_link_items(v),
    ]  # fmt: skip
    return pairs(items)


def breaker_text(v: Row) -> str:
    """The breaker screen."""
    state = v["state"]
    if state == "open" and v["retry_in_s"] is not None:
        state += f" (next probe in about {span(v['retry_in_s'])})"
    items = [
        ("daemon", daemon_line(v["daemon"])),
        ("breaker", state),
        ("failures", n(v["failures"])),
        ("half-open ok", n(v["successes"])),
        ("transitions", n(v["transitions"])),
        ("uplink", v["uplink"] + (f", phase {v['phase']}" if v["phase"] else "")),
        ("broker", v["broker"] or "-"),
        ("last error", v["last_error"] or "none"),
        ("in flight", n(v["in_flight"])),
        ("ack timeouts", n(v["ack_timeouts"])),
    ]
    items += [("why", reason) for reason in v["why"]]
    return pairs(items)


def doctor_text(checks: list[Check]) -> str:
    """One line per check."""
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}" for c in checks)


def query_text(columns: list[str], rows: list[Row], cut: str, limit: int) -> str:
    """Query results as a table; blobs shown by size."""

    def cell(value: object) -> object:
        return f"<{len(value)} bytes>" if isinstance(value, bytes) else value

    text = table(columns, [[cell(r[c]) for c in columns] for r in rows]) if columns else "done"
    if cut:
        text += "\n" + cut_note(cut, len(rows), limit)
    return text


def cut_note(cut: str, shown: int, limit: int) -> str:
    """Why `query` showed only the first rows."""
    if cut == "rows":
        return f"(first {n(limit)} rows; raise --limit for more, up to {n(MAX_LIMIT)})"
    return (
        f"(first {n(shown)} rows: the next would pass {human_bytes(MAX_FETCH_BYTES)} of "
        "results; select fewer columns or add LIMIT/OFFSET)"
    )


def more_note(command: str, page: Page, limit: int) -> str:
    """The line after a full page: how to see the next one."""
    extra = "" if limit == PAGE_ROWS else f" --limit {limit}"
    return (
        f"({n(limit)} streams shown, by name; next page: ironfleet {command}{extra} "
        f"--after {shell_arg(page.next_after or '')})"
    )


# -- ironfleet export ----------------------------------------------------------------------


def plan_text(view: dict[str, int]) -> str:
    """`ironfleet export` without a directory: what an export would carry now."""
    return pairs([
        ("would export", f"{view['events']:,} events (rows {view['cursor']:,} to "
                         f"{view['top']:,}) in {view['chunks']:,} chunks, plus the latest "
                         f"state of {view['streams']:,} streams"),
        ("size", f"about {human_bytes(view['bytes_estimate'])}"),
    ])  # fmt: skip


def export_summary(
    directory: Path, m: Manifest, seconds: float, signed_by: str = ""
) -> dict[str, Any]:
    """What `ironfleet export` reports of a bundle written in `seconds` (`signed_by`: the
    vehicle key's fingerprint, "" for an unsigned bundle)."""
    return {"bundle": str(directory), "export": m.export, "vehicle": m.vehicle,
            "first": m.cursor, "top": m.top, "events": m.events, "state_events": m.state_events,
            "chunks": len(m.chunks), "bytes": m.size, "complete": m.complete,
            "stopped": m.stopped, "seconds": round(seconds, 3),
            "signed_by": signed_by}  # fmt: skip


def export_text(d: dict[str, Any]) -> str:
    """`export_summary` for people, with the next steps."""
    why = {"max_events": "--max-events", "space": "the stick being full",
           "max_chunks": "the chunk limit"}.get(d["stopped"], "")  # fmt: skip
    return pairs([
        ("bundle", f"{d['bundle']} (export {d['export']}, vehicle {d['vehicle']})"),
        ("events", f"{d['events']:,} (rows {d['first']:,} to {d['top']:,}) in "
                   f"{d['chunks']:,} chunks, plus the latest state of {d['state_events']:,} "
                   "streams"),
        ("size", f"{human_bytes(d['bytes'])} in {d['seconds']:.2f} s"),
        ("complete", "yes" if d["complete"] else f"no, stopped by {why}: export again once "
                                                 "the receipt is back"),
        ("signed", f"by the vehicle's key {d['signed_by']}" if d["signed_by"] else
                   "no ([agent] signing_key_file unset): a collector checking vehicle keys "
                   "refuses it"),
        ("next", f"on the fleet side: ironfleet-collector import {d['bundle']} --db ... "
                 f"--vehicle-keys ...; then here: ironfleet import-receipt {d['bundle']}"),
    ])  # fmt: skip
