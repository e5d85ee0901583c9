"""How many CPU threads sampling, evaluation and training use: chosen from the work and the CPUs
other programs leave free (fake machines here, no timing), or set with --threads."""

from __future__ import annotations

import os

import pytest
import torch

from minigpt_cli import device
from minigpt_cli.config import UserError
from minigpt_cli.device import WORK_PER_THREAD, CpuState, choose_threads, use_threads

from conftest import assert_usage_error, invoke

DEFAULT_DECODE = 0.8e6  # weights the default model reads per decode step
CLASSIC_DECODE = 10.6e6  # the 6 x 384 model's
TRAIN_STEP = 32 * 64 * 0.8e6


def test_a_quiet_machine_gives_a_big_step_every_cpu():
    assert choose_threads(TRAIN_STEP, CpuState(cpus=2, others_running=0)).threads == 2
    assert choose_threads(TRAIN_STEP, CpuState(cpus=16, others_running=0)).threads == 16


def test_a_small_batch_1_step_stays_on_one_thread_even_when_cpus_are_free():
    choice = choose_threads(DEFAULT_DECODE, CpuState(cpus=2, others_running=0))
    assert choice.threads == 1
    assert "multiply-adds" in choice.reason
    # The work caps the threads at one per WORK_PER_THREAD.
    assert choose_threads(3 * WORK_PER_THREAD, CpuState(cpus=16, others_running=0)).threads == 3
    assert choose_threads(CLASSIC_DECODE, CpuState(cpus=2, others_running=0)).threads == 2


def test_one_competing_process_takes_its_cpu_away():
    for work in (CLASSIC_DECODE, TRAIN_STEP):
        choice = choose_threads(work, CpuState(cpus=2, others_running=1))
        assert choice.threads == 1
        assert "1 other thread(s) running on 2 CPU(s)" in choice.reason
    assert choose_threads(TRAIN_STEP, CpuState(cpus=16, others_running=3)).threads == 13


def test_an_overloaded_machine_still_gets_one_thread():
    assert choose_threads(TRAIN_STEP, CpuState(cpus=2, others_running=15)).threads == 1
    assert choose_threads(0, CpuState(cpus=0, others_running=0)).threads == 1


def test_threads_requested_or_set_in_the_environment_win():
    busy = CpuState(cpus=2, others_running=15)
    assert choose_threads(DEFAULT_DECODE, busy, requested=2) == device.ThreadChoice(2, "requested (--threads)")
    assert choose_threads(DEFAULT_DECODE, busy, env_threads="3").threads == 3
    assert choose_threads(DEFAULT_DECODE, busy, requested=2, env_threads="3").threads == 2
    assert choose_threads(TRAIN_STEP, CpuState(2, 0), env_threads="junk").threads == 2  # not a count: ignored


def proc_stat(*cpus: tuple[int, int]) -> str:
    """A /proc/stat whose CPUs have counted these (busy, idle) ticks."""
    per_cpu = [f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0" for i, (busy, idle) in enumerate(cpus)]
    total = (sum(b for b, _ in cpus), sum(i for _, i in cpus))
    return "\n".join([f"cpu  {total[0]} 0 0 {total[1]} 0 0 0 0 0 0", *per_cpu, "intr 120 3 0", "ctxt 991"]) + "\n"


def fake_machine(monkeypatch, snapshots, stats=(), own_seconds=(0.0, 0.0), allowed=(0, 1)):
    """A machine read through fakes: the runnable threads of others in each snapshot, the /proc/stat
    texts read at the start and end of the window, this process's CPU seconds then, and its CPUs."""
    snapshots, stats, own_seconds = iter(snapshots), iter(stats), iter(own_seconds)
    monkeypatch.setattr(device, "_others_running_once", lambda: next(snapshots))
    monkeypatch.setattr(device, "_proc_stat", lambda: next(stats))
    monkeypatch.setattr(device.os, "times", lambda: os.times_result((next(own_seconds), 0.0, 0.0, 0.0, 0.0)))
    monkeypatch.setattr(device.os, "sysconf", lambda name: 100)  # clock ticks per second
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(allowed))
    waits = []
    monkeypatch.setattr(device.time, "sleep", waits.append)
    return waits


def test_a_quiet_snapshot_is_taken_at_once_without_waiting(monkeypatch):
    waits = fake_machine(monkeypatch, snapshots=[0.0, 7.0, 0.0])  # a burst in one snapshot is not taken for the load
    state = device.cpu_state(samples=3)
    assert state == CpuState(cpus=2, others_running=0.0)
    assert sum(waits) < 0.01  # no window was measured (the fake has no /proc/stat to read)


def test_a_program_starting_beside_us_does_not_take_a_cpu_away(monkeypatch):
    """`minigpt sample RUN | python3 -c ...`: the reader is runnable when we look, but over the window
    it uses one tick of the ten the two CPUs count."""
    waits = fake_machine(monkeypatch, snapshots=[1.0, 1.0, 1.0],
                         stats=[proc_stat((500, 500), (800, 200)), proc_stat((501, 504), (800, 205))])
    state = device.cpu_state()
    assert state.others_running == pytest.approx(0.2)
    assert choose_threads(TRAIN_STEP, state).threads == 2
    assert device.LOAD_WINDOW_SECONDS in waits


def test_a_neighbour_that_keeps_a_cpu_busy_takes_it_away(monkeypatch):
    fake_machine(monkeypatch, snapshots=[1.0, 1.0, 1.0],
                 stats=[proc_stat((500, 500), (800, 200)), proc_stat((500, 505), (805, 200))])
    state = device.cpu_state()
    assert state.others_running == pytest.approx(1.0)
    choice = choose_threads(TRAIN_STEP, state)
    assert choice.threads == 1
    assert "1 other thread(s) running on 2 CPU(s)" in choice.reason


def test_our_own_threads_and_cpus_we_may_not_use_are_not_a_neighbour(monkeypatch):
    # Both CPUs busy for the window, but 5 of those 10 ticks were this process's own threads.
    fake_machine(monkeypatch, snapshots=[1.0, 1.0, 1.0], own_seconds=[2.00, 2.05],
                 stats=[proc_stat((500, 500), (800, 200)), proc_stat((505, 500), (805, 200))])
    assert device.cpu_state().others_running == pytest.approx(1.0)
    # CPUs 2 and 3 are busy, but this process may run on 0 and 1 only.
    fake_machine(monkeypatch, snapshots=[1.0, 1.0, 1.0], allowed=(0, 1),
                 stats=[proc_stat((1, 9), (1, 9), (0, 0), (0, 0)), proc_stat((1, 14), (1, 14), (5, 0), (5, 0))])
    assert device.cpu_state() == CpuState(cpus=2, others_running=0.0)


def test_use_threads_sets_torch_and_reads_the_machine_only_when_it_must(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "cpu_state", lambda: pytest.fail("the machine was read for a requested count"))
    try:
        assert use_threads(TRAIN_STEP, requested=2).threads == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(device, "cpu_state", lambda: CpuState(cpus=4, others_running=1))
        assert use_threads(TRAIN_STEP).threads == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="--threads"):
        use_threads(TRAIN_STEP, requested=-1)


def test_sample_and_eval_report_the_threads_they_used(run_copy):
    sampled = invoke("sample", run_copy, "-n", "3", "--threads", "1", "--json")
    assert sampled.exit_code == 0, sampled.stderr
    assert sampled.json()["threads"] == {"threads": 1, "reason": "requested (--threads)"}
    scored = invoke("eval", run_copy, "--json")  # the suite sets OMP_NUM_THREADS=1
    assert scored.exit_code == 0, scored.stderr
    assert scored.json()["threads"] == {"threads": 1, "reason": "OMP_NUM_THREADS=1"}


@pytest.mark.parametrize("command", ["sample", "eval", "bench"])
def test_a_bad_thread_count_is_a_usage_error(run_copy, command):
    assert_usage_error(invoke(command, run_copy, "--threads", "-2", "--json"), "--threads")


def test_a_container_that_shows_fewer_cpus_than_the_mask_is_read_as_it_shows(monkeypatch):
    # The mask allows 4 CPUs but /proc/stat (lxcfs, say) lists 2, one busy with another process: one
    # CPU of two is taken, not two of four.
    fake_machine(monkeypatch, snapshots=[1.0, 1.0, 1.0], allowed=(0, 1, 2, 3),
                 stats=[proc_stat((500, 500), (800, 200)), proc_stat((500, 505), (805, 200))])
    assert device.cpu_state().others_running == pytest.approx(1.0)
