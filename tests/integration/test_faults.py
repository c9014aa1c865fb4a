"""Issue 11: under random controller, agent and VMM kills and agent freezes, a VM never
executes on two nodes at once and none is lost. Seeded and bounded; the timing figures
are the benchmark's (bench/fault_bench.py), this asserts only the invariants and that
every round converges at all (a hang is a failure, not a slow result)."""

from __future__ import annotations

import pytest

from tests.faults import FaultRun, Fleet, kill_strays

from .conftest import Cluster

SEED = 11
ROUNDS = 6  # every fault kind at least once (the plan shuffles them in blocks)
VMS = 30
EVICTION_TIMEOUT = 8.0
AGENT_EXTRA = ["--fence-after", "4"]  # well under the eviction timeout, as documented
CONVERGE_TIMEOUT = 120.0


@pytest.mark.timeout(900)
def test_random_faults_never_run_a_vm_twice_nor_lose_one(cluster: Cluster) -> None:
    c = cluster
    nodes = [c.node(s) for s in "abc"]
    fleet = Fleet(
        kubeconfig=c.kubeconfig, namespace=c.namespace, workdir=c.workdir, nodes=nodes,
        procs=c.procs,
        start_controller=lambda: c.start_controller(eviction_timeout=EVICTION_TIMEOUT),
        # Room for a lost node's VMs on the other two: 30 one-CPU VMs on two nodes.
        start_agent=lambda n: c.start_agent(n, cpus=32, memory="32Gi", extra=AGENT_EXTRA),
        eviction_timeout=EVICTION_TIMEOUT,
    )
    lines: list[str] = []
    run = FaultRun(fleet, SEED, vms=VMS, converge_timeout=CONVERGE_TIMEOUT, log=lines.append)
    try:
        report = run.run(ROUNDS)
    except Exception as exc:
        pytest.fail(f"seed {SEED}: the run failed: {exc!r}\n" + "\n".join(lines)
                    + f"\n{c.logs()}")
    finally:
        # VMMs and fencing watchdogs outlive agents by design; a duplicate's pid file may
        # have been overwritten. Delete the VMs while the agents run, then sweep.
        c.kubectl("delete", "hvm", "--all", "--timeout=60s", check=False)
        for name in list(c.procs):
            c.stop(name)
        kill_strays(c.workdir)
    print(report.summary())
    detail = f"\n{report.summary()}\n\nrun log:\n" + "\n".join(lines) + f"\n\n{c.logs()}"
    assert not report.sampler_errors, f"the duplicate sampler failed{detail}"
    assert report.samples > 0, f"the duplicate sampler never sampled{detail}"
    assert len(report.rounds) == ROUNDS and all(
        r.converged_after is not None for r in report.rounds), \
        f"a round did not converge within {CONVERGE_TIMEOUT}s{detail}"
    assert report.duplicates == [], f"a VM executed on two nodes at once{detail}"
    assert report.lost == {}, f"VMs lost{detail}"
