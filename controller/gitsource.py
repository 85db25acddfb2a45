"""A Git repository as the manifest source: a private clone kept under the state dir.

Effects layer, called by the runner on a timer and by `plan`. Each revision is exported
into its own directory and `current` is a symlink swapped atomically (as git-sync does),
so no reconcile ever reads a half-updated tree. A user's working tree is never touched.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agentctl.git")
GIT_TIMEOUT = 120.0


class GitError(Exception):
    pass


def fetch_error(url: str, error: str) -> str:
    """One sentence that names the URL and says "git fetch" once (opscli: was said twice)."""
    for prefix in ("git fetch failed: ", "git clone failed: ", "git ls-remote failed: "):
        if error.startswith(prefix):
            return f"{prefix.split(' failed')[0]} of {url} failed: {error[len(prefix):]}"
    return f"git fetch of {url} failed: {error}"


@dataclass(frozen=True)
class SyncResult:
    revision: str | None  # the revision `current` points at after this sync
    changed: bool
    error: str | None = None


def _git(*args: str, cwd: Path | None = None, timeout: float = GIT_TIMEOUT) -> bytes:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError as exc:
        raise GitError("git is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {args[0]} timed out after {timeout:g}s") from exc
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        cause = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))), lines[-1] if lines else "")
        raise GitError(f"git {args[0]} failed: {cause or f'exit {done.returncode}'}")
    return done.stdout


class GitSource:
    def __init__(self, url: str, *, ref: str | None, path: str | None, workdir: Path) -> None:
        self.url = url
        self.ref = ref
        self.path = (path or "").strip("/")
        self.dir = workdir
        self.repo = workdir / "repo.git"
        self.current = workdir / "current"
        self.last_sync: float | None = None  # wall time of the last successful fetch
        self.last_error: str | None = None

    @property
    def revision(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        return Path(target).name.removeprefix("rev-")

    def manifests_root(self) -> Path | None:
        """The manifests dir of the current revision, resolved once so a load sees one revision."""
        rev = self.revision
        if rev is None:
            return None
        return (self.dir / f"rev-{rev}" / self.path) if self.path else self.dir / f"rev-{rev}"

    def display_root(self) -> str:
        return self.path or "."

    def sync(self) -> SyncResult:
        """Fetch the ref; when it moved, export the new tree and swap `current` to it."""
        before = self.revision
        try:
            sha = self._fetch()
            if sha != before:
                self._export(sha)
                if self.path and not (self.dir / f"rev-{sha}" / self.path).is_dir():
                    # as Flux does: a revision without the folder is an error, not "delete everything"
                    raise GitError(f"path {self.path!r} not found in revision {sha}")
                self._swap(sha)
                self._prune(keep={sha, before})
        except GitError as exc:
            self.last_error = str(exc)
            return SyncResult(before, False, str(exc))
        self.last_sync = time.time()
        self.last_error = None
        return SyncResult(sha, sha != before)

    def _fetch(self) -> str:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (self.repo / "HEAD").exists():
            _git("init", "--quiet", "--bare", str(self.repo))
        _git("fetch", "--quiet", "--no-tags", "--force", self.url, f"{self.ref or 'HEAD'}:refs/agentctl/target",
             cwd=self.repo)
        return _git("rev-parse", "refs/agentctl/target^{commit}", cwd=self.repo).decode().strip()

    def _export(self, sha: str) -> None:
        final = self.dir / f"rev-{sha}"
        if final.is_dir():
            return
        tmp = self.dir / f".tmp-{sha}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        archive = _git("archive", "--format=tar", sha, cwd=self.repo)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, no links out of the tree
        os.rename(tmp, final)

    def _swap(self, sha: str) -> None:
        link = self.dir / f".current-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(f"rev-{sha}", link)
        os.replace(link, self.current)  # atomic: readers see the old tree or the new one
        log.info("git source %s now at %s", self.url, sha)

    def _prune(self, keep: set[str | None]) -> None:
        for entry in self.dir.glob("rev-*"):
            if entry.name.removeprefix("rev-") not in keep:
                shutil.rmtree(entry, ignore_errors=True)
