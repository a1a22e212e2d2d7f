"""The process group, started so that it listens on no more network than the job needs.

`torch.distributed.init_process_group("env://")` makes rank 0 start a TCPStore that listens on every
interface (`*:MASTER_PORT`), even for a one-process run, and the store has no authentication: anyone who
can reach the port can join or disturb the job. Here instead:

* one process (WORLD_SIZE=1): an in-memory HashStore, no store socket at all;
* every rank on this host (MASTER_ADDR is a loopback address, as the deepspeed launcher and torchrun set
  for single-node jobs, or LOCAL_WORLD_SIZE equals WORLD_SIZE, as in a one-node SLURM job): the store
  listens on 127.0.0.1 only, and gloo/NCCL use the loopback interface;
* several nodes: the store listens only on MASTER_ADDR's own address (not every interface). It is still
  reachable from that network: see docs/slurm.md ("Network exposure") for how to restrict it.

deepspeed.init_distributed, called afterwards, finds the group initialized and wraps it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from pathlib import Path


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def _loopback_ifname() -> str:
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs):
                return name
    except ImportError:
        pass
    return "lo"


def _listening_socket(host: str, port: int) -> int | None:
    """A socket bound to host:port only, listening, for TCPStore(master_listen_fd=...); None when this host
    cannot bind that address (MASTER_ADDR names a load balancer or NAT address)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(socket.SOMAXCONN)
    except OSError:
        return None
    return s.detach()


def init_process_group(backend: str, timeout: timedelta) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    local_world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")  # torchrun/srun | deepspeed
    if local_world and int(local_world) == world:
        master = "127.0.0.1"  # every rank is on this host (each one sees this): no need to reach the network
    if world == 1 or _is_loopback(master):
        # The data-plane sockets of gloo/NCCL too: by default gloo binds the address the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_ifname())
        os.environ.setdefault("NCCL_SOCKET_IFNAME", _loopback_ifname())
    if world == 1:
        store = dist.HashStore()
    else:
        port = int(os.environ["MASTER_PORT"])
        fd = _listening_socket(master, port) if rank == 0 else None
        if rank == 0 and fd is None:
            print(f"warning: cannot bind the process-group store to MASTER_ADDR={master}; it listens on every "
                  f"interface (port {port}); see docs/slurm.md, 'Network exposure'", flush=True)
        store = dist.TCPStore(master, port, world, rank == 0, timeout, master_listen_fd=fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def shutdown_process_group() -> None:
    """Leave the process group together, at the end of a run that every rank finished (or agreed to stop).

    Without this the group is torn down by interpreter finalization, and gloo's worker threads can still
    be joinable then: a rank occasionally died after writing every output with `terminate called without
    an active exception` (rc 250 from the launcher; seen twice in 452 tests here, pytorch/pytorch#190489).
    Only on the success/agreed-stop paths: after a crash a peer may be inside a collective, and a barrier
    here would hang it (torchtitan destroys only on success for the same reason)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


# DeepSpeed 0.19.8's CPU communication op (deepspeed_shm_comm, used for inference all-reduce) names one
# POSIX shared-memory segment per rank like this when every rank is on one host (LOCAL_SIZE == WORLD_SIZE,
# as the deepspeed launcher sets), and never unlinks it: each run left ~67 MiB per rank in /dev/shm, memory
# that stays taken until reboot (a sweep of 100 two-rank runs: 13 GiB).
SHM_SEGMENT = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def unlink_deepspeed_shm(rank: int, world: int) -> None:
    """Call right after deepspeed.init_distributed. Every rank has mapped its peers' segments by the time
    init_distributed returns (it waits for them); after the barrier each rank removes its own segment's
    name. The mappings stay valid until the processes exit, and the memory is returned then, even on a kill."""
    import torch.distributed as dist

    if int(os.environ.get("LOCAL_SIZE") or 0) != world:  # the op's own condition (shm_interface.cpp): no segment
        return
    if world > 1:
        dist.barrier()
    path = Path(SHM_SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                   port=os.environ.get("MASTER_PORT", ""), rank=rank))
    path.unlink(missing_ok=True)


# Measured on the 2-core CI box: a cold build of the op takes about two minutes (issue 36: 1 min 47 s).
SHM_OP_BUILD = "~2 min on 2 cores"


def shm_op_build_dir() -> Path | None:
    """Where torch's JIT loader will build DeepSpeed's CPU communication op (deepspeed_shm_comm), which
    deepspeed.init_distributed compiles on CPU the first time in a fresh environment, silently; None when
    it is not needed or already there (cached in the torch-extensions folder, or prebuilt at install with
    DS_BUILD_SHM_COMM=1)."""
    try:
        import sys

        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import get_default_build_root

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) \
                or installed_ops.get(builder.NAME):
            return None
        # torch.utils.cpp_extension's layout (_get_build_directory): $TORCH_EXTENSIONS_DIR/<name>/<name>.so,
        # else <default root>/py<major><minor><abiflags>_cpu/<name>/<name>.so
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(get_default_build_root()) / \
            f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_cpu"
        folder = Path(root) / builder.NAME
        return None if (folder / f"{builder.NAME}.so").is_file() else folder
    except Exception:  # noqa: BLE001 - only a message depends on it
        return None


def announce_shm_op_build(rank: int) -> None:
    """One line before the silent compile (rank 0; the other ranks wait on torch's build lock)."""
    folder = shm_op_build_dir()
    if folder is not None and rank == 0:
        print(f"building DeepSpeed's {folder.name} op once ({SHM_OP_BUILD}, cached in {folder.parent}); "
              f"later runs skip this", flush=True)
