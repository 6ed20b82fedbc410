"""Group-normalised advantages (GRPO, Shao et al. 2024, "DeepSeekMath"), as VERL computes them for
Instella-Math: each prompt's n rewards become (r - mean) / (std + 1e-6), std being the unbiased
(Bessel-corrected) sample standard deviation of the group (``torch.std``). A group whose rewards are
all equal gets zero advantages: it carries no signal, only the KL term acts on it."""
import torch

EPSILON = 1e-6


def group_advantages(rewards: torch.Tensor, group_size: int, epsilon: float = EPSILON) -> torch.Tensor:
    """rewards [prompts * group_size], grouped consecutively -> advantages of the same shape (float64)."""
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 rollouts per prompt to normalise within a group, got "
                         f"{group_size}: set --grpo-group-size to 2 or more")
    flat = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if flat.numel() % group_size:
        raise ValueError(f"{flat.numel()} rewards do not split into groups of {group_size}")
    groups = flat.view(-1, group_size)  # [prompts, n]
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)  # unbiased, as torch.std and VERL
    return ((groups - mean) / (std + epsilon)).reshape(-1)
