"""The drafter's memory stays bounded however many threads call it (issue 7).

A Ray actor answers calls on a pool of up to 256 threads, so one target's
serial draft calls land on ever new threads. Each thread that runs a forward
keeps memory of its own afterwards (a malloc arena, MKL buffers): before
`DraftBatcher` ran every forward on one thread of its own, the drafter actor
grew by about 1 MiB per new calling thread.

The probe runs in a fresh process configured as Ray configures a drafter actor
(OMP_NUM_THREADS=1, its `num_cpus`), so other tests' memory does not blur the
reading: the zoo's drafter, a warm-up round, then one round (start, propose,
finish) from each of CALLERS threads in turn, all of them alive at the end.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

CALLERS = 32
MiB = 2**20


def test_rounds_from_many_threads_run_on_one_forward_thread_and_keep_no_memory():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                           cwd=Path(__file__).resolve().parents[1])
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.splitlines()[-1])
    assert result["forward_threads"] == 1 and not result["forward_on_a_caller"]
    assert result["live_sequences"] == 0
    # measured: 66 MiB with the forwards on the callers' threads (about 2 MiB each), 2-3 MiB with the fix
    assert result["grown"] < 16 * MiB, f"{result['grown'] / MiB:.0f} MiB kept after rounds from {CALLERS} threads"


def _private_memory() -> int:
    """This process's RssAnon in bytes (anonymous resident pages: heaps, arenas, stacks)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024


def _probe() -> dict:
    from actors.draft_batcher import DraftBatcher
    from actors.drafters import DraftRequest, ModelDrafter
    from actors.runner import ModelRunner
    from actors.sampling import make_sampling_params
    from cluster.defaults import default_drafter

    forward_threads: set[int] = set()

    class ThreadRecordingDrafter(ModelDrafter):
        """The zoo's real drafter, noting which thread ran each draft step."""

        def advance(self, jobs):
            forward_threads.add(threading.get_ident())
            return super().advance(jobs)

    drafter = ThreadRecordingDrafter(ModelRunner.from_pretrained(default_drafter()))
    batcher = DraftBatcher(drafter)
    params = make_sampling_params(temperature=0, max_tokens=8)

    def one_round(seq_id: int) -> None:
        batcher.start(seq_id, list(range(100, 112)), params)
        batcher.propose([DraftRequest(seq_id, 4)])
        batcher.finish(seq_id)

    one_round(-1)  # warm-up: the forward thread's own memory is paid here
    before = _private_memory()
    turns, finished, release = [threading.Event() for _ in range(CALLERS)], threading.Semaphore(0), threading.Event()
    callers: set[int] = set()

    def caller(i: int) -> None:
        callers.add(threading.get_ident())
        turns[i].wait()
        one_round(i)
        finished.release()
        release.wait()  # alive until memory is read, as a Ray pool's threads are

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for turn in turns:  # one caller at a time, like one target's serial calls
        turn.set()
        finished.acquire()
    grown = _private_memory() - before
    release.set()
    for thread in threads:
        thread.join()
    return {"forward_threads": len(forward_threads), "forward_on_a_caller": bool(forward_threads & callers),
            "live_sequences": drafter.runner.num_sequences, "grown": grown}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_probe()))
