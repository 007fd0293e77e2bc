"""scripts/slurm_local.sh at first contact, without touching a running cluster: it refuses a slurm.conf it did not
write (pointed at a temporary one with SLURM_LOCAL_CONF), and a daemon that did not start is named with the
fatal line it logged this time and its log file (the script's functions, sourced)."""
import subprocess

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
MARK = "# Written by outlierlab scripts/slurm_local.sh"


def test_a_slurm_conf_it_did_not_write_is_refused_and_left_as_it_was(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=production\nSlurmctldHost=head01\n")
    done = subprocess.run(["bash", str(SCRIPT), "start"], env={"PATH": "/usr/bin:/bin", "SLURM_LOCAL_CONF": str(conf)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"refusing to replace {conf}" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert conf.read_text() == "ClusterName=production\nSlurmctldHost=head01\n"


def _sourced(tmp_path, commands: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source {SCRIPT}; {commands}"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **env})


def test_its_own_slurm_conf_is_recognised(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"{MARK}: a one-node cluster\nClusterName=outlierlab\n")
    assert _sourced(tmp_path, "ours", SLURM_LOCAL_CONF=str(conf)).returncode == 0
    conf.write_text("ClusterName=outlierlab\n" + MARK)  # the mark must open the file
    assert _sourced(tmp_path, "ours", SLURM_LOCAL_CONF=str(conf)).returncode == 1
    assert _sourced(tmp_path, "ours", SLURM_LOCAL_CONF=str(tmp_path / "absent.conf")).returncode == 0


def test_a_daemon_that_did_not_start_is_named_with_its_logged_reason(tmp_path):
    earlier = "[2026-01-01T00:00:00] error: an earlier run's error, not this one's\n"
    (tmp_path / "slurmctld.log").write_text(earlier)
    offset = len(earlier.encode())
    with open(tmp_path / "slurmctld.log", "a") as log:
        log.write("[2026-12-02T10:00:00] slurmctld version 23.11 started\n"
                  "[2026-12-02T10:00:00] fatal: CLUSTER NAME MISMATCH.\n")
    done = _sourced(tmp_path, f"say_why_not slurmctld {offset}", SLURM_LOCAL_LOGS=str(tmp_path))
    line = done.stderr.strip()
    assert "slurmctld did not start" in line and "fatal: CLUSTER NAME MISMATCH" in line, done.stderr
    assert f"(log: {tmp_path}/slurmctld.log)" in line and "earlier run" not in line
