#!/usr/bin/env python
"""Time (--benchmark) or evaluate (--accuracy-only) text generation of a causal LM on one device."""

import sys

from llmbench.allocator import restart_with_allocator

if __name__ == "__main__":
    restart_with_allocator()  # first: jemalloc or tcmalloc where installed (--allocator)
    from llmbench.main import main

    sys.exit(main())
