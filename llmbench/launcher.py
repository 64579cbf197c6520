"""The tensor-parallel launch: one rank of run_generation_with_deepspeed.py finds its world, joins it, runs
run_generation.py's main() with it and, when it fails, ends the whole job (the other ranks may be waiting in a
collective that will never complete)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmbench.errors import UserError
from llmbench.main import main as run_main
from llmbench.ranks import World, discover_world, rendezvous


def release_shared_memory() -> None:
    """DeepSpeed's CPU shared-memory all-reduce never unlinks its buffers: every job would leave one /dev/shm segment
    per rank behind (69 MB each, memory until reboot). Each rank maps every rank's segment while the group comes up,
    so whichever rank ends first may remove the job's segments (the mappings stay valid)."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if address and port:
        for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_*"):
            segment.unlink(missing_ok=True)


def exit_rank(code: int) -> None:
    """End this rank now, its output flushed and the job's shared-memory segments removed, without the
    interpreter's teardown."""
    release_shared_memory()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def abort(world: World, code: int, prog: str) -> None:
    """End the whole job now: the other ranks may be waiting in a collective that will never complete."""
    print(f"{prog}: rank {world.rank} of {world.size} failed (exit {code}); ending the job", file=sys.stderr,
          flush=True)
    # Exiting (rather than MPI_Abort) lets the launcher forward this rank's last lines before it ends the
    # other ranks: MPI launchers, torchrun and deepspeed all end a job whose rank exits non-zero.
    exit_rank(code)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of run_generation_with_deepspeed.py: one rank of a tensor-parallel job."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        world = discover_world()
        if world.size > 1:
            world = rendezvous(world)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    code = 1
    try:
        code = run_main(argv, prog, world=world)
    except SystemExit as exc:  # a bad flag: argparse has printed it
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    finally:
        if code != 0 and world.size > 1:
            abort(world, code, prog)
    if world.size > 1:
        finish_rank(code)
    return code


def finish_rank(code: int) -> None:
    """End a rank whose work is done and written: its process group destroyed, MPI finalized, then exit_rank. Skipping
    the interpreter's teardown, where a rank of a finished job sometimes died in a C++ destructor ("terminate called
    without an active exception", exit 6: 2 of 30 two-rank jobs in one full test run on an AMX Xeon with DeepSpeed's
    shared-memory all-reduce)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")  # MPI launchers end a job whose rank exits without MPI_Finalize
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    exit_rank(code)
