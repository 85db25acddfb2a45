"""Resumable provider sessions (CONTRACT §9 `session: {resume: true}`): the id each start uses.

Runtime layer, called by the reconciler just before an instance starts and by `plan`. Chooses
our stable id, finds codex's own id (its `--json` log or its session files), adds the activity
hooks of interactive sessions (controller.hooks) and re-renders the argv with them. Writes only
the hooks' settings file, and only when asked (`plan` does not); never changes the spec hash.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from controller import hooks
from controller.manifests import AgentSpec
from controller.model import InstanceRecord, InstanceSpec
from controller.providers import HEADLESS, INTERACTIVE, Preset, SessionArgs, mode_of, render, resumes

log = logging.getLogger("agentctl.sessions")
LOG_SCAN_BYTES = 1 << 20  # the thread id is in the first event of a run: never read a whole log
SESSION_FILES_SCANNED = 200
ANSI = re.compile(rb"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07]*\x07|[@-_])")  # a terminal's moves and colours
NO_CONVERSATION = re.compile(r"no conversation found", re.IGNORECASE)
THREAD_STARTED = re.compile(rb'"type"\s*:\s*"thread\.started"\s*,\s*"thread_id"\s*:\s*"([0-9A-Za-z-]{8,64})"')


@dataclass(frozen=True)
class StartSession:
    """What a start records beside its handle (InstanceRecord fields of the same names)."""

    session_id: str = ""
    provider_session_id: str = ""
    argv: tuple[str, ...] = ()


def prepare(spec: InstanceSpec, agent_spec: AgentSpec | None, presets: Mapping[str, Preset],
            prev: InstanceRecord | None, *, log_path: Path, taken: Collection[str] = (),
            write_files: bool = True) -> tuple[InstanceSpec, StartSession]:
    """The spec this start runs (argv with session flags and activity hooks, AGENTCTL_SESSION_ID)
    and what to record. `write_files=False` (plan) computes the same argv and writes nothing."""
    preset = presets.get(agent_spec.provider or "") if agent_spec is not None else None
    if agent_spec is None or preset is None:
        return spec, StartSession(argv=spec.argv)
    hook_args = _hook_args(spec.id, agent_spec, preset, log_path=log_path, write_files=write_files)
    if not resumes(agent_spec):
        if hook_args == SessionArgs():
            return spec, StartSession(argv=spec.argv)
        argv, _ = render(preset, agent_spec, hook_args)
        return replace(spec, argv=tuple(argv)), StartSession(argv=tuple(argv))
    same = prev is not None and bool(prev.session_id)
    sid = prev.session_id if prev is not None and same else str(uuid.uuid4())
    started = same and prev is not None and prev.session_started
    provider_id = prev.provider_session_id if prev is not None and same else ""
    if preset.resume == "own-id":
        # claude: --session-id on the instance's first start, --resume on every later one; unless
        # the last --resume was refused because claude never recorded the session (its first
        # start failed before it could, e.g. offline): the id is still free, name it again
        if started and prev is not None and _resume_refused(prev, sid, log_path):
            log.warning("%s: claude has no conversation %s; starting it again with --session-id", spec.id, sid)
            started = False
        args, provider_id = (SessionArgs(resume_id=sid) if started else SessionArgs(new_id=sid)), sid
    else:
        if not provider_id and started and prev is not None:
            provider_id = discover(agent_spec, prev, spec, log_path=log_path, taken=taken)
        args = SessionArgs(resume_id=provider_id)
    argv, _ = render(preset, agent_spec, replace(args, settings_file=hook_args.settings_file,
                                                 notify_config=hook_args.notify_config))
    env = tuple(sorted((*spec.env, ("AGENTCTL_SESSION_ID", sid))))
    return replace(spec, argv=tuple(argv), env=env), StartSession(sid, provider_id, tuple(argv))


def _hook_args(iid: str, agent_spec: AgentSpec, preset: Preset, *, log_path: Path,
               write_files: bool) -> SessionArgs:
    """An interactive session reports its activity through its CLI's hooks (CONTRACT §9); the
    settings file is rewritten at every start, so a moved install or state dir is followed."""
    if mode_of(agent_spec) != INTERACTIVE or not preset.hooks:
        return SessionArgs()
    run_dir = hooks.run_dir(log_path)
    state = hooks.state_path(run_dir, iid)
    if preset.hooks == "codex-notify":
        return SessionArgs(notify_config=hooks.codex_notify(state))
    path = hooks.settings_path(run_dir, iid)
    if write_files:
        try:
            hooks.write_settings(path, hooks.claude_settings(state))
        except OSError as exc:  # the session still starts; its activity comes from its screen
            log.error("%s: cannot write the hook settings %s: %s; activity from the screen only", iid, path, exc)
            return SessionArgs()
    return SessionArgs(settings_file=str(path))


def _resume_refused(prev: InstanceRecord, sid: str, log_path: Path) -> bool:
    """The last run was `--resume sid`, failed, and its output says the conversation does not
    exist (claude 2.1.332: `No conversation found with session ID: <id>`, also on a terminal)."""
    if "--resume" not in prev.argv or prev.last_exit is None or not prev.last_exit.failed:
        return False
    text = ANSI.sub(b" ", _read_from(log_path, prev.log_offset)).decode(errors="replace")
    return sid in text and NO_CONVERSATION.search(" ".join(text.split())) is not None


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(LOG_SCAN_BYTES)
    except OSError:
        return b""


def discover(agent_spec: AgentSpec, prev: InstanceRecord, spec: InstanceSpec, *, log_path: Path,
             taken: Collection[str]) -> str:
    """codex chooses its own id: read it from the last run's --json events, else from its session files."""
    found = thread_id_in_log(log_path, prev.log_offset) if mode_of(agent_spec) == HEADLESS else ""
    found = found or session_file_id(codex_home(dict(spec.env)), spec.cwd, prev.started_at, taken)
    if not found:
        log.warning("%s: codex's session id of the last run was not found; starting a new session", spec.id)
    return found


def thread_id_in_log(path: Path, offset: int) -> str:
    """`{"type":"thread.started","thread_id":...}`, the first event `codex exec --json` prints."""
    match = THREAD_STARTED.search(_read_from(path, offset))
    return match.group(1).decode() if match else ""


def codex_home(env: Mapping[str, str]) -> Path:
    """Where the agent's codex keeps its sessions: its env first, then the controller's."""
    if env.get("CODEX_HOME"):
        return Path(env["CODEX_HOME"])
    home = env.get("HOME") or os.environ.get("HOME") or "/"
    return Path(home) / ".codex"


def session_file_id(home: Path, cwd: str, since: float, taken: Collection[str]) -> str:
    """The first session codex recorded for `cwd` at or after `since` (wall clock), not claimed by
    another instance: rollout files under sessions/YYYY/MM/DD/ open with a session_meta line."""
    best: tuple[float, str] | None = None
    for path in _recent_rollouts(home / "sessions", since):
        meta = _session_meta(path)
        if meta is None or meta.get("cwd") != cwd or str(meta.get("id", "")) in taken:
            continue
        at = _timestamp(str(meta.get("timestamp", "")))
        if at is not None and at >= since - 2 and (best is None or at < best[0]):
            best = (at, str(meta["id"]))
    return best[1] if best else ""


def _recent_rollouts(root: Path, since: float) -> list[Path]:
    try:
        files = sorted(root.glob("*/*/*/rollout-*.jsonl"))[-SESSION_FILES_SCANNED:]
        return [p for p in files if p.stat().st_mtime >= since - 2]
    except OSError:
        return []


def _session_meta(path: Path) -> dict[str, object] | None:
    try:
        with path.open("rb") as fh:
            first = json.loads(fh.readline(LOG_SCAN_BYTES))
    except (OSError, ValueError):
        return None
    payload = first.get("payload") if isinstance(first, dict) and first.get("type") == "session_meta" else None
    return payload if isinstance(payload, dict) and payload.get("id") else None


def _timestamp(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
