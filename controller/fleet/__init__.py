"""The coordinated fleet on etcd (CONTRACT §10): leases, leader, assignment, ownership, fencing.

Opt-in: nothing here is imported unless `--etcd-endpoints` (or `coordination:` in the config)
is given, and only `kv` imports the etcd client, lazily, so a single-host controller never loads it.
"""
