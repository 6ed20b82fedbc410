"""``pretrain_gpt.py`` / ``instella-pretrain-gpt`` / ``instella train``: parse, then run the loop."""
import logging
import sys

from instella_plugin.megatron_import import import_megatron_core

import_megatron_core()  # before anything imports megatron-core: every rank starts ~2.5 s sooner

import torch  # noqa: E402

from instella_plugin.training.arguments import parse_args  # noqa: E402


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Index caching needs a shared --data-cache-path; without one the indices are rebuilt (cheap).
    logging.getLogger("megatron.core.datasets.blended_dataset").setLevel(logging.ERROR)
    run, plugin = parse_args(argv)
    try:
        plugin.train(run)  # loop.pretrain, or the plugin's own outer loop (GRPO)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
