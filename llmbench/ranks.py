"""Where a process stands in a job: rank and size from the launcher (MPI, torchrun, deepspeed), the rendezvous
address, and each rank's share of the node's CPU cores."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from llmbench.errors import UserError

# (launcher, rank, size, local rank, local size) environment variables, most specific first.
LAUNCHER_ENV = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("pals", "PALS_RANKID", "PMI_SIZE", "PALS_LOCAL_RANKID", "PALS_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
)
MPI_LAUNCHERS = ("openmpi", "pals", "mpich")


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks of one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(environ, name: str | None) -> int | None:
    value = environ.get(name) if name else None
    return int(value) if value not in (None, "") and value.strip().lstrip("-").isdigit() else None


def discover_world(environ=None) -> World:
    """Rank and size from the launcher's environment (MPI implementations, torchrun, deepspeed); else one rank."""
    environ = os.environ if environ is None else environ
    for launcher, rank_var, size_var, local_rank_var, local_size_var in LAUNCHER_ENV:
        rank, size = _int_env(environ, rank_var), _int_env(environ, size_var)
        if rank is None or size is None:
            continue
        local_rank = _int_env(environ, local_rank_var)
        local_size = _int_env(environ, local_size_var) or _int_env(environ, "LOCAL_SIZE")
        if launcher == "torchrun" and "LOCAL_SIZE" in environ and "LOCAL_WORLD_SIZE" not in environ:
            launcher = "deepspeed"
        if local_rank is None:  # single-node assumption, corrected by mpi4py when it runs
            local_rank = rank
        if not 0 <= rank < size:
            raise UserError(f"{rank_var}={rank} is not a rank of a job of {size_var}={size} ranks")
        return World(rank, size, local_rank, local_size or size, launcher)
    return World()



def _mpi_comm(world: World):
    """mpi4py's COMM_WORLD under an MPI launcher, else None (mpi4py missing or built for another MPI)."""
    if world.launcher not in MPI_LAUNCHERS:
        return None
    try:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        return comm if comm.Get_size() == world.size else None
    except Exception:  # noqa: BLE001 - mpi4py bound to another MPI: fall back to the environment
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous(world: World) -> World:
    """Set MASTER_ADDR/MASTER_PORT and the torch.distributed variables; -> the world, local ranks made exact."""
    comm = _mpi_comm(world)
    if comm is not None:
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        world = World(world.rank, world.size, node.Get_rank(), node.Get_size(), world.launcher)
        single_node = world.local_size == world.size
        address = None
        if world.is_main:
            address = (os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else
                                                         socket.gethostbyname(socket.gethostname())),
                       os.environ.get("MASTER_PORT") or str(_free_port()))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = comm.bcast(address, root=0)
    else:
        if world.local_size != world.size and "MASTER_ADDR" not in os.environ:
            raise UserError("a job over several nodes needs MASTER_ADDR (the address of rank 0's node) "
                            "or mpi4py built for the MPI that launched it")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.size), LOCAL_RANK=str(world.local_rank),
                      LOCAL_SIZE=str(world.local_size), LOCAL_WORLD_SIZE=str(world.local_size))
    return world


def share_cpu_cores(world: World) -> None:
    """Give each rank on a node its own slice of the cores: ranks that all run as many threads as the node
    has cores oversubscribe it and slow every all-reduce down by an order of magnitude."""
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) != os.cpu_count() or world.local_size <= 1:
        torch.set_num_threads(len(cores))  # the launcher bound this rank already
        return
    per_rank = max(1, len(cores) // world.local_size)
    mine = cores[world.local_rank * per_rank:(world.local_rank + 1) * per_rank] or cores[-per_rank:]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
