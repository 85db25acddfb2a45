"""The reconcile runtime, split along its data flow (docs/architecture.md):

queue (dirty names, timers) -> intake (manifests -> desired) -> table (agents and instance
records, written through to the store) -> executor (actions -> supervisor calls) -> exits
(pidfd, adoption, remnants) -> publish (status files, snapshot). controller.reconciler holds
only the loop that drives them; nothing here imports it.
"""
