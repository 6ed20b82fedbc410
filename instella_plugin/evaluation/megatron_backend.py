"""A Megatron checkpoint as an evaluation backend (placeholder until the generation engine's loader lands)."""


class MegatronBackend:
    def __init__(self, path, tp=1, pp=1, dtype="float32", batch_size=8):
        raise NotImplementedError("--load needs the Megatron generation engine; use --hf with an exported directory")
