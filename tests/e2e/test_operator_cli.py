

def test_logs_follow_of_several_instances_prefixes_new_lines(ctl: Controller) -> None:
    ctl.apply("chatty", py("import os, sys, time\nname = os.environ['AGENTCTL_INSTANCE']\n"
                           "for i in range(600):\n    print(name, 'line', i, flush=True)\n    time.sleep(0.2)"),
              replicas=2)
    ctl.start()
    running(ctl, "chatty", 2)
    proc = subprocess.Popen([PY, "-m", "controller", "logs", "chatty", "-f", "--tail", "0", "--state-dir",
                             str(ctl.state)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    ctl.pgids.add(proc.pid)
    assert proc.stdout is not None
    seen: set[str] = set()
    try:
        def both_followed() -> bool:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith(("[chatty-0] chatty-0 line ", "[chatty-1] chatty-1 line ")), line
            seen.add(line[1:9])
            return seen == {"chatty-0", "chatty-1"}
        wait_for(both_followed, DEADLINE, interval=0, message="new lines of both instances")
    finally:
        proc.kill()
        proc.wait(DEADLINE)
        proc.stdout.close()


def test_a_suspend_is_forgotten_with_its_deleted_agent(ctl: Controller) -> None:
    ctl.apply("brief", sleeper())
    ctl.start()
    running(ctl, "brief")
    assert ctl.cli("suspend", "brief").returncode == 0
    ctl.wait_phase("brief", "Suspended", DEADLINE)
    ctl.delete("brief.yaml")
    wait_for(lambda: ctl.status("brief") is None, DEADLINE, message="brief removed")
    wait_for(lambda: "brief" not in (ctl.state / "overrides.json").read_text(), DEADLINE,
             message="the override dropped")
    ctl.apply("brief", sleeper("back as written"))
    running(ctl, "brief")  # declared again: runs as its manifest says, not suspended
