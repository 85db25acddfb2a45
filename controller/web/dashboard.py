"""`agentctl dashboard [--url]`: the status page's address with a fresh single-use access token.

Entry-layer helper called by cli.cmd_dashboard. It finds the running controller's listener in
<state-dir>/controller.json and leaves the token in <state-dir>/tokens/ (0700), where only the
controller's own user can put one; the controller trades it for a session cookie once.
"""

from __future__ import annotations

import json
import os
import sys
import webbrowser
from pathlib import Path

from controller.web.access import issue_token


def page_url(metrics_addr: str, token: str) -> str:
    host, _, port = metrics_addr.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"  # bound everywhere: loopback reaches it and is one of its own names
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/?token={token}"


def _desktop() -> bool:
    """A browser can be shown: a graphical session, or macOS."""
    return sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _foreign(state_dir: Path) -> bool:
    """The state dir (or a directory above it) is another user's: no token for us."""
    try:
        exists = state_dir.is_dir()
    except OSError:
        return True
    return exists and not os.access(state_dir, os.R_OK | os.W_OK | os.X_OK)


def _listener(state_dir: Path) -> str | None:
    try:
        info = json.loads((state_dir / "controller.json").read_text())
    except (OSError, ValueError):
        return None
    addr = info.get("metricsAddr") if isinstance(info, dict) else None
    return addr if isinstance(addr, str) and ":" in addr else None


def dashboard(state_dir: Path, *, running: bool, open_browser: bool) -> int:
    if _foreign(state_dir):
        print(f"error: state dir {state_dir} is not accessible to this user: only the controller's own user "
              "can make an access token", file=sys.stderr)
        return 1
    addr = _listener(state_dir) if running else None
    if addr is None:
        print(f"error: no controller is running on state dir {state_dir}; start it with `agentctl run`",
              file=sys.stderr)
        return 1
    try:
        token = issue_token(state_dir)
    except OSError as exc:
        print(f"error: cannot create an access token in {state_dir}/tokens: {exc.strerror or exc} "
              "(run this as the controller's user)", file=sys.stderr)
        return 1
    url = page_url(addr, token)
    print(url, flush=True)
    if open_browser and _desktop():
        webbrowser.open(url)
    return 0
