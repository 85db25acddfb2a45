"""The fleet is opt-in (CONTRACT §10): without coordination etcd is never imported nor contacted,
and the coordination settings are validated with clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import PY, Controller


def test_importing_the_cli_never_imports_the_etcd_client() -> None:
    code = "import sys, controller.cli, controller.runner; print('etcd3gw' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_a_run_without_coordination_never_imports_the_etcd_client(ctl: Controller) -> None:
    ctl.apply("solo", replicas=1)
    # -X importtime names every module the whole run imported, on stderr
    done = subprocess.run([PY, "-X", "importtime", *ctl.args("--once")[1:]], capture_output=True, text=True,
                          timeout=120, cwd=ctl.root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "controller.reconciler" in done.stderr  # the run really happened
    assert "etcd3gw" not in done.stderr and "controller.fleet" not in done.stderr


def test_a_lease_ttl_outside_2_to_60_is_refused(ctl: Controller) -> None:
    done = ctl.cli("run", "--manifests", str(ctl.manifests), "--etcd-endpoints", "http://127.0.0.1:1",
                   "--lease-ttl", "1")
    assert done.returncode == 2
    assert "leaseTTL" in done.stderr


def test_fleet_flags_need_endpoints(ctl: Controller) -> None:
    done = ctl.cli("run", "--manifests", str(ctl.manifests), "--fleet", "x")
    assert done.returncode == 2 and "--etcd-endpoints" in done.stderr


def test_the_config_file_coordination_block_is_validated(ctl: Controller, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("coordination:\n  etcd: {endpoints: ['http://127.0.0.1:1']}\n  leaseTTL: 61\n")
    done = ctl.cli("run", "--manifests", str(ctl.manifests), "--config", str(cfg))
    assert done.returncode == 2 and "leaseTTL" in done.stderr
    cfg.write_text("coordination:\n  etcd: {endpoints: []}\n")
    done = ctl.cli("drain", "somehost", "--config", str(cfg))
    assert done.returncode == 2 and "endpoints" in done.stderr


def test_an_endpoint_that_is_not_an_url_is_refused(ctl: Controller) -> None:
    done = ctl.cli("run", "--manifests", str(ctl.manifests), "--etcd-endpoints", "etcd-1:2379")
    assert done.returncode == 2 and "endpoints" in done.stderr


def test_once_cannot_run_a_coordinated_fleet(ctl: Controller) -> None:
    done = ctl.cli("run", "--once", "--manifests", str(ctl.manifests), "--etcd-endpoints", "http://127.0.0.1:1")
    assert done.returncode == 2 and "--once" in done.stderr
