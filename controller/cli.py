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
from typing import TYPE_CHECKING, Any

import yaml

from controller import __version__, opscommands, status
from controller.selectors import SelectorError

if TYPE_CHECKING:
    from controller.settings import ConfigFile, Coordination, GitSource, Settings
    from controller.sourcelock import SourceLock

# Commands import what only they need (settings, manifests, loader: pydantic) where they run:
# `get` and the other read-only commands start in a fraction of the time without pydantic.

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
    p.add_argument("--git-max-bytes", type=_size, help="most one revision's export of --git-path may hold "
                   "(default 100Mi)")
    p.add_argument("--host-name")
    p.add_argument("--host-labels", help="k=v,k2=v2")
    p.add_argument("--max-agents", type=int)


def _fleet_flags(p: argparse.ArgumentParser) -> None:
    """CONTRACT §10: a fleet coordinated by etcd."""
    p.add_argument("--etcd-endpoints", help="URL[,URL...] of etcd: join a coordinated fleet")
    p.add_argument("--fleet", help="fleet name: keys live under /agentctl/<fleet>/ (default: default)")
    p.add_argument("--lease-ttl", type=int, help="seconds, 2..60 (default 10)")


EXAMPLES = {
    "run": "agentctl run --manifests ./manifests --state-dir ./.agentctl\n  agentctl run --git-url https://host/repo.git --git-path agents",
    "validate": "agentctl validate manifests/\n  agentctl validate --base-dir examples examples/agents/",
    "plan": "agentctl plan --manifests ./manifests",
    "get": "agentctl get\n  agentctl get -l team=infra,tier!=gpu -o wide\n  agentctl get reviewer -o yaml\n  agentctl get -w",
    "describe": "agentctl describe reviewer",
    "logs": "agentctl logs reviewer --tail 50\n  agentctl logs ticker --instance 1 -f\n  agentctl logs ticker --instance ticker-1",
    "restart": "agentctl restart reviewer",
    "schema": "agentctl schema > agent.schema.json",
    "attach": "agentctl attach pair --instance 0   (detach with C-b d)",
    "capture": "agentctl capture pair",
    "wait": "agentctl wait reviewer --for=phase=Running --timeout=90s\n  agentctl wait a b --for=condition=Ready\n"
            "  agentctl wait old --for=delete --timeout=5m",
    "suspend": "agentctl suspend reviewer   (lift it with: agentctl resume reviewer)",
    "resume": "agentctl resume reviewer",
    "reconcile": "agentctl reconcile --wait",
    "diff": "agentctl diff\n  agentctl diff reviewer --manifests ./manifests",
    "completion": "source <(agentctl completion bash)\n  agentctl completion fish | source",
}


def _sub(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with examples."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text,
                                                epilog=f"example:\n  {EXAMPLES[name]}",
                                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def _tail(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of lines") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: must be 0 or more lines")
    return n


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="agentctl", description="Declarative controller for long-running agents.")
    top.add_argument("--version", action="version", version=f"agentctl {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _sub(sub, "run", "run the controller in the foreground")
    _common(run)
    _source_flags(run)
    run.add_argument("--metrics-addr", help="HOST:PORT of the read-only HTTP listener (default 127.0.0.1:9478)")
    run.add_argument("--resync", type=float, help="seconds between full resyncs (default 30)")
    run.add_argument("--log-format", choices=["text", "json"])
    run.add_argument("--once", action="store_true", help="one reconcile pass, then exit")
    run.add_argument("--stop-agents-on-exit", action="store_true", default=None)
    run.add_argument("--allow-insecure-manifests", action="store_true", default=None)
    # http: Host names (beyond the listener's own address) the HTTP listener answers
    run.add_argument("--http-allowed-hosts", metavar="NAME[:PORT],...",
                     help="Host header names the HTTP listener also answers (e.g. a reverse proxy's)")
    _fleet_flags(run)

    val = _sub(sub, "validate", "validate manifests without touching anything")
    val.add_argument("paths", nargs="*")
    val.add_argument("--base-dir")
    val.add_argument("--config")
    _common(val)

    plan = _sub(sub, "plan", "print the actions the next reconcile would take")
    _common(plan)
    _source_flags(plan)

    get = _sub(sub, "get", "list agents (REASON: the one thing to know, empty when all is well)")
    get.add_argument("name", nargs="?")
    get.add_argument("-l", "--selector", help="label selector: k=v, k!=v, k, !k; comma = and")
    get.add_argument("-o", "--output", choices=["table", "wide", "json", "yaml"], default="table")
    get.add_argument("-w", "--watch", action="store_true", help="after the table, one row per change until Ctrl-C")
    _common(get)

    desc = _sub(sub, "describe", "show one agent in detail: the spec its instances run, status, events")
    desc.add_argument("name")
    _common(desc)

    logs = _sub(sub, "logs", "print an agent's output (every instance, each line prefixed [NAME-i])")
    logs.add_argument("name")
    logs.add_argument("--instance", default=None, help="N or NAME-N (default: all instances)")
    logs.add_argument("--tail", type=_tail, default=None, help="last N lines of each instance")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--raw", action="store_true", help="keep terminal escape codes")
    _common(logs)

    restart = _sub(sub, "restart", "ask the running controller to restart an agent")
    restart.add_argument("name")
    restart.add_argument("--fresh", action="store_true", help="start new sessions (new session ids)")
    _common(restart)

    _common(_sub(sub, "schema", "print the manifest JSON Schema"))

    attach = _sub(sub, "attach", "attach the terminal to a tmux instance")
    attach.add_argument("name")
    attach.add_argument("--instance", type=int, default=0)
    _common(attach)

    capture = _sub(sub, "capture", "print the screen of a tmux instance")
    capture.add_argument("name")
    capture.add_argument("--instance", type=int, default=0)

    # http: the status page's address with a fresh access token
    dash = sub.add_parser("dashboard", help="print (and on a desktop open) the status page with an access token")
    dash.add_argument("--url", action="store_true", help="only print the address")
    _common(dash)
    for verb, text in (("drain", "move every instance off HOST and keep new ones off"),
                       ("uncordon", "let HOST take instances again")):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("host")
        cmd.add_argument("--config", help="controller config file (YAML): its coordination block")
        _fleet_flags(cmd)
        _common(cmd)
    capture.add_argument("--raw", action="store_true")
    _common(capture)

    wait = _sub(sub, "wait", "wait until every NAME meets a condition (kubectl wait)")
    wait.add_argument("names", nargs="+", metavar="NAME")
    wait.add_argument("--for", dest="for_", required=True, metavar="CONDITION",
                      help="phase=PHASE | condition=TYPE[=STATUS] | delete")
    wait.add_argument("--timeout", default="30s", help="90s, 5m, 1h (default 30s)")
    _common(wait)

    for verb, text in (("suspend", "stop an agent's instances and keep them stopped (kept in the state dir)"),
                       ("resume", "lift `agentctl suspend`")):
        p = _sub(sub, verb, text)
        p.add_argument("name")
        _common(p)

    rec = _sub(sub, "reconcile", "wake the controller now: a Git fetch and a full pass")
    rec.add_argument("--wait", action="store_true", help="return once that pass is over")
    rec.add_argument("--timeout", default="60s", help="with --wait (default 60s)")
    _common(rec)

    diff = _sub(sub, "diff", "unified diff: the spec the instances run vs the manifest on disk")
    diff.add_argument("name", nargs="?")
    _common(diff)
    _source_flags(diff)

    comp = _sub(sub, "completion", "print a shell completion script")
    comp.add_argument("shell", choices=["bash", "zsh", "fish"])
    _common(comp)
    return top


# -- settings -----------------------------------------------------------------
def load_config(path: str | None) -> ConfigFile:
    from pydantic import ValidationError

    from controller.settings import ConfigFile

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
    from controller.settings import GIT_MAX_BYTES, GitSource

    cfg_git = cfg.git_source()
    url = _pick(getattr(args, "git_url", None), cfg.git_url, cfg_git.url if cfg_git else None)
    if url is None:
        return None
    return GitSource(
        url=url,
        ref=_pick(getattr(args, "git_ref", None), cfg.git_ref, cfg_git.ref if cfg_git else None),
        path=_pick(getattr(args, "git_path", None), cfg.git_path, cfg_git.path if cfg_git else None),
        interval=_pick(getattr(args, "git_interval", None), cfg.git_interval, cfg_git.interval if cfg_git else None, 30.0),
        max_bytes=_pick(getattr(args, "git_max_bytes", None), cfg.git_max_bytes,
                        cfg_git.max_bytes if cfg_git else None, GIT_MAX_BYTES),
    )


def _size(text: str) -> int:
    from controller.settings import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_settings(args: argparse.Namespace) -> Settings:
    """Command line over config file over built-in defaults."""
    from controller.settings import Settings, parse_host_labels

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
                        http_allowed_hosts=_allowed_hosts(args, cfg),  # http: --http-allowed-hosts
                        host_labels=labels, git=git, env=cfg.env, coordination=coordination(args, cfg),
                        providers={k: v.model_dump(exclude_none=True) for k, v in cfg.providers.items()})
    if settings.resync <= 0:
        raise UsageError("--resync must be positive")
    if settings.max_agents is not None and settings.max_agents < 0:
        raise UsageError("--max-agents must be >= 0")
    if settings.once and settings.coordination is not None:
        # coordinated instances live only under a lease this process renews: it would be fenced at exit
        raise UsageError("--once cannot run a coordinated fleet (--etcd-endpoints or coordination:)")
    base = settings.base_dir.resolve()
    if not base.is_dir():
        raise UsageError(f"--base-dir {settings.base_dir}: not a directory")
    return settings.model_copy(update={"base_dir": base})


def _allowed_hosts(args: argparse.Namespace, cfg: ConfigFile) -> tuple[str, ...]:
    from controller.settings import parse_allowed_hosts  # http: --http-allowed-hosts

    # http: --http-allowed-hosts over the config file's httpAllowedHosts
    value = _pick(getattr(args, "http_allowed_hosts", None), cfg.http_allowed_hosts)
    try:
        return parse_allowed_hosts(value) if value is not None else ()
    except ValueError as exc:
        raise UsageError(f"--http-allowed-hosts: {exc}") from exc
def coordination(args: argparse.Namespace, cfg: ConfigFile) -> Coordination | None:
    """--etcd-endpoints/--fleet/--lease-ttl over the config's `coordination:` (CONTRACT §10)."""
    from pydantic import ValidationError

    from controller.settings import Coordination

    endpoints = getattr(args, "etcd_endpoints", None)
    base = cfg.coordination
    if endpoints is None and base is None:
        if getattr(args, "fleet", None) is not None or getattr(args, "lease_ttl", None) is not None:
            raise UsageError("--fleet and --lease-ttl need --etcd-endpoints (or coordination: in --config)")
        return None
    data: dict[str, Any] = base.model_dump(by_alias=True) if base is not None else {"etcd": {}}
    if endpoints is not None:
        data["etcd"]["endpoints"] = [e.strip() for e in endpoints.split(",") if e.strip()]
    for flag, key in (("fleet", "fleet"), ("lease_ttl", "leaseTTL")):
        if getattr(args, flag, None) is not None:
            data[key] = getattr(args, flag)
    try:
        return Coordination.model_validate(data)
    except ValidationError as exc:
        raise UsageError("; ".join(f"coordination.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                   for e in exc.errors(include_url=False))) from exc


def cmd_drain(args: argparse.Namespace) -> int:
    cfg = coordination(args, load_config(args.config))
    if cfg is None:
        raise UsageError(f"{args.command} needs --etcd-endpoints (or coordination: in --config)")
    from controller.fleet.admin import drain

    code, message = drain(cfg, args.host, on=args.command == "drain")
    print(message, file=sys.stderr if code else sys.stdout)
    return code


def state_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or ".agentctl")


# -- logging ------------------------------------------------------------------
LOG_FIELDS = ("agent", "instance", "action", "reason")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            # fields a log pipeline can filter on, given by the call sites with extra=
            **{k: getattr(record, k) for k in LOG_FIELDS if getattr(record, k, None) not in (None, "")},
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
    from controller.opsrequests import lock_held

    return lock_held(state_dir) is True


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
    from controller.settings import is_loopback, parse_addr

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
        source = lock_source(settings)  # storefix: one controller per manifests source on this host
    except UsageError:
        os.close(lock)
        raise
    try:
        return run_controller(settings, host, port)
    finally:
        source.release()
        os.close(lock)


def lock_source(settings: Settings) -> SourceLock:
    """A second controller on the same manifests (whatever its state dir) would run every agent twice."""
    from controller.sourcelock import SourceLocked, source_keys
    from controller.sourcelock import acquire as acquire_source

    git = (settings.git.url, settings.git.path or "") if settings.git is not None else None
    try:
        keys = source_keys(settings.manifests, git, host=settings.host_name)
        return acquire_source(keys, state_dir=settings.state_dir)
    except SourceLocked as exc:
        raise UsageError(str(exc)) from None


# -- validate / schema / plan -------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from controller.loader import ManifestSource
    from controller.providers import merge_presets

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
    from controller.manifests import json_schema

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


# -- describe / diff / completion (get, logs, wait, suspend... live in opscommands) -----
def cmd_describe(args: argparse.Namespace) -> int:
    from controller.describe import describe

    state_dir, _ = opscommands.open_state(args)
    doc = opscommands.require_known(state_dir, args.name)
    print(describe(doc, state_dir), end="")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from controller.reconciler import Controller

    settings = build_settings(args)
    if settings.git is not None:
        raise UsageError("diff compares with a manifests directory; for a Git source use `agentctl plan`")
    if not settings.manifests.is_dir():
        raise UsageError(f"--manifests {settings.manifests}: not a directory")
    logging.getLogger("agentctl").setLevel(logging.ERROR)  # the load's warnings are what the diff shows
    controller = Controller(settings)
    controller.open_readonly()
    try:
        if args.name and args.name not in controller.agents and not _declared(controller, args.name):
            raise opscommands.CommandError(f"agent {args.name!r} is neither running nor declared in {settings.manifests}")
        lines = opscommands.diff_lines(controller, Path.cwd(), args.name)
        broken = [] if args.name else opscommands.unnamed_errors(controller)
    finally:
        if controller.store is not None:
            controller.store.close()
    return opscommands.print_diff(lines, broken)


def _declared(controller: Any, name: str) -> bool:
    result = controller.source.load()
    return name in result.manifests or any(name in names for names in result.names_by_file.values())


def cmd_completion(args: argparse.Namespace) -> int:
    from controller.completion import script

    commands: dict[str, list[str]] = {}
    names: list[str] = []
    for action in parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for cmd, sub in action.choices.items():
            commands[cmd] = sorted({o for a in sub._actions for o in a.option_strings if o != "-h"} | {"--help"})
            if any(a.dest == "name" or a.dest == "names" for a in sub._actions) and cmd != "completion":
                names.append(cmd)
    print(script(args.shell, commands, names), end="")
    return 0


def _unknown(name: str) -> int:
    print(f"error: agent {name!r} not found", file=sys.stderr)
    return 1


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


def _terminal_instance(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """(the adapter with the Terminal capability, the instance's handle), or None after an error.
    Which adapters have a terminal is theirs to say (supervisors.base.Terminal), not the CLI's."""
    from controller.store import open_readonly
    from controller.supervisors.base import Context, Terminal
    from controller.supervisors.registry import adapter

    state_dir = state_dir_of(args)
    doc = status.read_status(state_dir / "status", args.name)
    if doc is None:
        _unknown(args.name)
        return None
    kind = str(doc.get("supervisor") or "process")
    store = open_readonly(state_dir)
    sup = adapter(kind, Context(state_dir, (store.meta("controller_id") if store else None) or ""))
    if not isinstance(sup, Terminal):
        print(f"error: {args.name} runs under {kind}, not tmux: only an instance with a terminal can be "
              f"attached or captured", file=sys.stderr)
        return None
    iid = f"{args.name}-{args.instance}"
    rec = next((r for r in (store.instances() if store else []) if r.id == iid), None)
    if rec is None or rec.handle is None:
        print(f"error: instance {iid} is not running", file=sys.stderr)
        return None
    return sup, rec.handle


def cmd_attach(args: argparse.Namespace) -> int:
    found = _terminal_instance(args)
    if found is None:
        return 1
    sup, handle = found
    argv = sup.attach_argv(handle)
    os.execvp(argv[0], argv)


def cmd_capture(args: argparse.Namespace) -> int:
    from controller.screens import exited_screen  # activity: the last screen of an exited instance

    state_dir = state_dir_of(args)
    last = exited_screen(state_dir, status.read_status(state_dir / "status", args.name),
                         f"{args.name}-{args.instance}", args.raw)
    if last is not None:
        sys.stdout.write(last)
        return 0
    found = _terminal_instance(args)
    if found is None:
        return 1
    sup, handle = found
    sys.stdout.write(sup.capture(handle, args.raw))
    return 0


# -- dashboard (http) -----------------------------------------------------------
def cmd_dashboard(args: argparse.Namespace) -> int:
    from controller.web.dashboard import dashboard

    state_dir = state_dir_of(args)
    return dashboard(state_dir, running=controller_running(state_dir), open_browser=not args.url)


COMMANDS = {
    "run": cmd_run, "validate": cmd_validate, "plan": cmd_plan, "get": opscommands.cmd_get, "describe": cmd_describe,
    "logs": opscommands.cmd_logs, "restart": cmd_restart, "schema": cmd_schema, "attach": cmd_attach,
    "capture": cmd_capture, "wait": opscommands.cmd_wait, "suspend": opscommands.cmd_suspend,
    "resume": opscommands.cmd_resume, "reconcile": opscommands.cmd_reconcile, "diff": cmd_diff,
    "completion": cmd_completion,
    "dashboard": cmd_dashboard,  # http: the status page's address
    "drain": cmd_drain, "uncordon": cmd_drain,
}


def _bad_name(args: argparse.Namespace) -> bool:
    """A NAME is joined into state-dir paths: what cannot be an agent's name is unknown (exit 1)."""
    names = [n for n in [getattr(args, "name", None), *(getattr(args, "names", None) or [])] if n is not None]
    if not names:
        return False
    from controller.manifests import NAME_RE

    for name in names:
        if not re.match(NAME_RE, name):
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
    except (UsageError, opscommands.UsageError, SelectorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except opscommands.CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
