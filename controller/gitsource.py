"""A Git repository as the manifest source: a private clone kept under the state dir.

Effects layer, called by the runner on a timer and by `plan`. Only `--git-path` of each
revision is exported, streamed from `git archive` into its own directory under a size limit;
`current` is a symlink swapped atomically (as git-sync does), so no reconcile ever reads a
half-updated tree. A user's working tree is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger("agentctl.git")
GIT_TIMEOUT = 120.0
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


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
    def __init__(self, url: str, *, ref: str | None, path: str | None, workdir: Path,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.url = url
        self.max_bytes = max_bytes
        self._refused: tuple[str, str] | None = None  # (sha, why): not exported again every interval
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
                self._swap(sha)
                self._prune(keep={sha, before})
        except (GitError, OSError) as exc:  # OSError: the state dir is full or read-only
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
        """Only the path, streamed: nothing outside it is read, and the export stops (an error that
        keeps the last good revision) as soon as it holds more than max_bytes."""
        final = self.dir / f"rev-{sha}"
        if final.is_dir():
            return
        if self._refused is not None and self._refused[0] == sha:
            raise GitError(self._refused[1])
        tree = f"{sha}:{self.path}" if self.path else sha
        if self.path and _kind(self.repo, tree) != "tree":
            # as Flux does: a revision without the folder is an error, not "delete everything"
            raise GitError(f"path {self.path!r} not found in revision {sha}")
        tmp = self.dir / f".tmp-{sha}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            _archive(self.repo, tree, tmp, self.max_bytes)
        except (GitError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if "larger than" in str(exc):
                self._refused = (sha, f"revision {sha}: {exc}")
                raise GitError(self._refused[1]) from None
            raise
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


def _kind(repo: Path, obj: str) -> str | None:
    try:
        return _git("cat-file", "-t", obj, cwd=repo).decode().strip()
    except GitError:
        return None


class _Limited:
    """A read-only stream that fails once more than limit bytes went through, or past a deadline."""

    def __init__(self, raw: IO[bytes], limit: int, deadline: float) -> None:
        self.raw, self.limit, self.deadline, self.seen = raw, limit, deadline, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size >= 0 else 1 << 20)
        self.seen += len(data)
        if self.seen > self.limit:
            raise GitError(f"the export of the path is larger than the limit of {self.limit} bytes (--git-max-bytes)")
        if time.monotonic() > self.deadline:
            raise GitError(f"git archive timed out after {GIT_TIMEOUT:g}s")
        return data


def _archive(repo: Path, tree: str, dest: Path, limit: int) -> None:
    """`git archive TREE` streamed into dest, counting every byte of the tar stream (headers too,
    so a tree of a million empty files is bounded as well as one huge file)."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: stderr can never block git
        prefix = f"--prefix={tree.split(':', 1)[1]}/" if ":" in tree else "--prefix="
        proc = subprocess.Popen(["git", "archive", "--format=tar", prefix, tree], cwd=repo, stdout=subprocess.PIPE,
                                stderr=errors, stdin=subprocess.DEVNULL, env=env)
        assert proc.stdout is not None
        try:
            stream = _Limited(proc.stdout, limit, time.monotonic() + GIT_TIMEOUT)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    tar.extract(member, dest, filter="data")  # no absolute paths, no links out of the tree
            while stream.read(1 << 16):
                pass  # the record padding after the end marker: git exits once it is written
        except (tarfile.TarError, OSError) as exc:
            raise GitError(f"git archive of {tree}: {exc}") from exc
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()  # stopped early: over the limit, or a broken stream
            code = proc.wait()
        if code != 0:
            errors.seek(0)
            lines = errors.read(4096).decode(errors="replace").strip().splitlines()
            raise GitError(f"git archive failed: {lines[-1] if lines else f'exit {code}'}")
