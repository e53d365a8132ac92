"""Unit tests of --memory-limit parsing and of reading the cgroup limits that ``auto`` honours."""

import psutil
import pytest

from jobsched.worker.memory import available_memory, parse_memory_limit

RAM = psutil.virtual_memory().total


def fake_cgroup(tmp_path, proc_line: str, limits: dict[str, str]):
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    root = tmp_path / "sys"
    for rel, value in limits.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return str(proc), str(root)


def test_v2_limit_of_the_service_is_found(tmp_path):
    proc, root = fake_cgroup(tmp_path, "0::/system.slice/jobsched-worker@1.service",
                             {"system.slice/jobsched-worker@1.service/memory.max": str(2**30)})
    assert available_memory(proc, root) == min(RAM, 2**30)


def test_v2_tightest_parent_wins_and_max_means_none(tmp_path):
    proc, root = fake_cgroup(tmp_path, "0::/a/b/c", {
        "a/b/c/memory.max": "max",
        "a/b/memory.max": str(3 * 2**20 * 1024),
        "a/memory.max": str(5 * 2**30),
    })
    assert available_memory(proc, root) == min(RAM, 3 * 2**30)


def test_v1_memory_controller(tmp_path):
    proc, root = fake_cgroup(tmp_path, "4:memory:/slurm/uid_1/job_7\n3:cpu,cpuacct:/slurm/uid_1/job_7",
                             {"memory/slurm/uid_1/job_7/memory.limit_in_bytes": str(2**31)})
    assert available_memory(proc, root) == min(RAM, 2**31)


def test_no_cgroup_information_means_total_ram(tmp_path):
    assert available_memory(str(tmp_path / "missing"), str(tmp_path)) == RAM


@pytest.mark.parametrize("text, expected", [("4GiB", 4 * 2**30), ("500MB", 500 * 10**6), ("2 gib", 2 * 2**30),
                                            ("0", 0), ("none", 0), (None, 0), ("123456789", 123456789)])
def test_sizes(text, expected):
    assert parse_memory_limit(text) == expected


def test_fraction_and_auto_share_available_memory():
    assert parse_memory_limit("0.5") == int(available_memory() * 0.5)
    assert parse_memory_limit("auto", 4) == available_memory() // 4


@pytest.mark.parametrize("text", ["plenty", "-1", "4XB", "100", "1e9GB", ""])
def test_bad_values_name_the_value(text):
    if text == "":
        assert parse_memory_limit(text) == 0  # empty: no limit
        return
    with pytest.raises(ValueError, match="memory limit"):
        parse_memory_limit(text)
