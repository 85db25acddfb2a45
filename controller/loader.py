"""Loading a manifests directory: walk, read, parse, resolve paths against the base dir.

Owns every file read that a manifest causes (the YAML itself and its envFiles). Keeps a
per-file cache keyed by (mtime, size, inode) so a pass over 1000 unchanged files only stats.
Called by the reconciler, `validate` and `plan`; never starts or stops anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controller.manifests import AgentManifest, ManifestError, ParsedDocument, parse_text
from controller.providers import Preset, check

MAX_FILE_BYTES = 1024 * 1024
MAX_ENV_FILE_BYTES = 256 * 1024
EDITOR_TEMP = re.compile(r"(^\.|~$|^#.*#$|\.swp$|\.swx$|\.tmp$)")


def is_ignored(rel: Path) -> bool:
    """Hidden components (`.git`, `.#x`, `.x.swp`) and editor temporaries (`x~`, `#x#`)."""
    return any(part.startswith(".") for part in rel.parts) or bool(EDITOR_TEMP.search(rel.name))


def manifest_files(root: Path) -> list[Path]:
    """Every .yaml/.yml file below root, sorted, skipping hidden paths and temporaries."""
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            if path.suffix in (".yaml", ".yml") and not is_ignored(path.relative_to(root)):
                found.append(path)
    return sorted(found)


@dataclass(frozen=True)
class Loaded:
    """One valid manifest with everything read from disk that its instances need."""

    manifest: AgentManifest
    source: str
    line: int
    cwd: str
    env_from_files: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return self.manifest.metadata.name


@dataclass
class LoadResult:
    manifests: dict[str, Loaded] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    # source file -> names its documents declared (also of invalid documents, when readable)
    names_by_file: dict[str, set[str]] = field(default_factory=dict)
    # files that had an error not attributable to one document (syntax, size, encoding)
    broken_files: set[str] = field(default_factory=set)

    def errors_for(self, name: str) -> list[ManifestError]:
        return [e for e in self.errors if e.agent == name]


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def inside(base: Path, target: str) -> Path | None:
    """target resolved (symlinks included) against base, or None if it leaves base."""
    resolved = (base / target).resolve()
    real_base = base.resolve()
    if resolved == real_base or real_base in resolved.parents:
        return resolved
    return None


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


def read_env_files(doc: ParsedDocument, base: Path, file: str) -> tuple[dict[str, str], list[ManifestError]]:
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
            if path.stat().st_size > MAX_ENV_FILE_BYTES:
                raise ValueError(f"larger than {MAX_ENV_FILE_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            errors.append(ManifestError(file, line, f"spec.envFiles[{i}]: cannot read {rel!r}: {exc}", name))
            continue
        values, bad = parse_dotenv(text)
        # never echo a value: only the env file's own line number
        errors.extend(ManifestError(file, line, f"spec.envFiles[{i}]: {rel}:{n}: {msg}", name) for n, msg in bad)
        env.update(values)
    return env, errors


def resolve_doc(doc: ParsedDocument, base: Path, file: str,
                providers: Collection[str]) -> tuple[Loaded | None, list[ManifestError]]:
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
    env, env_errors = read_env_files(doc, base, file)
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
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, ManifestError(display, 1, f"file is {size} bytes, larger than the limit of {MAX_FILE_BYTES}")
        raw = path.read_bytes()
    except OSError as exc:
        return None, ManifestError(display, 1, f"cannot read: {exc.strerror or exc}")
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, ManifestError(display, line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")


@dataclass
class _FileEntry:
    key: tuple[int, int, int]
    docs: list[ParsedDocument]
    errors: list[ManifestError]


class ManifestSource:
    """Manifest roots (directories or files), re-read incrementally: unchanged files are not parsed again."""

    def __init__(self, *roots: Path | str, base_dir: Path, providers: Collection[str],
                 allow_insecure: bool = True) -> None:
        # each root keeps the spelling it was given: errors name files "as given or found under the given path"
        self.roots: list[tuple[Path, str]] = [(Path(r), str(r)) for r in roots]
        self.base_dir = base_dir
        self.providers = providers
        self.allow_insecure = allow_insecure
        self._files: dict[Path, _FileEntry] = {}
        # id(doc) -> (doc, stat keys of what it reads, result); the doc itself is kept so its id is not reused
        self._resolved: dict[int, tuple[ParsedDocument, tuple[object, ...], Loaded | None, list[ManifestError]]] = {}

    @property
    def root(self) -> Path:
        return self.roots[0][0]

    def _files_with_display(self) -> list[tuple[Path, str]]:
        out: list[tuple[Path, str]] = []
        for root, given in self.roots:
            for path in manifest_files(root):
                out.append((path, given if path == root else os.path.join(given, str(path.relative_to(root)))))
        return out

    def _parse(self, path: Path, display: str) -> _FileEntry | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._files.get(path)
        if cached is not None and cached.key == key:
            return cached
        text, error = read_manifest_text(path, display)
        if not self.allow_insecure and error is None and st.st_mode & 0o002:
            text, error = None, ManifestError(display, 1, "refused: the file is writable by other users "
                                              "(chmod o-w it, or run with --allow-insecure-manifests)")
        if error is not None or text is None:
            entry = _FileEntry(key, [], [error] if error else [])
        else:
            entry = _FileEntry(key, *parse_text(text, display))
        self._files[path] = entry
        return entry

    def load(self, previous: dict[str, str] | None = None) -> LoadResult:
        """previous: agent name -> source it was running from, to keep it on a name clash."""
        files = self._files_with_display()
        present = {p for p, _ in files}
        self._files = {p: e for p, e in self._files.items() if p in present}
        live_docs = {id(d) for e in self._files.values() for d in e.docs}
        self._resolved = {k: v for k, v in self._resolved.items() if k in live_docs}
        result = LoadResult()
        candidates: dict[str, list[tuple[ParsedDocument, str]]] = {}
        for path, display in files:
            entry = self._parse(path, display)
            if entry is None:
                continue
            names = result.names_by_file.setdefault(display, set())
            for err in entry.errors:
                result.errors.append(err)
                if err.agent:
                    names.add(err.agent)
                else:
                    result.broken_files.add(display)
            for doc in entry.docs:
                names.add(doc.manifest.metadata.name)
            if display in result.broken_files:
                continue  # a file with a file-level error applies none of its documents, as validate says
            for doc in entry.docs:
                candidates.setdefault(doc.manifest.metadata.name, []).append((doc, display))
        for name, docs in candidates.items():
            self._choose(name, docs, result, (previous or {}).get(name))
        result.errors.sort(key=lambda e: (e.file, e.line))
        return result

    def _choose(self, name: str, docs: list[tuple[ParsedDocument, str]], result: LoadResult, running_from: str | None) -> None:
        if len(docs) > 1:
            where = ", ".join(f"{f}:{d.line}" for d, f in docs)
            keep = next(((d, f) for d, f in docs if f == running_from), None)
            for doc, file in docs:
                if (doc, file) != keep:
                    result.errors.append(ManifestError(file, doc.line_of("metadata", "name"),
                                                       f"metadata.name: duplicate agent name {name!r} (declared at {where})", name))
            if keep is None:
                return
            docs = [keep]
        doc, file = docs[0]
        loaded, errors = self._resolve(doc, file)
        result.errors.extend(errors)
        if loaded is not None:
            result.manifests[name] = loaded

    def _resolve(self, doc: ParsedDocument, file: str) -> tuple[Loaded | None, list[ManifestError]]:
        """resolve_doc, cached while the document and the files it reads (cwd, envFiles) are unchanged:
        the same Loaded object comes back, which tells the reconciler nothing changed."""
        spec = doc.manifest.spec
        deps = (_stat_key(self.base_dir / (spec.cwd or ".")),
                *(_stat_key(self.base_dir / rel) for rel in spec.env_files))
        cached = self._resolved.get(id(doc))
        if cached is not None and cached[0] is doc and cached[1] == deps:
            return cached[2], cached[3]
        loaded, errors = resolve_doc(doc, self.base_dir, file, self.providers)
        self._resolved[id(doc)] = (doc, deps, loaded, errors)
        return loaded, errors
