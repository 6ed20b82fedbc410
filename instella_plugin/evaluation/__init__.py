"""Downstream evaluation: task definitions as data, log-likelihood and generation scoring, metrics.

``tasks/*.yaml`` define tasks in lm-eval's vocabulary (``doc_to_text``, ``doc_to_choice``,
``doc_to_target``, ``num_fewshot``...); ``suites/*.yaml`` name sets of them (``instella-base``).
``runner.evaluate`` scores tasks with a backend (a Hugging Face directory or a Megatron checkpoint);
``cli`` is ``instella eval``; ``in_loop`` runs tasks on the live model during training.
"""
