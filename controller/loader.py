"""Loading a manifests directory: walk, read, parse, resolve paths against the base dir.

Owns every file read that a manifest causes (the YAML itself and its envFiles): only regular
files, opened without blocking, bounded in size; a part that cannot be read is reported as
such, never as an empty directory. Keeps a per-file cache keyed by (mtime, size, inode) so a
pass over 1000 unchanged files only stats. Called by the reconciler, `validate` and `plan`;
never starts or stops anything.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controller.manifests import AgentManifest, Loaded as Loaded, ManifestError, ParsedDocument, parse_text
from controller.providers import Preset, check

MAX_FILE_BYTES = 1024 * 1024
MAX_ENV_FILE_BYTES = 256 * 1024
EDITOR_TEMP = re.compile(r"(^\.|~$|^#.*#$|\.swp$|\.swx$|\.tmp$)")


def is_ignored(rel: Path) -> bool:
    """Hidden components (`.git`, `.#x`, `.x.swp`) and editor temporaries (`x~`, `#x#`)."""
    return any(part.startswith(".") for part in rel.parts) or bool(EDITOR_TEMP.search(rel.name))


def shown(path: str | os.PathLike[str]) -> str:
    """A file name as text that can be written anywhere (store, YAML, metrics, logs): bytes that
    are not UTF-8 (kept by Python as surrogate escapes) are shown as backslash escapes, `caf\\xe9`."""
    text = os.fspath(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: show its code point
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass
class Walk:
    """What one walk of a root found: manifest files, and the parts of the tree it could not read."""

    files: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # root, directory or file -> why
    not_regular: list[Path] = field(default_factory=list)  # directories named like manifests


@dataclass
class _StrWalk:
    """walk_manifests in plain strings (no Path objects: a walk of 1000 files stays a few ms)."""

    files: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_regular: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # every directory listed


def _manifest_name(name: str) -> bool:
    """A file name the walk takes: .yaml/.yml, not hidden, not an editor temporary."""
    return name.endswith((".yaml", ".yml")) and not EDITOR_TEMP.search(name)


def _path_key(path: str) -> list[str]:
    return path.split("/")  # the order of Path objects: component by component


def _walk_strings(root: str) -> _StrWalk:
    walk = _StrWalk()
    try:
        st = os.stat(root)
    except OSError as exc:
        walk.failed.append((root, _reason(exc)))
        return walk
    if not stat.S_ISDIR(st.st_mode):
        walk.files.append(root)  # a file given as the root: reading it checks what it is
        return walk

    def failed(exc: OSError) -> None:
        walk.failed.append((exc.filename if exc.filename else root, _reason(exc)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed, followlinks=False):
        walk.dirs.append(dirpath)
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):  # hidden directories below root are skipped with all they hold
                continue
            if _manifest_name(d):
                walk.not_regular.append(os.path.join(dirpath, d))
                continue
            kept.append(d)
        dirnames[:] = kept
        walk.files.extend(os.path.join(dirpath, name) for name in filenames if _manifest_name(name))
    walk.files.sort(key=_path_key)
    return walk


def walk_manifests(root: Path) -> Walk:
    """Every .yaml/.yml file below root, sorted, skipping hidden paths and temporaries.
    Every directory that cannot be listed is recorded, never skipped in silence: a walk that
    failed must not look like a directory that is empty (CONTRACT §11)."""
    walk = _walk_strings(str(root))
    return Walk([Path(p) for p in walk.files], [(Path(p), why) for p, why in walk.failed],
                [Path(p) for p in walk.not_regular])


def manifest_files(root: Path) -> list[Path]:
    """The files of walk_manifests (for callers that only list)."""
    return walk_manifests(root).files


@dataclass
class LoadResult:
    manifests: dict[str, Loaded] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    # source file -> names its documents declared (also of invalid documents, when readable)
    names_by_file: dict[str, set[str]] = field(default_factory=dict)
    # files that had an error not attributable to one document (syntax, size, encoding)
    broken_files: set[str] = field(default_factory=set)
    # roots, directories and files that could not be read (display path -> why): what they
    # declared is unknown, so none of it may be taken as deleted (CONTRACT §11)
    unreadable: dict[str, str] = field(default_factory=dict)
    # a load of a few changed files: only these agents (and the agents of these files) may have
    # changed since the last load; None after a full load
    only: set[str] | None = None
    only_files: set[str] | None = None

    def unread_reason(self, source: str) -> str | None:
        """Why source (a display path) could not be read this time, or None if it was read."""
        for part, why in self.unreadable.items():
            if source == part or source.startswith(part.rstrip("/") + "/"):
                return why
        return None

    def errors_for(self, name: str) -> list[ManifestError]:
        return [e for e in self.errors if e.agent == name]


def inside(base: Path, target: str) -> Path | None:
    """target resolved (symlinks included) against base, or None if it leaves base."""
    resolved = (base / target).resolve()
    real_base = base.resolve()
    if resolved == real_base or real_base in resolved.parents:
        return resolved
    return None


class NotRegularFile(Exception):
    """A FIFO, device, socket or directory where a file was expected (message: what it is)."""


class TooLarge(Exception):
    pass


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a file")


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file (symlinks resolved), at most limit of them.

    A FIFO or device is refused without blocking: stat first (an open of a socket fails, of
    some devices has effects), then open O_NONBLOCK and fstat again, for a file swapped in
    between. Raises NotRegularFile, TooLarge, or OSError when the read itself fails."""
    if not stat.S_ISREG(mode := os.stat(path).st_mode):
        raise NotRegularFile(_kind(mode))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(_kind(st.st_mode))
        if st.st_size > limit:
            raise TooLarge(f"file is {st.st_size} bytes, larger than the limit of {limit}")
        chunks, total = [], 0
        while total <= limit:  # the size may have grown since fstat: never read past the limit
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise TooLarge(f"file is larger than the limit of {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def insecure_paths(root: Path) -> list[Path]:
    """Directories (and the root) below root that any user may write: anyone could add an agent."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        path = Path(dirpath)
        try:
            if path.stat().st_mode & 0o002:  # sticky does not help: others can still add files
                found.append(path)
        except OSError:
            continue
    return found


def parse_dotenv(text: str) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """KEY=VALUE lines, # comments, optional `export `, surrounding quotes removed."""
    values: dict[str, str] = {}
    errors: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = DOTENV_LINE.match(line)
        if not match:
            errors.append((number, "not a KEY=VALUE line"))
            continue
        value = match.group(2)
        quoted = re.match(r"""^(['"])(.*)\1(?:\s+#.*)?$""", value)
        if quoted:
            value = quoted.group(2)
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if "\0" in value:
            errors.append((number, "NUL byte in value"))
            continue
        values[match.group(1)] = value
    return values, errors


def read_env_files(doc: ParsedDocument, base: Path, file: str,
                   transient: list[str] | None = None) -> tuple[dict[str, str], list[ManifestError]]:
    """transient collects reads that failed (EMFILE, EACCES...): worth retrying, not caching."""
    env: dict[str, str] = {}
    errors: list[ManifestError] = []
    name = doc.manifest.metadata.name
    for i, rel in enumerate(doc.manifest.spec.env_files):
        line = doc.line_of("spec", "envFiles", i)
        path = inside(base, rel)
        if path is None:
            errors.append(ManifestError(file, line, f"spec.envFiles[{i}]: {rel!r} is outside the base dir {base}", name))
            continue
        try:
            text = read_regular(path, MAX_ENV_FILE_BYTES).decode("utf-8")
        except NotRegularFile as exc:
            errors.append(ManifestError(file, line, f"spec.envFiles[{i}]: {shown(rel)}: not a regular file ({exc})", name))
            continue
        except OSError as exc:
            if transient is not None:
                transient.append(f"{shown(rel)}: {_reason(exc)}")
            errors.append(ManifestError(file, line, f"spec.envFiles[{i}]: cannot read {shown(rel)!r}: {_reason(exc)}", name))
            continue
        except (UnicodeDecodeError, TooLarge) as exc:
            errors.append(ManifestError(file, line, f"spec.envFiles[{i}]: cannot read {shown(rel)!r}: {exc}", name))
            continue
        values, bad = parse_dotenv(text)
        # never echo a value: only the env file's own line number
        errors.extend(ManifestError(file, line, f"spec.envFiles[{i}]: {rel}:{n}: {msg}", name) for n, msg in bad)
        env.update(values)
    return env, errors


def resolve_doc(doc: ParsedDocument, base: Path, file: str, providers: Collection[str],
                transient: list[str] | None = None) -> tuple[Loaded | None, list[ManifestError]]:
    """Checks that need the file system or the controller's configuration."""
    spec = doc.manifest.spec
    name = doc.manifest.metadata.name
    errors: list[ManifestError] = []
    if spec.provider is not None and spec.provider not in providers:
        known = ", ".join(sorted(providers)) or "none"
        errors.append(ManifestError(file, doc.line_of("spec", "provider"),
                                    f"spec.provider: unknown provider {spec.provider!r} (known: {known})", name))
    cwd = inside(base, spec.cwd or ".")
    if cwd is None:
        errors.append(ManifestError(file, doc.line_of("spec", "cwd"), f"spec.cwd: {spec.cwd!r} is outside the base dir {base}", name))
    elif not cwd.is_dir():
        errors.append(ManifestError(file, doc.line_of("spec", "cwd"), f"spec.cwd: {spec.cwd!r} is not a directory", name))
    env, env_errors = read_env_files(doc, base, file, transient)
    errors.extend(env_errors)
    errors.extend(_provider_errors(doc, file, providers, env))  # presets: per-provider checks
    if errors or cwd is None:
        return None, errors
    return Loaded(doc.manifest, file, doc.line, str(cwd), tuple(sorted(env.items()))), []


def _provider_errors(doc: ParsedDocument, file: str, providers: Collection[str],
                     env: Mapping[str, str]) -> list[ManifestError]:
    """presets: what the provider's CLI would refuse (providers.check), when the presets are known."""
    spec = doc.manifest.spec
    preset = providers.get(spec.provider) if isinstance(providers, Mapping) and spec.provider else None
    if not isinstance(preset, Preset):
        return []
    as_root = os.geteuid() == 0 and {**env, **spec.env}.get("IS_SANDBOX") != "1"
    name = doc.manifest.metadata.name
    return [ManifestError(file, doc.line_of(*path), message, name)
            for path, message in check(spec.provider or "", preset, spec, as_root=as_root)]


def read_manifest_text(path: Path, display: str) -> tuple[str | None, ManifestError | None]:
    """The text of a manifest file, or the error that makes it invalid. A read that fails
    (EMFILE, EACCES, ENOENT...) raises OSError: it says nothing about what the file declares."""
    try:
        raw = read_regular(path, MAX_FILE_BYTES)
    except NotRegularFile as exc:
        return None, ManifestError(display, 1, f"not a regular file ({exc})")
    except TooLarge as exc:
        return None, ManifestError(display, 1, str(exc))
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, ManifestError(display, line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")


@dataclass
class _FileEntry:
    key: tuple[int, int, int, int]
    docs: list[ParsedDocument]
    errors: list[ManifestError]


class NeedsWalk(Exception):
    """A change that one file's re-read cannot fold in (a directory, the root itself)."""


Candidate = tuple[int, str, ParsedDocument, str]  # root index, path, document, display path


class ManifestSource:
    """Manifest roots (directories or files), re-read incrementally: unchanged files are not parsed
    again, and a change to known files (`load_paths`) re-reads only them, without a walk.

    What the last load found is kept per file and per agent name, so a load of a few changed
    files costs O(those files) plus copies of the result's dicts, not a walk of the tree."""

    def __init__(self, *roots: Path | str, base_dir: Path, providers: Collection[str],
                 allow_insecure: bool = True) -> None:
        # each root keeps the spelling it was given: errors name files "as given or found under the given path"
        self.roots: list[tuple[Path, str]] = [(Path(r), str(r)) for r in roots]
        self.base_dir = base_dir
        self.providers = providers
        self.allow_insecure = allow_insecure
        self._files: dict[str, _FileEntry] = {}
        # id(doc) -> (doc, paths it reads, their stat keys, result); the doc is kept so its id is not reused
        self._resolved: dict[int, tuple[ParsedDocument, tuple[str, ...], tuple[object, ...], Loaded | None,
                                        list[ManifestError]]] = {}
        self._reset()
        self._walked = False  # load_paths needs a full load first, and one that read every directory

    def _reset(self) -> None:
        self._listing: dict[str, tuple[str, int]] = {}  # file path -> display, root index
        self._dirs: set[str] = set()  # directories the last walk listed
        self._prefixes: list[tuple[str, str, int]] = []  # spellings of each root (given, absolute, real)
        self._walk_errors: list[ManifestError] = []  # directories named like manifests
        self._walk_unreadable: dict[str, str] = {}
        self._names_by_file: dict[str, set[str]] = {}
        self._broken: set[str] = set()
        self._unreadable: dict[str, str] = {}
        self._file_errors: dict[str, list[ManifestError]] = {}  # display -> its parse errors (non-empty)
        self._cands: dict[str, list[Candidate]] = {}
        self._manifests: dict[str, Loaded] = {}
        self._name_errors: dict[str, list[ManifestError]] = {}  # name -> errors of choosing it (non-empty)

    @property
    def root(self) -> Path:
        return self.roots[0][0]

    def _walk(self) -> None:
        """List every root; what could not be read goes into _walk_unreadable."""
        for index, (root, given) in enumerate(self.roots):
            root_s = str(root)
            prefix = root_s if root_s.endswith("/") else root_s + "/"

            def display(path: str, root_s: str = root_s, prefix: str = prefix, given: str = given) -> str:
                return shown(given if path == root_s else os.path.join(given, path[len(prefix):]))

            walk = _walk_strings(root_s)
            for path in walk.files:
                self._listing[path] = (display(path), index)
            self._dirs.update(walk.dirs)
            for path, why in walk.failed:
                self._walk_unreadable[display(path)] = why
            for path in walk.not_regular:
                self._walk_errors.append(ManifestError(display(path), 1, "not a regular file (a directory)"))
                self._names_by_file.setdefault(display(path), set())
            for spelling in {root_s, os.path.abspath(root_s), os.path.realpath(root_s)}:
                self._prefixes.append((spelling, root_s, index))

    def _parse(self, path: str, display: str) -> _FileEntry | str:
        """The parsed file, or why it could not be read (never cached: the next load retries it)."""
        try:
            st = os.stat(path)
        except OSError as exc:
            return _reason(exc)  # e.g. a dangling symlink: what it declared is unknown, not gone
        # ctime too: a chmod (o+w refused without --allow-insecure-manifests) changes only that
        key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        cached = self._files.get(path)
        if cached is not None and cached.key == key:
            return cached
        try:
            text, error = read_manifest_text(Path(path), display)
        except OSError as exc:
            return _reason(exc)
        if not self.allow_insecure and error is None and st.st_mode & 0o002:
            text, error = None, ManifestError(display, 1, "refused: the file is writable by other users "
                                              "(chmod o-w it, or run with --allow-insecure-manifests)")
        if error is not None or text is None:
            entry = _FileEntry(key, [], [error] if error else [])
        else:
            entry = _FileEntry(key, *parse_text(text, display))
        self._files[path] = entry
        return entry

    def _add_file(self, path: str, display: str, index: int) -> set[str]:
        """Read one listed file and record what it declares; the names it declares."""
        entry = self._parse(path, display)
        if isinstance(entry, str):
            self._unreadable[display] = entry
            return set()
        names = self._names_by_file.setdefault(display, set())
        broken = False
        for err in entry.errors:
            if err.agent:
                names.add(err.agent)
            else:
                broken = True
        for doc in entry.docs:
            names.add(doc.manifest.metadata.name)
        if entry.errors:
            self._file_errors[display] = list(entry.errors)
        if broken:
            self._broken.add(display)  # a file with a file-level error applies none of its documents
            return names
        for doc in entry.docs:
            self._cands.setdefault(doc.manifest.metadata.name, []).append((index, path, doc, display))
        return names

    def _remove_file(self, display: str) -> set[str]:
        """Forget what one file declared; the names it declared."""
        names = self._names_by_file.pop(display, set())
        self._broken.discard(display)
        self._unreadable.pop(display, None)
        self._file_errors.pop(display, None)
        for name in names:
            kept = [c for c in self._cands.get(name, ()) if c[3] != display]
            if kept:
                self._cands[name] = kept
            else:
                self._cands.pop(name, None)
        return names

    def load(self, previous: Mapping[str, str] | None = None) -> LoadResult:
        """Walk and load everything. previous: agent name -> source it was running from, to keep it
        on a name clash."""
        self._reset()
        self._walk()
        self._files = {p: e for p, e in self._files.items() if p in self._listing}
        live_docs = {id(d) for e in self._files.values() for d in e.docs}
        self._resolved = {k: v for k, v in self._resolved.items() if k in live_docs}
        self._walked = not self._walk_unreadable
        for path, (display, index) in self._listing.items():
            self._add_file(path, display, index)
        running_from = (previous or {}).get
        deps: dict[str, object] = {}  # one stat per distinct cwd or env file in this load
        for name in self._cands:
            self._choose(name, running_from, deps)
        return self._result(None, None)

    def load_paths(self, paths: Collection[str], running_from: Callable[[str], str | None]) -> LoadResult | None:
        """Fold in a change to these files only (paths as the watcher saw them, any spelling of a
        root); None when a walk is needed: no full load yet, a part of the tree unreadable last
        time, or a path that is a directory or a root. The result covers every file, and `only`
        names the agents that may have changed."""
        if not self._walked:
            return None
        affected: set[str] = set()
        files: set[str] = set()
        try:
            located = [hit for p in paths if (hit := self._locate(p)) is not None]
            for path, display, index in located:
                gone = _gone(path)
                affected |= self._remove_file(display)
                files.add(display)
                if gone:
                    self._listing.pop(path, None)
                    self._files.pop(path, None)
                    continue
                self._listing[path] = (display, index)
                affected |= self._add_file(path, display, index)
        except NeedsWalk:
            self._walked = False  # what was folded in so far is redone by the walk
            return None
        deps: dict[str, object] = {}
        for name in affected:
            self._choose(name, running_from, deps)
        return self._result(affected, files)

    def _locate(self, raw: str) -> tuple[str, str, int] | None:
        """The listed path, display path and root of a changed path; None when it cannot be a
        manifest (hidden, a temporary, another suffix). Raises NeedsWalk for anything else."""
        for spelling, root_s, index in self._prefixes:
            if raw == spelling:
                raise NeedsWalk(raw)
            prefix = spelling if spelling.endswith("/") else spelling + "/"
            if not raw.startswith(prefix):
                continue
            rel = raw[len(prefix):]
            if os.path.join(root_s, rel) in self._dirs:
                raise NeedsWalk(raw)  # a listed directory changed (its mode, say)
            parts = rel.split("/")
            name = parts[-1]
            if any(part.startswith(".") for part in parts) or EDITOR_TEMP.search(name) \
                    or not name.endswith((".yaml", ".yml")):
                return None  # the walk would skip it too
            path = os.path.join(root_s, rel)
            if os.path.dirname(path) not in self._dirs:
                raise NeedsWalk(raw)  # a directory the last walk did not list
            given = self.roots[index][1]
            return path, shown(os.path.join(given, rel)), index
        raise NeedsWalk(raw)

    def _result(self, only: set[str] | None, only_files: set[str] | None) -> LoadResult:
        unreadable = {**self._walk_unreadable, **self._unreadable}
        errors = [*self._walk_errors, *(e for errs in self._file_errors.values() for e in errs),
                  *(e for errs in self._name_errors.values() for e in errs)]
        # reported like any error (validate prints it, the controller logs it), but never a deletion
        errors.extend(ManifestError(part, int(part in self._unreadable),  # a file's line is 1, a directory's 0
                                    f"cannot read: {why}") for part, why in unreadable.items())
        errors.sort(key=lambda e: (e.file, e.line))
        return LoadResult(manifests=dict(self._manifests), errors=errors,
                          names_by_file=dict(self._names_by_file),
                          broken_files=set(self._broken), unreadable=unreadable, only=only, only_files=only_files)

    def _choose(self, name: str, running_from: Callable[[str], str | None], deps: dict[str, object]) -> None:
        self._manifests.pop(name, None)
        self._name_errors.pop(name, None)
        docs = self._cands.get(name)
        if not docs:
            return
        errors: list[ManifestError] = []
        if len(docs) > 1:
            docs = sorted(docs, key=lambda c: (c[0], c[1].split("/")))  # the walk's order: root, then path
            where = ", ".join(f"{f}:{d.line}" for _, _, d, f in docs)
            running = running_from(name)
            keep = next((c for c in docs if c[3] == running), None)
            for c in docs:
                if c is not keep:
                    errors.append(ManifestError(c[3], c[2].line_of("metadata", "name"),
                                                f"metadata.name: duplicate agent name {name!r} (declared at {where})", name))
            if keep is None:
                self._name_errors[name] = errors
                return
            docs = [keep]
        _, _, doc, file = docs[0]
        loaded, resolve_errors = self._resolve(doc, file, deps)
        errors.extend(resolve_errors)
        if errors:
            self._name_errors[name] = errors
        if loaded is not None:
            self._manifests[name] = loaded

    def _resolve(self, doc: ParsedDocument, file: str, deps_seen: dict[str, object]) -> tuple[Loaded | None, list[ManifestError]]:
        """resolve_doc, cached while the document and the files it reads (cwd, envFiles) are unchanged:
        the same Loaded object comes back, which tells the reconciler nothing changed."""
        cached = self._resolved.get(id(doc))
        if cached is not None and cached[0] is doc:
            paths = cached[1]
        else:
            base, spec = str(self.base_dir), doc.manifest.spec
            paths = tuple(os.path.join(base, rel) for rel in (spec.cwd or ".", *spec.env_files))
        deps = tuple(_stat_once(path, deps_seen) for path in paths)
        if cached is not None and cached[0] is doc and cached[2] == deps:
            return cached[3], cached[4]
        transient: list[str] = []
        loaded, errors = resolve_doc(doc, self.base_dir, file, self.providers, transient)
        if not transient:  # a read that failed (EMFILE...) is tried again next time
            self._resolved[id(doc)] = (doc, paths, deps, loaded, errors)
        return loaded, errors


def _stat_once(path: str, seen: dict[str, object]) -> object:
    """The stat key of path, taken once per load (a thousand agents in one cwd cost one stat)."""
    if path not in seen:
        try:
            st = os.stat(path)
            seen[path] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        except OSError:
            seen[path] = None
    return seen[path]


def _gone(path: str) -> bool:
    """No entry at path any more; a directory there needs a walk (NeedsWalk)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            os.lstat(path)
        except FileNotFoundError:
            return True
        return False  # a dangling symlink: listed, and reported unreadable like the walk does
    except OSError:
        return False  # unreadable: _parse reports why
    if stat.S_ISDIR(st.st_mode):
        raise NeedsWalk(path)
    return False
