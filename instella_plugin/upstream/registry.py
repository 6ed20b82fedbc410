"""The upstream host's run-time patches to Megatron-LM's ``megatron.training`` (Primus-style).

They live in the package's one patch registry (``instella_plugin.patching``): each names its target
and the Megatron-LM tag it was written for (``EXPECTED_TAG``, the tag ``patches/apply.sh`` checks),
and, where the wrapper relies on them, the target's parameter names. Nothing is applied on import;
``PluginHost.hooks`` applies phase ``startup`` (``runtime``) and, in the CPU mode, phase ``cpu``
(``cpu``). A drifted upstream fails naming the patch, the target and the tag, and changes nothing.

Every patch is listed, with its reason, in ``patches/README.md``; ``describe()`` prints the same list
from the code (the two are checked against each other by ``tests/test_upstream_patches.py``).
"""
from instella_plugin import patching

EXPECTED_TAG = "core_v0.16.1"

UpstreamDriftError = patching.PatchError

# The parameter names of the Megatron-LM functions the host's wrappers rely on, at ``EXPECTED_TAG``
# (by target; a moved signature fails the patch instead of wrapping a function that changed).
SIGNATURES = {
    "megatron.training.initialize.validate_args": ("args", "defaults"),
    "megatron.training.training.get_megatron_optimizer_config": ("args",),
    "megatron.training.training.training_log": (
        "loss_dict", "total_loss_dict", "learning_rate", "iteration", "loss_scale", "report_memory_flag",
        "skipped_iter", "grad_norm", "params_norm", "num_zeros_in_grad", "max_attention_logit", "pg_collection",
        "is_first_iteration"),
    "megatron.training.training.save_checkpoint": (
        "iteration", "model", "optimizer", "opt_param_scheduler", "num_floating_point_operations_so_far",
        "checkpointing_context", "pipeline_rank", "expert_rank", "tensor_rank", "pipeline_parallel",
        "expert_parallel", "non_persistent_ckpt", "train_data_iterator", "preprocess_common_state_dict_fn",
        "release", "tp_group", "pp_group", "dp_cp_group"),
    "megatron.training.checkpointing.fix_query_key_value_ordering": ("model", "checkpoint_version"),
    "megatron.core.datasets.utils.compile_helpers": (),
    "megatron.training.training.initialize_megatron": (
        "extra_args_provider", "args_defaults", "ignore_unknown_args", "allow_no_cuda", "skip_mpu_initialization",
        "get_embedding_ranks", "get_position_embedding_ranks", "parsed_args", "store"),
    "megatron.training.initialize._warmup_jit_function": (),
    "megatron.training.arguments.get_device_arch_version": (),
    "megatron.legacy.fused_kernels.load": ("args",),
}


class PatchRegistry(patching.PatchRegistry):
    """A registry for Megatron-LM targets: written for ``EXPECTED_TAG``, phase ``startup`` unless given."""

    def __init__(self, owner: str = "upstream host"):
        super().__init__(owner, package="Megatron-LM", version=EXPECTED_TAG, phase="startup",
                         hint="check out that tag, or update instella_plugin/upstream for the new code")

    def register(self, name: str, module: str, attribute: str, **kwargs):
        kwargs.setdefault("signature", SIGNATURES.get(f"{module}.{attribute}"))
        return super().register(name, module, attribute, **kwargs)


# The host's registry (``runtime`` and ``cpu`` register into it).
REGISTRY = PatchRegistry()
register_patch = REGISTRY.register
registered = REGISTRY.registered
applied = REGISTRY.applied
apply = REGISTRY.apply
describe = REGISTRY.describe
