"""One thread-count helper for llama.cpp and onnxruntime: physical cores within the CPU affinity and cgroup quota."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medrwr_edge import cpu
from medrwr_edge.kb_pack import encoders
from medrwr_edge.runtime import llama_native

ROOT = Path(__file__).resolve().parents[1]


def test_llama_cpp_and_onnx_use_the_same_helper():
    assert llama_native.physical_cores is cpu.physical_cores is encoders.physical_cores
    n = cpu.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_two_hyperthreads_of_one_core_count_once(monkeypatch):
    topology = {0: ("0", "0"), 1: ("0", "1"), 2: ("0", "0"), 3: ("0", "1")}  # cpu 2, 3: SMT siblings of 0, 1
    monkeypatch.setattr(cpu, "_core_of_cpu", lambda: topology)
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(cpu, "allowed_cpus", lambda: {0, 2})  # taskset -c 0,2: one core, two threads of it
    assert cpu.physical_cores() == 1
    monkeypatch.setattr(cpu, "allowed_cpus", lambda: {0, 1, 2, 3})
    assert cpu.describe() == {"threads": 2, "allowed_cpus": 4, "physical_cores_allowed": 2, "physical_cores_total": 2,
                              "cgroup_cpu_limit": None}
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 1.5)  # docker --cpus 1.5
    assert cpu.physical_cores() == 2
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 0.5)
    assert cpu.physical_cores() == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_a_process_pinned_to_one_cpu_gets_one_thread_and_doctor_says_so():
    """A real affinity limit (as `taskset -c 0` sets), in a child process: the helper and `doctor --json`."""
    code = ("import os, json, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from medrwr_edge import cpu; print(json.dumps(cpu.describe()))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    check=True).stdout)
    assert out["threads"] == 1 and out["allowed_cpus"] == 1
    doctor = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from medrwr_edge.cli import main; sys.argv = ['medrwr-edge', 'doctor', '--json', '--no-measure']; main()")
    proc = subprocess.run([sys.executable, "-c", doctor], capture_output=True, text=True, env=env, timeout=300)
    report = json.loads(proc.stdout)
    assert report["cpu"]["default_threads"] == 1 and report["cpu"]["usable_cores"] == 1
