"""The `agentctl` command line (CONTRACT §2): argument parsing and one function per command.

Entry layer: builds Settings, starts the runtime for `run`, and reads the state dir for
`get`/`describe`/`logs`, which work while no controller runs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from controller import __version__, logfiles, status
from controller.loader import ManifestSource
from controller.manifests import NAME_RE, json_schema
from controller.providers import merge_presets
from controller.settings import ConfigFile, GitSource, Settings, is_loopback, parse_addr, parse_host_labels

log = logging.getLogger("agentctl")


class UsageError(Exception):
    """Bad arguments or an unusable directory: exit 2."""


# -- parsing ------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None, help="state directory (default ./.agentctl)")


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="controller config file (YAML)")
    p.add_argument("--manifests", help="manifests directory (default ./manifests)")
    p.add_argument("--base-dir", help="base dir for cwd and envFiles (default: current directory)")
    p.add_argument("--git-url")
    p.add_argument("--git-ref")
    p.add_argument("--git-path")
    p.add_argument("--git-interval", type=float)
    p.add_argument("--host-name")
    p.add_argument("--host-labels", help="k=v,k2=v2")
    p.add_argument("--max-agents", type=int)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="agentctl", description="Declarative controller for long-running agents.")
    top.add_argument("--version", action="version", version=f"agentctl {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the controller in the foreground")
    _common(run)
    _source_flags(run)
    run.add_argument("--metrics-addr", help="HOST:PORT of the read-only HTTP listener (default 127.0.0.1:9478)")
    run.add_argument("--resync", type=float, help="seconds between full resyncs (default 30)")
    run.add_argument("--log-format", choices=["text", "json"])
    run.add_argument("--once", action="store_true", help="one reconcile pass, then exit")
    run.add_argument("--stop-agents-on-exit", action="store_true", default=None)
    run.add_argument("--allow-insecure-manifests", action="store_true", default=None)

    val = sub.add_parser("validate", help="validate manifests without touching anything")
    val.add_argument("paths", nargs="*")
    val.add_argument("--base-dir")
    val.add_argument("--config")
    _common(val)

    plan = sub.add_parser("plan", help="print the actions the next reconcile would take")
    _common(plan)
    _source_flags(plan)

    get = sub.add_parser("get", help="list agents")
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _common(get)

    desc = sub.add_parser("describe", help="show one agent in detail")
    desc.add_argument("name")
    _common(desc)

    logs = sub.add_parser("logs", help="print an agent's output")
    logs.add_argument("name")
    logs.add_argument("--instance", type=int, default=0)
    logs.add_argument("--tail", type=int, default=None)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--raw", action="store_true")
    _common(logs)

    restart = sub.add_parser("restart", help="ask the running controller to restart an agent")
    restart.add_argument("name")
    restart.add_argument("--fresh", action="store_true", help="start new sessions (new session ids)")
    _common(restart)

    sub.add_parser("schema", help="print the manifest JSON Schema")

    attach = sub.add_parser("attach", help="attach the terminal to a tmux instance")
    attach.add_argument("name")
    attach.add_argument("--instance", type=int, default=0)
    _common(attach)

    capture = sub.add_parser("capture", help="print the screen of a tmux instance")
    capture.add_argument("name")
    capture.add_argument("--instance", type=int, default=0)
    capture.add_argument("--raw", action="store_true")
    _common(capture)
    return top


# -- settings -----------------------------------------------------------------
def load_config(path: str | None) -> ConfigFile:
    if path is None:
        return ConfigFile()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {exc}") from exc
    try:
        cfg = ConfigFile.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise UsageError("\n".join(lines)) from exc
    return cfg


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _git(args: argparse.Namespace, cfg: ConfigFile) -> GitSource | None:
    cfg_git = cfg.git_source()
    url = _pick(getattr(args, "git_url", None), cfg.git_url, cfg_git.url if cfg_git else None)
    if url is None:
        return None
    return GitSource(
        url=url,
        ref=_pick(getattr(args, "git_ref", None), cfg.git_ref, cfg_git.ref if cfg_git else None),
        path=_pick(getattr(args, "git_path", None), cfg.git_path, cfg_git.path if cfg_git else None),
        interval=_pick(getattr(args, "git_interval", None), cfg.git_interval, cfg_git.interval if cfg_git else None, 30.0),
    )


def build_settings(args: argparse.Namespace) -> Settings:
    """Command line over config file over built-in defaults."""
    cfg = load_config(getattr(args, "config", None))
    git = _git(args, cfg)
    cfg_manifests = cfg.manifests if isinstance(cfg.manifests, str) else None
    if git is not None and (getattr(args, "manifests", None) or cfg_manifests):
        raise UsageError("--manifests and a Git source are mutually exclusive")
    labels = cfg.host_labels or {}
    if getattr(args, "host_labels", None):
        try:
            labels = parse_host_labels(args.host_labels)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    values: dict[str, Any] = {
        "manifests": _pick(getattr(args, "manifests", None), cfg_manifests),
        "state_dir": _pick(args.state_dir, cfg.state_dir),
        "base_dir": _pick(getattr(args, "base_dir", None), cfg.base_dir),
        "metrics_addr": _pick(getattr(args, "metrics_addr", None), cfg.metrics_addr),
        "resync": _pick(getattr(args, "resync", None), cfg.resync),
        "max_agents": _pick(getattr(args, "max_agents", None), cfg.max_agents),
        "log_format": _pick(getattr(args, "log_format", None), cfg.log_format),
        "stop_agents_on_exit": _pick(getattr(args, "stop_agents_on_exit", None), cfg.stop_agents_on_exit),
        "host_name": _pick(getattr(args, "host_name", None), cfg.host_name),
        "allow_insecure_manifests": _pick(getattr(args, "allow_insecure_manifests", None), cfg.allow_insecure_manifests),
        "once": getattr(args, "once", False),
    }
    settings = Settings(**{k: v for k, v in values.items() if v is not None},
                        host_labels=labels, git=git, env=cfg.env,
                        providers={k: v.model_dump(exclude_none=True) for k, v in cfg.providers.items()})
    if settings.resync <= 0:
        raise UsageError("--resync must be positive")
    if settings.max_agents is not None and settings.max_agents < 0:
        raise UsageError("--max-agents must be >= 0")
    base = settings.base_dir.resolve()
    if not base.is_dir():
        raise UsageError(f"--base-dir {settings.base_dir}: not a directory")
    return settings.model_copy(update={"base_dir": base})


def state_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or ".agentctl")


# -- logging ------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        })


def setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every batch of changes at INFO


# -- run ----------------------------------------------------------------------
def lock_state_dir(state_dir: Path) -> int:
    """One controller per state dir: an exclusive flock held for the controller's life."""
    fd = os.open(state_dir / "controller.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise UsageError(f"another controller (pid {other or '?'}) is running on state dir {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def controller_running(state_dir: Path) -> bool:
    try:
        fd = os.open(state_dir / "controller.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _check_dirs(settings: Settings) -> None:
    if settings.git is None and not settings.manifests.is_dir():
        raise UsageError(f"--manifests {settings.manifests}: not a directory")
    if settings.git is None and not settings.allow_insecure_manifests:
        from controller.loader import insecure_paths

        bad = insecure_paths(settings.manifests)
        if bad:
            raise UsageError(f"--manifests {settings.manifests}: {bad[0]} is writable by other users, who could "
                             "make this controller run anything; chmod o-w it, or pass --allow-insecure-manifests")
    try:
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(settings.state_dir, 0o700)
    except OSError as exc:
        raise UsageError(f"--state-dir {settings.state_dir}: {exc.strerror or exc}") from exc
    if not os.access(settings.state_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--state-dir {settings.state_dir}: not writable")


def cmd_run(args: argparse.Namespace) -> int:
    from controller.runner import run_controller

    settings = build_settings(args)
    setup_logging(settings.log_format)
    _check_dirs(settings)
    try:
        host, port = parse_addr(settings.metrics_addr)
    except ValueError as exc:
        raise UsageError(f"--metrics-addr: {exc}") from exc
    if not is_loopback(host):
        log.warning("HTTP listener on non-loopback address %s (asked for explicitly)", host)
    lock = lock_state_dir(settings.state_dir)
    try:
        return run_controller(settings, host, port)
    finally:
        os.close(lock)


# -- validate / schema / plan -------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    paths = args.paths or [cfg.manifests if isinstance(cfg.manifests, str) else "manifests"]
    missing = [p for p in paths if not Path(p).exists()]
    for p in missing:
        print(f"{p}:0: no such file or directory")
    base = Path(args.base_dir or cfg.base_dir or ".").resolve()
    presets = merge_presets({k: v.model_dump(exclude_none=True) for k, v in cfg.providers.items()})
    # presets: the presets themselves, so that each provider's values are checked
    source = ManifestSource(*[p for p in paths if p not in missing], base_dir=base, providers=presets)
    result = source.load()
    for err in result.errors:
        print(err)
    files = len(result.names_by_file)
    if not result.errors and not missing:
        print(f"{len(result.manifests)} agents valid in {files} files", file=sys.stderr)
        return 0
    return 1


def cmd_schema(_: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from controller.runner import dry_run

    settings = build_settings(args)
    if settings.git is None and not settings.manifests.is_dir():
        raise UsageError(f"--manifests {settings.manifests}: not a directory")
    from controller.gitsource import GitError

    try:
        lines = dry_run(settings, running=controller_running(settings.state_dir))
    except GitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


# -- get / describe / logs ----------------------------------------------------
def _statuses(state_dir: Path) -> list[dict[str, Any]]:
    return status.read_all(state_dir / "status")


def _age(iso_time: str | None) -> str:
    if not iso_time:
        return "-"
    from datetime import datetime

    seconds = int(time.time() - datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(0, seconds)}s"


def _unknown(name: str) -> int:
    print(f"error: agent {name!r} not found", file=sys.stderr)
    return 1


def cmd_get(args: argparse.Namespace) -> int:
    docs = _statuses(state_dir_of(args))
    if args.name:
        docs = [d for d in docs if d.get("name") == args.name]
        if not docs:
            return _unknown(args.name)
    if args.output == "json":
        print(json.dumps(docs[0] if args.name else {"items": docs}, indent=2))
        return 0
    if args.output == "yaml":
        print(yaml.safe_dump(docs[0] if args.name else {"items": docs}, sort_keys=False), end="")
        return 0
    rows = [("NAME", "PHASE", "READY", "RESTARTS", "AGE", "SUPERVISOR")]
    for d in docs:
        rep = d.get("replicas") or {}
        rows.append((d["name"], d.get("phase", "?"), f"{rep.get('ready', 0)}/{rep.get('desired', 0)}",
                     str(d.get("restarts", 0)), _age(d.get("createdAt")), d.get("supervisor", "process")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from controller.describe import describe

    state_dir = state_dir_of(args)
    doc = status.read_status(state_dir / "status", args.name)
    if doc is None:
        return _unknown(args.name)
    print(describe(doc, state_dir), end="")
    return 0


def _log_path(state_dir: Path, name: str, instance: int) -> Path:
    return state_dir / "logs" / f"{name}-{instance}.log"


def cmd_logs(args: argparse.Namespace) -> int:
    state_dir = state_dir_of(args)
    path = _log_path(state_dir, args.name, args.instance)
    known = status.read_status(state_dir / "status", args.name) is not None
    if not known and not path.exists():
        return _unknown(args.name)
    if args.tail is not None:
        lines = logfiles.tail_lines(path, args.tail, raw=args.raw)
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
        offset = path.stat().st_size if path.exists() else 0
    else:
        offset = _copy(path, 0, args.raw)
    sys.stdout.flush()
    if args.follow:
        _follow(path, offset, args.raw)
    return 0


def _copy(path: Path, offset: int, raw: bool) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(1 << 16):
                text = chunk.decode("utf-8", errors="replace")
                sys.stdout.write(text if raw else logfiles.strip_escapes(text))
                offset += len(chunk)
    except FileNotFoundError:
        return 0
    return offset


def _follow(path: Path, offset: int, raw: bool) -> NoReturn:
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < offset:  # rotated (copy-truncate): start over at the top
            offset = 0
        if size > offset:
            offset = _copy(path, offset, raw)
            sys.stdout.flush()
        time.sleep(0.2)


# -- restart / attach / capture -----------------------------------------------
def cmd_restart(args: argparse.Namespace) -> int:
    state_dir = state_dir_of(args)
    if status.read_status(state_dir / "status", args.name) is None:
        return _unknown(args.name)
    if not controller_running(state_dir):
        print(f"error: no controller is running on state dir {state_dir}; start it with `agentctl run`", file=sys.stderr)
        return 1
    request = state_dir / "requests" / f"{args.name}.restart"
    status.atomic_write(request, f"{time.time()}{' fresh' if args.fresh else ''}\n")  # presets: --fresh
    deadline = time.monotonic() + 15
    while request.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if request.exists():
        print(f"restart of {args.name} requested; the controller has not picked it up yet", file=sys.stderr)
        return 0
    print(f"restart of {args.name} requested")
    return 0


def _tmux_instance(args: argparse.Namespace) -> tuple[Any, Any] | None:
    from controller.store import open_readonly

    state_dir = state_dir_of(args)
    doc = status.read_status(state_dir / "status", args.name)
    if doc is None:
        _unknown(args.name)
        return None
    if doc.get("supervisor") != "tmux":
        print(f"error: {args.name} runs under {doc.get('supervisor')}, not tmux", file=sys.stderr)
        return None
    store = open_readonly(state_dir)
    iid = f"{args.name}-{args.instance}"
    rec = next((r for r in (store.instances() if store else []) if r.id == iid), None)
    if rec is None or rec.handle is None:
        print(f"error: instance {iid} is not running", file=sys.stderr)
        return None
    from controller.supervisors.base import Context

    return Context(state_dir, (store.meta("controller_id") if store else None) or ""), rec.handle


def cmd_attach(args: argparse.Namespace) -> int:
    found = _tmux_instance(args)
    if found is None:
        return 1
    from controller.supervisors import tmux

    argv = tmux.attach_argv(*found)
    os.execvp(argv[0], argv)


def cmd_capture(args: argparse.Namespace) -> int:
    found = _tmux_instance(args)
    if found is None:
        return 1
    from controller.supervisors import tmux

    sys.stdout.write(tmux.capture(*found, args.raw))
    return 0


COMMANDS = {
    "run": cmd_run, "validate": cmd_validate, "plan": cmd_plan, "get": cmd_get, "describe": cmd_describe,
    "logs": cmd_logs, "restart": cmd_restart, "schema": cmd_schema, "attach": cmd_attach, "capture": cmd_capture,
}


def _bad_name(args: argparse.Namespace) -> bool:
    """A NAME is joined into state-dir paths: what cannot be an agent's name is unknown (exit 1)."""
    name = getattr(args, "name", None)
    if name is not None and not re.match(NAME_RE, name):
        print(f"error: agent {name!r} not found: not an agent name (lowercase letters, digits and '-')",
              file=sys.stderr)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command != "run":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `agentctl logs x | head` ends quietly
    try:
        if _bad_name(args):
            return 1
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
