#!/usr/bin/env python
"""Megatron-Core GPT pre-training with plugins: ``torchrun pretrain_gpt.py --plugin instella ...``.

It sits where Megatron-LM keeps its own and takes Megatron-LM's flag names; without ``--plugin`` it
trains a stock megatron-core GPT. See ``instella_plugin/training/``.
"""
import sys

from instella_plugin.training.entry import main

if __name__ == "__main__":  # the dist-checkpoint writer spawns processes that re-import this file
    sys.exit(main())
