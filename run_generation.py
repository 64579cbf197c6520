#!/usr/bin/env python
"""Time (--benchmark) or evaluate (--accuracy-only) text generation of a causal LM on one device."""

import sys

from llmbench.main import main

if __name__ == "__main__":
    sys.exit(main())
