"""Who is lost or stuck when a collective fails (engine/distributed.py's roll call and heartbeat, engine/faults.py's
line), with four ranks played in this process against a real TCPStore: dead, stuck and merely blocked ranks are told
apart, which two real ranks (tests/test_multinode.py) cannot show."""
import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.distributed import PrefixStore, TCPStore

from danlu.engine import distributed
from danlu.engine.distributed import HEARTBEAT, Dist
from danlu.engine.faults import lost_ranks


@pytest.fixture
def store():
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield server


def _rank(store, rank: int, world: int = 4) -> Dist:
    s = PrefixStore("danlu/test/", TCPStore("127.0.0.1", store.port, is_master=False))
    s.set(f"who/{rank}", json.dumps({"host": "n2" if rank == 1 else "n1", "node": int(rank == 1), "pid": 100 + rank}))
    s.set(f"beat/{rank}", "0")
    return Dist(rank=rank, world=world, grouped=True, timeout=3, _store=s)


def _beating(store, rank: int, stop: threading.Event) -> threading.Thread:
    """A live rank's heartbeat thread (its own client: a TCPStore client is not shared between threads)."""
    t = threading.Thread(target=distributed._heartbeat, args=("127.0.0.1", store.port, "danlu/test/", rank, stop))
    t.start()
    return t


@pytest.mark.parametrize("timed_out", [False, True])
def test_the_roll_call_names_the_dead_and_the_stuck_never_the_blocked(store, timed_out):
    ranks = [_rank(store, r) for r in range(4)]  # 1 is dead (no beats), 2 is alive but never answers, 3 answers
    stop = threading.Event()
    hearts = [_beating(store, r, stop) for r in (0, 2, 3)]
    answered = {}
    t = threading.Thread(target=lambda: answered.update({3: ranks[3].roll_call(12, timed_out)}))
    t.start()
    call = ranks[0].roll_call(12, timed_out)
    t.join()
    stop.set()
    for h in hearts:
        h.join()
    where1 = {"host": "n2", "node": 1, "pid": 101}
    # rank 2 beats: after a closed connection it is only blocked behind a failing rank; after a timeout, it is the
    # rank everybody waited for
    assert call == {"lost": {1: where1}, "stuck": {2: {"host": "n1", "node": 0, "pid": 102}} if timed_out else {}}
    assert answered[3] == call
    line = lost_ranks(call, rank=0, world=4, iteration=12, timed_out=timed_out, timeout=3)
    if timed_out:
        assert line == ("lost rank 1 (host n2, node 1, pid 101) after iteration 12: no answer for 3 s (dist.timeout) "
                        "and no heartbeat (rank 0 of 4 noticed); rank 2 (host n1, node 0, pid 102) stuck: alive but "
                        "no answer for 3 s (dist.timeout) after iteration 12 (rank 0 of 4 gave up waiting)")
    else:
        assert line == ("lost rank 1 (host n2, node 1, pid 101) after iteration 12: its connection closed (rank 0 of "
                        "4 noticed)")


def test_a_rank_that_answered_and_left_before_is_lost_to_a_later_one(store):
    first, later = _rank(store, 0, world=2), _rank(store, 1, world=2)
    stop = threading.Event()
    hearts = [_beating(store, r, stop) for r in (0, 1)]
    assert first.roll_call(11, timed_out=True) == {"lost": {}, "stuck": {1: {"host": "n2", "node": 1, "pid": 101}}}
    # rank 0 leaves; rank 1, stuck until now, fails on its closed connection: no wait, nobody else to hear from
    assert later.roll_call(11, timed_out=False) == {"lost": {0: {"host": "n1", "node": 0, "pid": 100}}, "stuck": {}}
    stop.set()
    for h in hearts:
        h.join()


def test_lines_for_a_gone_store_many_ranks_of_one_node_and_nobody_missing():
    assert lost_ranks(None, rank=1, world=2, iteration=20, timed_out=False, timeout=300) == (
        "lost rank 0's node (the job's store, which it kept, is gone too) after iteration 20: its connection closed "
        "(rank 1 of 2 noticed)")
    node1 = {r: {"host": "n2", "node": 1, "pid": 100 + r} for r in range(8, 16)}
    assert lost_ranks({"lost": node1, "stuck": {}}, rank=0, world=16, iteration=None, timed_out=False,
                      timeout=300) == ("lost ranks 8-15 (host n2, node 1) before training started: their connections "
                                       "closed (rank 0 of 16 noticed)")
    assert lost_ranks({"lost": {}, "stuck": {}}, rank=0, world=2, iteration=5, timed_out=True, timeout=300) == (
        "every rank of 2 is alive but a collective timed out on rank 0 after iteration 5: the ranks called different "
        "collectives")


def test_the_heartbeat_counts_and_ends_quietly_when_the_store_is_gone(capfd):
    server = subprocess.Popen([sys.executable, "-c", "from torch.distributed import TCPStore; import time; "
                               "s = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False); "
                               "print(s.port, flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        reader = PrefixStore("danlu/x/", TCPStore("127.0.0.1", port, is_master=False))
        stop = threading.Event()
        beat = threading.Thread(target=distributed._heartbeat, args=("127.0.0.1", port, "danlu/x/", 3, stop))
        beat.start()
        for _ in range(100):  # a few beats (at most 10 s: a hung thread fails below)
            if reader.check(["beat/3"]) and int(reader.get("beat/3")) >= 2:
                break
            time.sleep(0.1)
        assert int(reader.get("beat/3")) >= 2
    finally:
        server.kill()
        server.wait()
    beat.join(timeout=10 * HEARTBEAT)
    assert not beat.is_alive()  # it ended by itself: the store is gone
    assert "TCPStore" not in capfd.readouterr().err  # and without torch's C++ stack trace on the console


def test_one_process_has_nobody_to_call():
    assert Dist().roll_call(3, timed_out=True) == {"lost": {}, "stuck": {}}
    assert torch.distributed.is_initialized() is False
