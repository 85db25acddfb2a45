"""Intake: manifests (a directory or a Git revision) -> desired agents in the table.

Runtime layer. Folds each load of the manifests into the agent table and marks what changed
dirty; it never decides an action. An invalid manifest keeps its agent on the last valid
spec; only a successful load that no longer declares an agent marks it deleted.
"""

from __future__ import annotations

import logging

from controller import opsview, records
from controller.clock import TimeSource
from controller.desired import DesiredAgent, desire, placed_here
from controller.gitsource import GitSource
from controller.loader import Loaded, LoadResult, ManifestSource, resolve_doc
from controller.manifests import AgentManifest, ParsedDocument
from controller.model import ExitReason
from controller.providers import Preset, merge_presets
from controller.runtime.queue import WorkQueue
from controller.runtime.table import AgentState, AgentTable
from controller.settings import Settings
from controller.sourcehealth import SourceHealth, kept_by_failure, merge_validity
from controller.store import AgentRow

log = logging.getLogger("agentctl")


class Intake:
    def __init__(self, settings: Settings, table: AgentTable, queue: WorkQueue, clock: TimeSource) -> None:
        self.settings = settings
        self.table = table
        self.queue = queue
        self.clock = clock
        self.presets: dict[str, Preset] = merge_presets(settings.providers)
        # the presets themselves (not just their names), so each provider's values are checked
        self.source = ManifestSource(settings.manifests, base_dir=settings.base_dir, providers=self.presets,
                                     allow_insecure=settings.allow_insecure_manifests)
        self.git: GitSource | None = None
        if settings.git is not None:
            g = settings.git
            self.git = GitSource(g.url, ref=g.ref, path=g.path, workdir=settings.state_dir / "git",
                                 max_bytes=g.max_bytes)
        self.manifest_valid: dict[str, bool] = {}
        self.source_health = SourceHealth()  # which parts of the manifest source failed to read
        self.per_instance_placement = False  # a fleet on etcd places instances, not agents (CONTRACT §10)
        self._logged_file_errors: set[str] = set()

    # -- restore -------------------------------------------------------------
    def restore(self, row: AgentRow) -> AgentState:
        """An agent known before the restart, on its last valid spec until the manifests say otherwise."""
        # present until a successful load of the manifests says otherwise (a Git source may not answer yet)
        state = AgentState(row.name, row.source, row.first_seen, present=True, source_revision=row.source_revision)
        if row.manifest is None:
            return state
        try:
            manifest = AgentManifest.model_validate(row.manifest)
            loaded, _ = resolve_doc(ParsedDocument(manifest, 1), self.settings.base_dir, row.source,
                                    frozenset(self.presets))
        except ValueError as exc:
            log.warning("stored spec of %s is no longer usable: %s", row.name, exc)
            return state
        if loaded is not None:
            state.desired = self.desire(loaded)
            state.placed = self._placed(manifest)
        return state

    def desire(self, loaded: Loaded) -> DesiredAgent:
        return desire(loaded, presets=self.presets, default_env=self.settings.env,
                      log_dir=str(self.settings.log_dir.resolve()))

    def _placed(self, manifest: AgentManifest) -> bool:
        if self.per_instance_placement:
            return True  # the fleet's leader assigns each instance a host; the view filters
        return placed_here(manifest, self.settings.host_name, self.settings.host_labels)

    # -- sync ----------------------------------------------------------------
    def load(self) -> LoadResult | None:
        """Read the manifests now; None while a Git source has nothing fetched yet."""
        if self.git is not None:
            root = self.git.manifests_root()
            if root is None or not root.is_dir():
                return None  # nothing fetched yet: keep every agent as it is
            self.source.roots = [(root, self.git.display_root())]
        agents = self.table.agents
        return self.source.load({n: a.source for n, a in agents.items() if a.desired is not None})

    def sync_paths(self, paths: set[str]) -> None:
        """Fold in a change to these manifest files only (a file event): no walk, no re-read of
        the others; a change the loader cannot fold in alone (a directory) is a full sync."""
        result = None if self.git is not None else self.source.load_paths(paths, self._running_from)
        self.sync(result)

    def _running_from(self, name: str) -> str | None:
        agent = self.table.agents.get(name)
        return agent.source if agent is not None and agent.desired is not None else None

    def _names(self, result: LoadResult) -> set[str] | None:
        """The agents this load may have changed: None (all) after a full load; after a load of a
        few files, the names they declared before and now, and the agents whose source they are."""
        if result.only is None or result.only_files is None:
            return None
        files = result.only_files
        return result.only | {n for n, a in self.table.agents.items() if a.source in files}

    def sync(self, result: LoadResult | None = None) -> None:
        """Fold a fresh load of the manifests into the agents; mark what changed dirty."""
        if result is None:
            result = self.load()
            if result is None:
                return
        if self.source_health.update(result):
            self.queue.mark_all(self.table.agents)  # SourceReady changes on every status
        names = self._names(result)  # None: every agent
        declared: set[str] = set()
        manifests = result.manifests
        for name in manifests if names is None else [n for n in names if n in manifests]:
            declared.add(name)
            self._take_valid(name, manifests[name])
        errors_by_agent: dict[str, list[str]] = {}
        for err in result.errors:
            if err.agent and (names is None or err.agent in names):
                errors_by_agent.setdefault(err.agent, []).append(str(err))
        self._log_file_errors(result)
        for file in result.broken_files:
            if result.only_files is not None and file not in result.only_files:
                continue  # unchanged since the last load: its agents already carry its error
            message = "; ".join(str(e) for e in result.errors if e.file == file and not e.agent)
            for name, agent in self.table.agents.items():
                if agent.source == file and agent.present:
                    errors_by_agent.setdefault(name, []).append(message)
        for name, messages in errors_by_agent.items():
            declared.add(name)
            self._take_invalid(name, result, messages)
        agents = self.table.agents
        for name, agent in (agents.items() if names is None else [(n, agents[n]) for n in names if n in agents]):
            if name not in declared and agent.present:
                if kept_by_failure(result, agent.source):
                    continue  # a read that failed is never a deletion (CONTRACT §11)
                agent.present = False
                log.info("%s manifest removed -> stopping", name,
                         extra=opsview.logfields(name, None, "delete", "ManifestDeleted"))
                self.table.event(name, None, "Deleted", ExitReason.MANIFEST_DELETED, f"manifest {agent.source} is gone")
                self.queue.mark(name)
        self.manifest_valid = merge_validity(self.manifest_valid, self._validity(result), result)  # unread files keep theirs

    def _log_file_errors(self, result: LoadResult) -> None:
        """A file whose agent cannot even be named gets a log line (once per distinct error)."""
        current = {str(e) for e in result.errors if not e.agent}
        for message in sorted(current - self._logged_file_errors):
            log.warning("invalid manifest file: %s", message)
        self._logged_file_errors = current

    def _clear_failed(self, name: str) -> None:
        """Any edit of the spec (also of policy fields that restart nothing) ends a Failed crash loop."""
        for rec in self.table.of(name).values():
            if rec.terminal == "Failed":
                self.table.put(records.failure_cleared(rec))
                self.table.event(name, rec.id, "Retry", "SpecChanged", "the spec was edited: restarting a Failed instance")

    @staticmethod
    def _validity(result: LoadResult) -> dict[str, bool]:
        valid = {file: True for file in result.names_by_file}
        for err in result.errors:
            valid[err.file] = False
        return valid

    def _take_valid(self, name: str, loaded: Loaded) -> None:
        agent = self.table.agents.get(name)
        if agent is None:
            agent = self.table.agents[name] = AgentState(name, loaded.source, self.clock.wall())
            self.table.event(name, None, "Created", "ManifestAdded", f"from {loaded.source}")
        revision = self.git.revision if self.git is not None else None
        if agent.loaded is loaded and agent.valid and agent.present and agent.source_revision == revision \
                and not agent.errors:  # a duplicate's error must clear once the duplicate is gone
            return  # the loader's cache says nothing this agent reads has changed
        if agent.errors and agent.valid:
            self.queue.mark(name)  # republish; _take_invalid sets the errors again if the duplicate stays
        agent.loaded = loaded
        desired = self.desire(loaded)
        placed = self._placed(loaded.manifest)
        before = (agent.desired, agent.valid, agent.present, agent.placed, agent.source, agent.source_revision)
        agent.desired, agent.valid, agent.errors, agent.present = desired, True, [], True
        agent.placed, agent.source, agent.source_revision = placed, loaded.source, revision
        if before != (desired, True, True, placed, loaded.source, revision):
            if before[0] is not None and before[0].spec != desired.spec:
                self._clear_failed(name)
            self.table.save_agent(agent)
            self.queue.mark(name)

    def _take_invalid(self, name: str, result: LoadResult, messages: list[str]) -> None:
        agent = self.table.agents.get(name)
        if name in result.manifests and agent is not None:
            # a valid document of this name runs; the errors belong to a duplicate elsewhere
            agent.errors = messages
            self.queue.mark(name)
            return
        if agent is None:
            agent = self.table.agents[name] = AgentState(name, messages[0].split(":", 1)[0], self.clock.wall())
        if agent.valid or agent.errors != messages or not agent.present:
            kept = "keeping the last valid spec" if agent.desired is not None else "nothing runs until it is fixed"
            log.warning("%s invalid manifest, %s: %s", name, kept, messages[0],
                        extra=opsview.logfields(name, None, "invalid", "InvalidManifest"))
            self.table.event(name, None, "InvalidManifest", "InvalidManifest", messages[0])
        agent.valid, agent.errors, agent.present = False, messages, True
        self.queue.mark(name)

    def source_ready(self) -> tuple[bool, str] | None:
        """SourceReady: a Git fetch error first, then parts of the source that could not be read."""
        if self.git is not None and self.git.last_error:
            return False, self.git.last_error
        if (problem := self.source_health.problem()) is not None:
            return False, problem
        if self.git is None:
            return True, f"{self.settings.manifests} read"
        return True, f"{self.git.url} at {self.git.revision}"

    def source_reason(self) -> str | None:
        """The reason of SourceReady=False: the status's own (Git) or ReadFailed."""
        return None if self.git is not None and self.git.last_error else "ReadFailed"
