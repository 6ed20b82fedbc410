"""GRPO (Instella-Math's reinforcement stage) on the live megatron-core policy: rewards, advantages,
the clipped objective with a KL term to a frozen reference, rollouts and the outer loop."""
