"""Operator commands of CONTRACT §8: get (-l, wide, -w, REASON), wait, suspend/resume, reconcile,
diff, logs of several instances, and the no-controller warning they share.
Entry layer, called by cli.main: reads the state dir and talks to a running controller only
through request files (opsrequests); never changes an agent itself."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml

from controller import logfiles, opsrequests, opsview, selectors, status


class CommandError(Exception):
    """Exit 1 with this message on stderr (unknown agent, missing state dir, no controller)."""


class UsageError(Exception):
    """Bad arguments: exit 2 (cli.main prints it)."""


def state_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or ".agentctl")


def err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def open_state(args: argparse.Namespace, *, warn: bool = True) -> tuple[Path, bool]:
    """The state dir to read, and whether a controller runs on it. A missing dir is an error (exit 1),
    never an empty table; with no controller the answer is stale, and stderr says so."""
    state_dir = state_dir_of(args)
    if not (state_dir / "status").is_dir():
        what = "does not exist" if not state_dir.exists() else "holds no agentctl state (no status/ directory)"
        raise CommandError(f"state dir {state_dir} {what}; pass --state-dir, or run `agentctl run` first")
    up = opsrequests.controller_up(state_dir)
    if not up and warn:
        print(f"warning: no controller is running on {state_dir}; status as of "
              f"{opsrequests.status_as_of(state_dir)}", file=sys.stderr)
    return state_dir, up


def require_controller(state_dir: Path) -> None:
    if not opsrequests.controller_up(state_dir):
        raise CommandError(f"no controller is running on state dir {state_dir}; start it with `agentctl run`")


def require_known(state_dir: Path, name: str) -> dict[str, Any]:
    doc = status.read_status(state_dir / "status", name)
    if doc is None:
        raise CommandError(f"agent {name!r} not found in {state_dir}")
    return doc


# -- get ----------------------------------------------------------------------------
def _select(docs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    selector = selectors.parse(args.selector or "")
    return [d for d in docs if selector.matches(d.get("labels") or {}) and (not args.name or d.get("name") == args.name)]


def _rows(docs: list[dict[str, Any]], *, wide: bool, up: bool) -> list[tuple[str, ...]]:
    now = time.time()
    return [opsview.row(d if up else opsrequests.live_view(d), now, wide=wide, controller_up=up) for d in docs]


def cmd_get(args: argparse.Namespace) -> int:
    state_dir, up = open_state(args)
    read = status.read_all_json(state_dir / "status")  # from the JSON mirror where it is current
    docs = _select([doc for doc, _ in read], args)
    if args.name and not docs:
        raise CommandError(f"agent {args.name!r} not found in {state_dir}")
    if args.output == "json":
        kept = {id(d) for d in docs}
        texts = [text if text is not None else json.dumps(doc, indent=2) for doc, text in read if id(doc) in kept]
        print(texts[0] if args.name else status.items_json(texts))
    if args.output == "yaml":
        body: Any = docs[0] if args.name else {"items": docs}
        print(yaml.safe_dump(body, sort_keys=False), end="")
    if args.output in ("json", "yaml"):
        if args.watch:
            raise CommandError("-w works with -o table or -o wide")
        return 0
    wide = args.output == "wide"
    header = opsview.WIDE_HEADER if wide else opsview.HEADER
    rows = [header, *_rows(docs, wide=wide, up=up)]
    widths = opsview.widths_for(rows)
    for r in rows:
        print(opsview.format_row(r, widths))
    sys.stdout.flush()
    if args.watch:
        try:
            _watch(state_dir, args, rows[1:], widths, wide=wide)
        except KeyboardInterrupt:
            return 0  # kubectl get -w: Ctrl-C is the normal way out
    return 0


def _key(r: tuple[str, ...]) -> tuple[str, ...]:
    return r[:4] + r[5:]  # AGE ticks by itself: not a change worth a row


def _watch(state_dir: Path, args: argparse.Namespace, first: list[tuple[str, ...]], widths: tuple[int, ...], *,
           wide: bool) -> NoReturn:
    """kubectl get -w: one row per changed agent until SIGINT (main turns that into exit 0).
    Polls the status files' stat every 0.5 s and re-reads only those that changed."""
    seen = {r[0]: _key(r) for r in first}
    stamps: dict[str, tuple[int, int]] = {}
    was_up: bool | None = None
    while True:
        time.sleep(0.5)
        up = opsrequests.controller_up(state_dir)
        changed_up, was_up = was_up is not None and up != was_up, up
        current: dict[str, tuple[int, int]] = {}
        for path in (state_dir / "status").glob("*.yaml"):
            try:
                st = path.stat()
            except OSError:
                continue
            current[path.stem] = (st.st_mtime_ns, st.st_size)
        names = set(current) if changed_up else {n for n, s in current.items() if stamps.get(n) != s}
        stamps = current
        docs = [d for n in sorted(names) if (d := status.read_status(state_dir / "status", n)) is not None]
        for r in _rows(_select(docs, args), wide=wide, up=up):
            if seen.get(r[0]) != _key(r):
                seen[r[0]] = _key(r)
                _emit(r, widths)
        for gone in sorted(set(seen) - set(current)):
            del seen[gone]
            _emit((gone, "Deleted", *["-"] * (len(widths) - 3), ""), widths)


def _emit(r: tuple[str, ...], widths: tuple[int, ...]) -> None:
    print(opsview.format_row(r, opsview.widths_for([r], widths)), flush=True)


# -- wait ----------------------------------------------------------------------------
def cmd_wait(args: argparse.Namespace) -> int:
    try:
        cond = opsview.parse_wait_for(args.for_)
        timeout = opsview.parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    state_dir, _ = open_state(args)
    deadline = time.monotonic() + timeout
    tty = sys.stdout.isatty()  # a person watching: progress on stderr; piped output stays plain
    pending = list(dict.fromkeys(args.names))
    while True:
        docs = {n: status.read_status(state_dir / "status", n) for n in pending}
        for name in [n for n in pending if cond.met(docs[n])]:
            pending.remove(name)
            print(f"{name}: {cond.describe()} met", flush=True)
        if not pending:
            _clear_progress(tty)
            return 0
        if time.monotonic() >= deadline:
            _clear_progress(tty)
            for name in pending:
                doc = docs[name]
                now = f"phase {doc.get('phase')}" if doc is not None else "no status (not declared, or deleted)"
                print(f"error: timed out after {args.timeout} waiting for {name}: {cond.describe()}; now {now}",
                      file=sys.stderr)
            return 1
        if tty:  # a person watching: say what is awaited; pipes stay plain and parseable
            left = int(deadline - time.monotonic())
            sys.stderr.write(f"\rwaiting {left:>4}s for {cond.describe()}: {', '.join(pending)}\x1b[K")
            sys.stderr.flush()
        time.sleep(0.2)


def _clear_progress(tty: bool) -> None:
    if tty:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


# -- suspend / resume / reconcile ------------------------------------------------------
def cmd_suspend(args: argparse.Namespace) -> int:
    return _override(args, on=True)


def cmd_resume(args: argparse.Namespace) -> int:
    return _override(args, on=False)


def _override(args: argparse.Namespace, *, on: bool) -> int:
    state_dir = state_dir_of(args)
    if not state_dir.is_dir():
        raise CommandError(f"state dir {state_dir} does not exist")
    require_known(state_dir, args.name)
    require_controller(state_dir)
    verb = "suspend" if on else "resume"
    if not opsrequests.send(state_dir, args.name, f".{verb}"):
        raise CommandError(f"{verb} of {args.name} requested, but the controller has not picked it up within 15s")
    if on:
        print(f"{args.name} suspended: its instances are being stopped and stay stopped until "
              f"`agentctl resume {args.name}`")
    else:
        print(f"{args.name} resumed: the controller starts it again per its manifest")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    state_dir = state_dir_of(args)
    if not state_dir.is_dir():
        raise CommandError(f"state dir {state_dir} does not exist")
    require_controller(state_dir)
    stem = f"reconcile-{os.getpid()}-{os.urandom(3).hex()}"
    if not opsrequests.send(state_dir, stem, ".reconcile"):
        raise CommandError("the controller has not picked up the reconcile request within 15s")
    if not args.wait:
        print("reconcile requested")
        return 0
    tty = sys.stdout.isatty()
    if tty:
        sys.stderr.write("waiting for the controller's pass to finish...")
        sys.stderr.flush()
    ack = opsrequests.await_ack(state_dir, stem, timeout=opsview.parse_duration(args.timeout))
    _clear_progress(tty)
    if ack is None:
        raise CommandError(f"the reconcile pass did not finish within {args.timeout}")
    print(f"reconciled: pass {ack.get('pass')}, {ack.get('agents')} agents")
    return 0


# -- logs ----------------------------------------------------------------------------
def _instance_ids(state_dir: Path, name: str, wanted: str | None) -> list[str]:
    doc = status.read_status(state_dir / "status", name)
    on_disk = sorted((p.name[:-4] for p in (state_dir / "logs").glob(f"{name}-*.log")
                      if p.name[len(name) + 1:-4].isdigit()), key=lambda i: int(i.rsplit("-", 1)[1]))
    known = [str(i["id"]) for i in (doc or {}).get("instances") or []] or on_disk
    if doc is None and not on_disk:
        raise CommandError(f"agent {name!r} not found in {state_dir}")
    if wanted is None:
        return known or [f"{name}-0"]
    iid = wanted if wanted.startswith(f"{name}-") else f"{name}-{wanted}"
    suffix = iid[len(name) + 1:]
    if not suffix.isdigit():
        raise UsageError(f"--instance {wanted}: expected N or {name}-N")
    if iid not in known and iid not in on_disk:
        raise CommandError(f"instance {iid} not found (instances: {', '.join(known) or 'none'})")
    return [iid]


def cmd_logs(args: argparse.Namespace) -> int:
    state_dir, _ = open_state(args)
    ids = _instance_ids(state_dir, args.name, args.instance)
    prefix = len(ids) > 1
    if not args.raw and not (args.follow and prefix) and _terminal(state_dir, args.name, ids):
        return _terminal_logs(state_dir, ids, args.tail, args.follow, prefix)  # tmux: as the screen read
    offsets: dict[str, int] = {}
    for iid in ids:
        path = state_dir / "logs" / f"{iid}.log"
        tag = f"[{iid}] " if prefix else ""
        if args.tail is not None:
            for line in logfiles.tail_lines(path, args.tail, raw=args.raw):
                sys.stdout.write(f"{tag}{line}\n")
            offsets[iid] = logfiles.size(path)
        else:
            offsets[iid] = _copy(path, 0, args.raw, tag)
    sys.stdout.flush()
    if args.follow:
        _follow(state_dir, offsets, args.raw, prefix)
    return 0


def _terminal(state_dir: Path, name: str, ids: list[str]) -> bool:
    from controller.screens import is_terminal_log

    doc = status.read_status(state_dir / "status", name)
    return bool(ids) and all(is_terminal_log(doc, state_dir / "logs" / f"{iid}.log") for iid in ids)


def _terminal_logs(state_dir: Path, ids: list[str], tail: int | None, follow: bool, prefix: bool) -> int:
    """A tmux instance's output replayed through a terminal emulator (CONTRACT §9): the text a
    person saw, line by line; several instances each behind its [NAME-i] tag."""
    from controller import screens

    for iid in ids:
        path = state_dir / "logs" / f"{iid}.log"
        lines, renderer, offset = screens.rendered_lines(path, tail)
        tag = f"[{iid}] " if prefix else ""
        sys.stdout.write("".join(f"{tag}{line}\n" for line in lines))
        sys.stdout.flush()
        if follow:  # one instance (several are followed as plain text)
            follower = screens.Follower(renderer, renderer.screen_rows(), sys.stdout.write)
            screens.follow(path, offset, follower, sys.stdout.flush)
    return 0


def _copy(path: Path, offset: int, raw: bool, tag: str) -> int:
    """Whole lines from offset on (a partial last line waits for its end), each behind tag."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return 0
    end = data.rfind(b"\n") + 1 if tag else len(data)
    text = data[:end].decode("utf-8", errors="replace")
    text = text if raw else logfiles.strip_escapes(text)
    if tag:
        text = "".join(f"{tag}{line}\n" for line in text.splitlines())
    sys.stdout.write(text)
    return offset + end


def _follow(state_dir: Path, offsets: dict[str, int], raw: bool, prefix: bool) -> NoReturn:
    while True:
        for iid, offset in offsets.items():
            path = state_dir / "logs" / f"{iid}.log"
            size = logfiles.size(path)
            if size < offset:  # rotated (copy-truncate): start over at the top
                offset = 0
            if size > offset:
                offset = _copy(path, offset, raw, f"[{iid}] " if prefix else "")
                sys.stdout.flush()
            offsets[iid] = offset
        time.sleep(0.2)


# -- diff ----------------------------------------------------------------------------
def _yaml(doc: Any) -> list[str]:
    if doc is None:
        return []
    return yaml.safe_dump(doc, sort_keys=True, allow_unicode=True).splitlines(keepends=True)


def _raw_doc(path: Path, name: str) -> Any:
    """The document of NAME as written (for a manifest that does not validate)."""
    try:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and (doc.get("metadata") or {}).get("name") == name:
                return doc
    except (OSError, yaml.YAMLError) as exc:
        return {"unreadable": f"{path}: {exc}"}
    return None


def diff_lines(controller: Any, base: Path, only: str | None) -> list[str]:
    """Unified diffs, running spec (a/) vs manifest on disk (b/), for every agent that differs."""
    running = {n: a.desired for n, a in controller.agents.items()}
    # the hash the instances were started with: envFiles are read again on load, so the
    # restored spec alone cannot tell that their contents changed since
    hashes = {n: {r.spec_hash for r in controller.table.of(n).values()} for n in controller.agents}
    controller.sync_manifests()
    out: list[str] = []
    for name in sorted(controller.agents):
        if only and name != only:
            continue
        agent, before = controller.agents[name], running.get(name)
        # defaults left out on both sides: the diff shows what was written, not every default
        old = before.manifest.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True) if before else None
        if not agent.present:
            new = None
        elif agent.valid and not agent.errors and agent.desired is not None:
            new = agent.desired.manifest.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
        else:
            src = Path(agent.source)
            new = _raw_doc(src if src.is_absolute() else base / src, name)
        a, b = _yaml(old), _yaml(new)
        where = agent.source or "-"
        lines = list(difflib.unified_diff(a, b, f"a/{name} (running {before.spec_hash[:19] if before else 'nothing'})",
                                          f"b/{where} (on disk)"))
        ran = hashes.get(name) or ({before.spec_hash} if before else set())
        if not lines and before is not None and agent.desired is not None and agent.desired.spec_hash not in ran:
            lines = [f"--- a/{name} (running {before.spec_hash[:19]})\n", f"+++ b/{where} (on disk)\n",
                     "# envFiles contents (or the provider presets) differ; values are not shown\n"]
        out.extend(lines)
    return out


def unnamed_errors(controller: Any) -> list[str]:
    """Files so broken that no agent name can be read: the diff cannot show them, so it names them."""
    result = controller.intake.source.load()
    return [str(e) for e in result.errors if not e.agent]


def print_diff(lines: list[str], broken: list[str]) -> int:
    for line in lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
    for message in broken:
        print(f"error: {message} (not comparable: no agent name can be read)", file=sys.stderr)
    return 1 if lines or broken else 0
