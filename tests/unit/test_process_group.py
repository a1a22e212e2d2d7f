"""The process group's start and end, on 2 real gloo ranks over loopback (no engine, no model)."""

import os
import subprocess
import sys
import textwrap

from infoprompt_ds.env import free_port

RANK_SCRIPT = textwrap.dedent("""
    from datetime import timedelta
    import torch, torch.distributed as dist
    from infoprompt_ds.runtime.process_group import init_process_group, shutdown_process_group

    init_process_group("gloo", timedelta(seconds=60))
    t = torch.ones(3) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    assert t.tolist() == [3.0, 3.0, 3.0], t
    shutdown_process_group()
    assert not dist.is_initialized()  # left before interpreter exit: no gloo thread for finalization to meet
    shutdown_process_group()  # a second call (or a one-process run's) is a no-op
    print("left", dist.get_world_size() if dist.is_initialized() else 0)
""")


def test_two_ranks_leave_the_group_before_exit():
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == "left 0"
        assert "terminate called" not in err
