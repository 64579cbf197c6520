"""llmbench: time and evaluate text generation of Hugging Face causal LMs."""

import logging

__version__ = "0.1.0"


def errors_only(record) -> bool:
    return record.levelno >= logging.ERROR


# transformers 4.51 imports DeepSpeed with its modeling code, and DeepSpeed logs "Setting accelerator to CPU" on
# import: its warnings stay out from the start, until pipeline.quiet_libraries() lets them in (verbose or
# distributed runs).
logging.getLogger("DeepSpeed").addFilter(errors_only)
