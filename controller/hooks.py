"""Provider hooks that report activity (CONTRACT §9): claude's `--settings` hooks, codex's `notify`.

Effects layer. `sessions.prepare` asks for the settings file (written 0600 under
`<state-dir>/run/` before the start) and the argv values; the activity sampler reads the state
file the hook command (controller/hookstate.py) writes and weighs it against the screen with
`combine`. It never starts a process and never writes the state file itself.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from controller import hookstate
from controller.activity import Activity, Reading

RUN_DIR = "run"  # under the 0700 state dir, beside the supervisors' one-shot env files
HOOKSTATE = str(Path(hookstate.__file__).resolve())
# claude hook events and the activity each one means. Notification is a permission prompt, a
# question or a login (hookstate.py turns its "idle_prompt" kind into Idle); PostToolUse follows
# an answered permission prompt, when no UserPromptSubmit comes.
CLAUDE_HOOKS: dict[str, str] = {
    "UserPromptSubmit": "Working",
    "PostToolUse": "Working",
    "Stop": "Idle",
    "Notification": "WaitingForInput",
}
CODEX_NOTIFY = "Idle"  # codex runs its notify program only at agent-turn-complete
# Screen readings that win over an older hook state. claude's hooks cover every edge but not
# the dialogs shown before any hook can run (trust, login); codex's notify says only Idle, so a
# screen that has shown Working since is newer news.
SCREEN_OVERRIDES: dict[str, frozenset[Activity]] = {
    "claude": frozenset({Activity.WAITING_FOR_INPUT}),
    "codex": frozenset({Activity.WAITING_FOR_INPUT, Activity.WORKING}),
}


@dataclass(frozen=True)
class HookState:
    activity: Activity
    reason: str  # the hook event: UserPromptSubmit, Stop, Notification, AgentTurnComplete
    at: float  # wall clock the hook ran


def run_dir(log_path: Path) -> Path:
    """Instance logs live in <state-dir>/logs (settings.log_dir): the run dir is its sibling."""
    return log_path.parent.parent / RUN_DIR


def state_path(directory: Path, instance_id: str) -> Path:
    return directory / f"{instance_id}.activity"


def settings_path(directory: Path, instance_id: str) -> Path:
    return directory / f"{instance_id}.claude-settings.json"


def forget_files(log_path: Path, instance_id: str) -> None:
    """An instance removed for good leaves no hook state or settings file behind."""
    directory = run_dir(log_path)
    for path in (state_path(directory, instance_id), settings_path(directory, instance_id)):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # a file we cannot remove stays; it is read only for a live run of this id


def command(state_file: Path, activity: str) -> list[str]:
    # -I -S: the agent's PYTHONPATH, user site and cwd never change what runs
    return [sys.executable, "-I", "-S", HOOKSTATE, str(state_file), activity]


def claude_settings(state_file: Path) -> dict[str, object]:
    """claude settings with one command hook per event; claude runs a command through a shell,
    so each argument is quoted: paths only, never an env value."""
    return {"hooks": {event: [{"hooks": [{"type": "command", "command": shlex.join(command(state_file, act))}]}]
                      for event, act in CLAUDE_HOOKS.items()}}


def codex_notify(state_file: Path) -> str:
    """The `-c` override: codex runs this argv with the event's JSON appended (TOML array)."""
    return "notify=" + json.dumps(command(state_file, CODEX_NOTIFY))


def write_settings(path: Path, doc: dict[str, object]) -> None:
    """Written 0600 and atomically: a claude starting now reads the old file or the new one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)


def read_state(path: Path) -> HookState | None:
    """The last hook's state; None when no hook ran yet or the file is not one of ours."""
    try:
        with path.open("rb") as fh:
            doc = json.loads(fh.read(4096))
        activity, at = Activity(doc["activity"]), float(doc["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return HookState(activity, _reason(str(doc.get("event") or "")), at)


def _reason(event: str) -> str:
    # codex names its event agent-turn-complete; activityReason values are CamelCase
    return "".join(p[:1].upper() + p[1:] for p in event.replace("_", "-").split("-")) or "Hook"


def combine(screen: Reading | None, hook: HookState | None, *, screen_since: float, provider: str,
            run_started: float) -> Reading | None:
    """The reading status shows: a hook state of this run, unless the screen shows an overriding
    activity that began after the hook ran (a dialog no hook reported). Times are wall clock."""
    if hook is None or hook.at < run_started:
        return screen  # no hook ran in this run (yet): the screen is all we have
    if screen is not None and screen.activity in SCREEN_OVERRIDES.get(provider, frozenset()) \
            and screen_since > hook.at:
        return screen
    return Reading(hook.activity, hook.reason, screen.fingerprint if screen else "")
