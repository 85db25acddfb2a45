"""Who may read what on the HTTP listener: Host names (DNS rebinding), single-use access tokens
handed out through the 0700 state dir, and the session cookies they are traded for.

Called by controller.http (the listener's threads) and by `agentctl dashboard` (issue_token).
Holds no controller state; sessions live in memory only, so a restarted controller forgets them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from http.cookies import CookieError, SimpleCookie
from pathlib import Path

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
TOKEN_TTL = 3600.0  # seconds a printed dashboard URL stays redeemable
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 32  # the oldest session is forgotten beyond this
WILDCARDS = ("0.0.0.0", "::")


# -- Host names -----------------------------------------------------------------
def own_hosts(bound_host: str, port: int, interfaces: tuple[str, ...] = ()) -> frozenset[str]:
    """Host header values that name the listener itself, as bound; `interfaces` are the host's
    addresses, which a wildcard bind (0.0.0.0, ::) listens on too."""
    if bound_host in WILDCARDS:
        # bound everywhere (asked for explicitly): every address of the host, loopback included
        hosts = {"localhost"} | {f"[{a}]" if ":" in a else a for a in ("127.0.0.1", "::1", *interfaces)}
    elif ":" in bound_host:
        hosts = {f"[{bound_host}]"} | ({"localhost"} if bound_host == "::1" else set())
    else:
        hosts = {bound_host} | ({"localhost"} if bound_host.startswith("127.") else set())
    return frozenset(f"{h}:{port}" for h in hosts) | (frozenset(hosts) if port == 80 else frozenset())


def host_allowed(header: str | None, own: frozenset[str], extra: tuple[str, ...]) -> bool:
    """A name in `extra` without a port matches that name on any port (a reverse proxy's Host)."""
    if not header:
        return False
    host = header.strip().lower()
    if host in own or host in extra:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in extra


# -- tokens ---------------------------------------------------------------------
def token_dir(state_dir: Path) -> Path:
    return state_dir / "tokens"


def _token_path(state_dir: Path, token: str) -> Path:
    # only a hash is on disk: a listing of the directory gives nobody a usable token
    return token_dir(state_dir) / hashlib.sha256(token.encode()).hexdigest()


def issue_token(state_dir: Path) -> str:
    """A fresh single-use token, kept as a 0600 file in a 0700 dir of the state dir."""
    tokens = token_dir(state_dir)
    tokens.mkdir(mode=0o700, exist_ok=True)
    os.chmod(tokens, 0o700)
    prune_tokens(state_dir, time.time())
    token = secrets.token_urlsafe(32)
    path = _token_path(state_dir, token)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    owner = os.stat(state_dir).st_uid
    if os.geteuid() == 0 and owner != 0:
        # root asking for a controller that runs as its own user: that user must read and consume it
        os.chown(tokens, owner, -1)
        os.chown(path, owner, -1)
    return token


def prune_tokens(state_dir: Path, now: float) -> None:
    try:
        entries = list(os.scandir(token_dir(state_dir)))
    except OSError:
        return
    for entry in entries[:1000]:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > TOKEN_TTL:
                os.unlink(entry.path)
        except OSError:
            continue


def redeem_token(state_dir: Path, token: str, now: float) -> bool:
    """True once for a token issued by `agentctl dashboard` within TOKEN_TTL; the file is consumed."""
    if not TOKEN_RE.match(token):
        return False
    path = _token_path(state_dir, token)
    try:
        st = os.lstat(path)
        os.unlink(path)  # the unlink that succeeds is the one use
    except OSError:
        return False
    # made by this user (or root) through the 0700 dir, a plain private file, and recent
    return (stat.S_ISREG(st.st_mode) and st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o077
            and now - st.st_mtime <= TOKEN_TTL)


# -- sessions -------------------------------------------------------------------
def cookie_name(port: int) -> str:
    # cookies do not tell ports apart: two controllers on one host must not overwrite each other's
    return f"agentctl_session_{port}"


class Sessions:
    """Session secrets given out for redeemed tokens; only their hashes are kept."""

    def __init__(self, ttl: float = SESSION_TTL, limit: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.limit = limit
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def new(self) -> str:
        secret = secrets.token_urlsafe(32)
        with self._lock:
            self._expiry[self._key(secret)] = time.monotonic() + self.ttl
            while len(self._expiry) > self.limit:
                self._expiry.popitem(last=False)
        return secret

    def valid(self, secret: str | None) -> bool:
        if not secret:
            return False
        key = self._key(secret)
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is not None and expiry < time.monotonic():
                del self._expiry[key]
                expiry = None
        return expiry is not None

    @staticmethod
    def _key(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()


def cookie_value(header: str | None, name: str) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def set_cookie(name: str, secret: str) -> str:
    # HttpOnly: the page's script never sees it; Strict: no other site's page can send it along
    return f"{name}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(SESSION_TTL)}"

