"""loader: walking a manifests dir, paths confined to the base dir, dotenv files, name clashes, the cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller import loader
from controller.loader import MAX_FILE_BYTES, LoadResult, ManifestSource, manifest_files, parse_dotenv
from controller.providers import BUILTIN
from tests.unit.builders import manifest_yaml


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "base" / "manifests").mkdir(parents=True)
    return tmp_path / "base"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def source(base: Path, *roots: Path) -> ManifestSource:
    return ManifestSource(*(roots or (base / "manifests",)), base_dir=base, providers=frozenset(BUILTIN))


def load(base: Path, previous: dict[str, str] | None = None) -> LoadResult:
    return source(base).load(previous)


def messages(result: LoadResult) -> list[str]:
    return [str(e) for e in result.errors]


# -- the directory walk ------------------------------------------------------------------

IGNORED = [".#a.yaml", "a.yaml~", ".a.yaml.swp", "#a.yaml#", ".hidden.yaml", ".git/x.yaml", "sub/.cache/y.yaml",
           "notes.txt", "README.md", "a.yaml.bak", "a.json"]


def test_walk_is_recursive_and_skips_hidden_paths_editor_temporaries_and_other_files(base: Path) -> None:
    root = base / "manifests"
    for name, rel in (("a", "a.yaml"), ("b", "sub/b.yml"), ("c", "sub/deeper/c.yaml")):
        write(root / rel, manifest_yaml(name))
    for rel in IGNORED:
        write(root / rel, "this: [is not, valid: yaml")
    assert manifest_files(root) == [root / "a.yaml", root / "sub/b.yml", root / "sub/deeper/c.yaml"]
    result = load(base)
    assert messages(result) == []
    assert sorted(result.manifests) == ["a", "b", "c"]


def test_a_single_file_can_be_given_as_the_root(base: Path) -> None:
    path = write(base / "one.yaml", manifest_yaml("solo"))
    result = source(base, path).load()
    assert list(result.manifests) == ["solo"] and result.manifests["solo"].source == str(path)


def test_errors_name_the_file_as_found_under_the_given_root(base: Path) -> None:
    write(base / "manifests/team/bad.yaml", manifest_yaml("bad", replicas=1000))
    errors = source(base).load().errors
    assert [(e.file, e.line) for e in errors] == [(os.path.join(str(base / "manifests"), "team/bad.yaml"), 6)]


def test_invalid_document_still_names_its_agent(base: Path) -> None:
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", replicas=-1))
    result = load(base)
    assert result.manifests == {}
    assert result.names_by_file == {str(base / "manifests/a.yaml"): {"reviewer"}}
    assert [e.line for e in result.errors_for("reviewer")] == [6]


def test_unknown_provider_is_an_error_at_the_provider_line(base: Path) -> None:
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", provider="gemini"))
    (err,) = load(base).errors
    assert err.line == 6 and "unknown provider 'gemini'" in err.message and "claude" in err.message


# -- cwd and envFiles stay inside the base dir --------------------------------------------

def test_relative_cwd_resolves_against_the_base_dir(base: Path) -> None:
    (base / "work/reviewer").mkdir(parents=True)
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", cwd="work/reviewer"))
    assert load(base).manifests["reviewer"].cwd == str((base / "work/reviewer").resolve())


def test_default_cwd_is_the_base_dir(base: Path) -> None:
    write(base / "manifests/a.yaml", manifest_yaml("reviewer"))
    assert load(base).manifests["reviewer"].cwd == str(base.resolve())


def outside_symlink(base: Path) -> str:
    (base.parent / "outside").mkdir(exist_ok=True)
    (base / "escape").symlink_to(base.parent / "outside")
    return "escape"


@pytest.mark.parametrize("make_path", [
    lambda base: "..",
    lambda base: "work/../../outside",
    lambda base: str(base.parent / "outside"),
    outside_symlink,
], ids=["dotdot", "nested-dotdot", "absolute", "symlink"])
def test_cwd_outside_the_base_dir_is_an_error_at_its_line(base: Path, make_path: Callable[[Path], str]) -> None:
    (base.parent / "outside").mkdir(exist_ok=True)
    (base / "work").mkdir()
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", cwd=make_path(base)))
    result = load(base)
    assert result.manifests == {}
    (err,) = result.errors
    assert err.line == 6 and "outside the base dir" in err.message and err.agent == "reviewer"


def test_cwd_that_is_not_a_directory_is_an_error(base: Path) -> None:
    write(base / "file", "x")
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", cwd="missing"))
    write(base / "manifests/b.yaml", manifest_yaml("writer", cwd="file"))
    assert [e.message for e in load(base).errors] == ["spec.cwd: 'missing' is not a directory",
                                                      "spec.cwd: 'file' is not a directory"]


@pytest.mark.parametrize("make_path", [
    lambda base: "../outside/secret.env",
    lambda base: str(base.parent / "outside/secret.env"),
    lambda base: outside_symlink(base) + "/secret.env",
], ids=["dotdot", "absolute", "symlink"])
def test_env_file_outside_the_base_dir_is_an_error_at_its_list_item(
        base: Path, make_path: Callable[[Path], str]) -> None:
    write(base.parent / "outside/secret.env", "TOKEN=hunter2\n")
    write(base / "ok.env", "A=1\n")
    text = manifest_yaml("reviewer").replace("spec:\n", "spec:\n  envFiles:\n  - ok.env\n  - PATH\n".replace(
        "PATH", make_path(base)))
    write(base / "manifests/a.yaml", text)
    result = load(base)
    assert result.manifests == {}
    (err,) = result.errors
    assert err.line == 7 and err.message.startswith("spec.envFiles[1]: ") and "outside the base dir" in err.message
    assert "hunter2" not in err.message


def test_env_file_values_reach_the_loaded_manifest(base: Path) -> None:
    write(base / "secrets/r.env", "# keys\nexport TOKEN='s3cret'\nLEVEL=debug\n")
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", envFiles=["secrets/r.env"]))
    assert load(base).manifests["reviewer"].env_from_files == (("LEVEL", "debug"), ("TOKEN", "s3cret"))


def test_bad_env_file_lines_are_reported_without_their_values(base: Path) -> None:
    write(base / "r.env", "GOOD=1\nthis line leaks hunter2\n1BAD=hunter3\n")
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", envFiles=["r.env"]))
    result = load(base)
    assert messages(result) == [
        f"{base}/manifests/a.yaml:6: spec.envFiles[0]: r.env:2: not a KEY=VALUE line",
        f"{base}/manifests/a.yaml:6: spec.envFiles[0]: r.env:3: not a KEY=VALUE line",
    ]
    assert "reviewer" not in result.manifests


def test_missing_or_binary_env_file_is_an_error_without_its_content(base: Path) -> None:
    write(base / "bin.env", b"TOKEN=hunter2\xff\xfe\n")
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", envFiles=["nope.env", "bin.env"]))
    errors = load(base).errors
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [(6, "spec.envFiles[0]"), (6, "spec.envFiles[1]")]
    assert all("cannot read" in e.message and "hunter2" not in e.message for e in errors)


# -- dotenv syntax ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("A=1", {"A": "1"}),
    ("export A=1", {"A": "1"}),
    ("  export   A = 1  ", {"A": "1"}),
    ("A=\"two words\"", {"A": "two words"}),
    ("A='single # not a comment'", {"A": "single # not a comment"}),
    ("A=plain # trailing comment", {"A": "plain"}),
    ("A=a#b", {"A": "a#b"}),
    ("A=", {"A": ""}),
    ("A=x=y", {"A": "x=y"}),
    ("# A=1\n\n   \n", {}),
    ("A=1\nA=2", {"A": "2"}),
    pytest.param("A=\"quoted\" # comment", {"A": "quoted"}, id="quoted-then-comment"),
])
def test_dotenv_lines(text: str, expected: dict[str, str]) -> None:
    values, errors = parse_dotenv(text)
    assert (values, errors) == (expected, [])


@pytest.mark.parametrize("line", ["just words", "1A=x", "A-B=x", "=x", "export", "A"])
def test_dotenv_rejects_lines_that_are_not_key_value(line: str) -> None:
    values, errors = parse_dotenv(f"OK=1\n{line}\n")
    assert values == {"OK": "1"} and errors == [(2, "not a KEY=VALUE line")]


# -- duplicate names ---------------------------------------------------------------------------

def test_duplicate_name_in_two_files_names_both_and_runs_neither(base: Path) -> None:
    a = write(base / "manifests/a.yaml", manifest_yaml("reviewer"))
    b = write(base / "manifests/b.yaml", "# the copy\n" + manifest_yaml("reviewer"))
    result = load(base)
    assert result.manifests == {}
    assert [(e.file, e.line) for e in result.errors] == [(str(a), 3), (str(b), 4)]
    for err in result.errors:
        assert f"{a}:1" in err.message and f"{b}:2" in err.message and "duplicate agent name" in err.message


def test_duplicate_name_keeps_the_one_already_running(base: Path) -> None:
    a = write(base / "manifests/a.yaml", manifest_yaml("reviewer", command=["python3", "a.py"]))
    b = write(base / "manifests/b.yaml", manifest_yaml("reviewer", command=["python3", "b.py"]))
    for running_from, other in ((a, b), (b, a)):
        result = load(base, previous={"reviewer": str(running_from)})
        kept = result.manifests["reviewer"]
        assert kept.source == str(running_from)
        assert kept.manifest.spec.command == ["python3", f"{running_from.stem}.py"]
        assert [e.file for e in result.errors] == [str(other)]


# -- the per-file cache -----------------------------------------------------------------------

def counting_parse(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = loader.parse_text  # type: ignore[attr-defined]

    def spy(text: str, file: str) -> Any:
        calls.append(file)
        return real(text, file)

    monkeypatch.setattr(loader, "parse_text", spy)
    return calls


def test_unchanged_file_is_not_parsed_again_and_an_edit_is_picked_up(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_parse(monkeypatch)
    a = write(base / "manifests/a.yaml", manifest_yaml("reviewer", replicas=1))
    write(base / "manifests/b.yaml", manifest_yaml("writer"))
    src = source(base)
    assert src.load().manifests["reviewer"].manifest.spec.replicas == 1
    assert sorted(calls) == [str(base / "manifests/a.yaml"), str(base / "manifests/b.yaml")]
    calls.clear()
    assert src.load().manifests["reviewer"].manifest.spec.replicas == 1
    assert calls == []
    write(a, manifest_yaml("reviewer", replicas=3))
    assert src.load().manifests["reviewer"].manifest.spec.replicas == 3
    assert calls == [str(a)]


def test_same_size_edit_with_a_new_mtime_is_picked_up(base: Path) -> None:
    a = write(base / "manifests/a.yaml", manifest_yaml("reviewer", replicas=1))
    src = source(base)
    src.load()
    before = a.stat()
    write(a, manifest_yaml("reviewer", replicas=2))
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert a.stat().st_size == before.st_size
    assert src.load().manifests["reviewer"].manifest.spec.replicas == 2


def test_deleted_file_disappears_from_the_next_load(base: Path) -> None:
    a = write(base / "manifests/a.yaml", manifest_yaml("reviewer"))
    src = source(base)
    assert "reviewer" in src.load().manifests
    a.unlink()
    result = src.load()
    assert result.manifests == {} and result.names_by_file == {}


def test_env_file_edit_is_picked_up_while_the_manifest_is_unchanged(base: Path) -> None:
    env = write(base / "r.env", "LEVEL=info\n")
    write(base / "manifests/a.yaml", manifest_yaml("reviewer", envFiles=["r.env"]))
    src = source(base)
    assert src.load().manifests["reviewer"].env_from_files == (("LEVEL", "info"),)
    write(env, "LEVEL=debug\n")
    assert src.load().manifests["reviewer"].env_from_files == (("LEVEL", "debug"),)


# -- unreadable files ----------------------------------------------------------------------------

def test_file_larger_than_the_limit_is_an_error_at_line_one(base: Path) -> None:
    big = write(base / "manifests/big.yaml", manifest_yaml("big") + "#" * MAX_FILE_BYTES + "\n")
    result = load(base)
    assert result.manifests == {}
    (err,) = result.errors
    assert (err.file, err.line) == (str(big), 1) and str(MAX_FILE_BYTES) in err.message
    assert result.broken_files == {str(big)}


def test_invalid_utf8_is_an_error_at_the_line_of_the_bad_byte(base: Path) -> None:
    raw = manifest_yaml("reviewer").encode().replace(b"name: reviewer", b"name: rev\xffiewer")
    bad = write(base / "manifests/bad.yaml", raw)
    (err,) = load(base).errors
    assert (err.file, err.line) == (str(bad), 3) and "UTF-8" in err.message and "0xff" in err.message


def test_broken_file_does_not_hide_the_valid_ones(base: Path) -> None:
    write(base / "manifests/a.yaml", manifest_yaml("reviewer"))
    write(base / "manifests/b.yaml", "spec: [unclosed\n")
    result = load(base)
    assert list(result.manifests) == ["reviewer"]
    assert result.broken_files == {str(base / "manifests/b.yaml")}


# -- hostile reads (CONTRACT §11) ---------------------------------------------------------------

def test_a_missing_root_is_a_read_failure_not_an_empty_directory(base: Path) -> None:
    result = source(base, base / "gone").load()
    assert result.manifests == {} and result.names_by_file == {}
    assert result.unread_reason(str(base / "gone" / "a.yaml")) is not None
    assert any("cannot read" in m for m in messages(result))


def test_a_symlink_loop_as_root_is_a_read_failure(base: Path) -> None:
    (base / "l1").symlink_to(base / "l2")
    (base / "l2").symlink_to(base / "l1")
    result = source(base, base / "l1").load()
    assert result.unread_reason(str(base / "l1")) is not None


def test_a_dangling_manifest_symlink_is_unreadable_and_the_rest_loads(base: Path) -> None:
    write(base / "manifests/b.yaml", manifest_yaml("b"))
    (base / "manifests/a.yaml").symlink_to(base / "nowhere.yaml")
    result = load(base)
    assert list(result.manifests) == ["b"]
    assert result.unread_reason(str(base / "manifests/a.yaml")) is not None
    assert result.unread_reason(str(base / "manifests/b.yaml")) is None


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "socket"])
def test_only_regular_files_are_read_and_nothing_blocks(base: Path, kind: str, tmp_path: Path) -> None:
    import socket

    path = base / "manifests/x.yaml"
    listener = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        write(path / "inner.yaml", manifest_yaml("inner"))
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
    try:
        result = load(base)
    finally:
        if listener is not None:
            listener.close()
    assert [str(e) for e in result.errors if "x.yaml" in e.file] == [f"{path}:1: not a regular file "
                                                                     f"({loader._kind(os.stat(path).st_mode)})"]
    assert result.manifests == {} and result.unreadable == {}


def test_an_env_file_that_is_a_fifo_is_an_error_found_without_blocking(base: Path) -> None:
    os.mkfifo(base / "secrets.env")
    write(base / "manifests/a.yaml", manifest_yaml("a", envFiles=["secrets.env"]))
    result = load(base)
    assert result.manifests == {}
    assert any("envFiles[0]" in m and "not a regular file (a FIFO)" in m for m in messages(result))


def test_reads_are_bounded_even_when_the_size_lies(base: Path) -> None:
    path = write(base / "big.bin", b"x" * 5000)
    with pytest.raises(loader.TooLarge):
        loader.read_regular(path, 4096)
    assert loader.read_regular(path, 5000) == b"x" * 5000


def test_a_file_name_that_is_not_utf8_is_shown_with_backslash_escapes(base: Path) -> None:
    root = os.fsencode(base / "manifests")
    with open(root + b"/caf\xe9.yaml", "w") as fh:
        fh.write(manifest_yaml("cafe"))
    with open(root + b"/bad\xff.yaml", "w") as fh:
        fh.write("not: [valid")
    result = load(base)
    assert result.manifests["cafe"].source == str(base / "manifests") + "/caf\\xe9.yaml"
    assert any(e.file.endswith("bad\\xff.yaml") for e in result.errors)
    for text in [result.manifests["cafe"].source, *messages(result)]:
        text.encode("utf-8")  # storable, printable, a metric label: no surrogate left


def test_a_failed_env_file_read_is_not_cached(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(base / "secrets.env", "TOKEN=x\n")
    write(base / "manifests/a.yaml", manifest_yaml("a", envFiles=["secrets.env"]))
    src = source(base)
    real = loader.read_regular

    def emfile(path: Path, limit: int) -> bytes:
        if path.name == "secrets.env":
            raise OSError(24, "Too many open files")
        return real(path, limit)

    monkeypatch.setattr(loader, "read_regular", emfile)
    assert src.load().manifests == {}
    monkeypatch.setattr(loader, "read_regular", real)
    assert list(src.load().manifests) == ["a"]  # read again, nothing changed on disk


# -- a load of the changed files only (a file event) ------------------------------------------------

def same_as_a_walk(base: Path, src: ManifestSource, changed: list[Path], previous: dict[str, str]) -> LoadResult:
    """load_paths of the changed files says what a fresh walk of the tree says."""
    part = src.load_paths([str(p) for p in changed], previous.get)
    assert part is not None
    full = source(base).load(previous)
    assert part.manifests == full.manifests
    assert [str(e) for e in part.errors] == [str(e) for e in full.errors]
    assert part.names_by_file == full.names_by_file
    assert (part.broken_files, part.unreadable) == (full.broken_files, full.unreadable)
    return part


def test_a_load_of_changed_files_agrees_with_a_walk_through_edits_clashes_and_deletions(base: Path) -> None:
    m = base / "manifests"
    a = write(m / "a.yaml", manifest_yaml("alpha"))
    b = write(m / "sub/b.yaml", manifest_yaml("beta"))
    src = source(base)
    src.load()
    previous = {"alpha": str(a), "beta": str(b)}
    edited = same_as_a_walk(base, src, [write(a, manifest_yaml("alpha", command=["python3", "x.py"]))], previous)
    assert edited.only == {"alpha"} and edited.manifests["alpha"].manifest.spec.command == ["python3", "x.py"]
    clash = write(m / "c.yaml", manifest_yaml("beta", command=["python3", "c.py"]))  # a duplicate name
    assert "duplicate" in str(same_as_a_walk(base, src, [clash], previous).errors)
    same_as_a_walk(base, src, [write(clash, "spec: [unclosed\n")], previous)  # broken: its names are unknown
    renamed = write(m / "d.yml", manifest_yaml("delta"))
    clash.unlink()
    moved = same_as_a_walk(base, src, [clash, renamed], previous)
    assert set(moved.manifests) == {"alpha", "beta", "delta"}
    b.unlink()
    assert "beta" not in same_as_a_walk(base, src, [b], previous).manifests
    ignored = src.load_paths([str(write(m / ".hidden.yaml", manifest_yaml("ghost"))), str(m / "x.yaml~")], previous.get)
    assert ignored is not None and "ghost" not in ignored.manifests


def test_a_load_of_changed_files_reads_only_them(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [write(base / f"manifests/a{i}.yaml", manifest_yaml(f"a{i}")) for i in range(5)]
    src = source(base)
    src.load()
    calls = counting_parse(monkeypatch)
    write(files[2], manifest_yaml("a2", command=["python3", "y.py"]))
    assert src.load_paths([str(files[2])], {}.get) is not None
    assert calls == [str(files[2])]


def test_a_directory_change_or_the_first_load_needs_a_walk(base: Path) -> None:
    src = source(base)
    assert src.load_paths([str(base / "manifests/a.yaml")], {}.get) is None  # nothing walked yet
    src.load()
    new_dir = base / "manifests/new"
    write(new_dir / "n.yaml", manifest_yaml("n"))
    assert src.load_paths([str(new_dir / "n.yaml")], {}.get) is None  # a directory the walk never listed
    assert src.load_paths([str(base / "manifests")], {}.get) is None
    assert "n" in src.load().manifests
