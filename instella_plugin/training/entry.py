"""``pretrain_gpt.py`` / ``instella-pretrain-gpt`` / ``instella train``: parse, then run the loop."""
import logging
import sys

import torch

from instella_plugin.training.arguments import parse_args
from instella_plugin.training.loop import pretrain


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Index caching needs a shared --data-cache-path; without one the indices are rebuilt (cheap).
    logging.getLogger("megatron.core.datasets.blended_dataset").setLevel(logging.ERROR)
    run, plugin = parse_args(argv)
    try:
        pretrain(run, plugin)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
