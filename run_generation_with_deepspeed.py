#!/usr/bin/env python
"""One rank of a tensor-parallel run (DeepSpeed AutoTP): the flags and modes of run_generation.py.

    mpirun -np 2 --prepend-rank python run_generation_with_deepspeed.py --benchmark ...
"""

import sys

from llmbench.allocator import restart_with_allocator

if __name__ == "__main__":
    restart_with_allocator()  # first: jemalloc or tcmalloc where installed (--allocator), in every rank
    from llmbench.launcher import main

    sys.exit(main())
