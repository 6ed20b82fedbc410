"""RoPE for long context: the scaling-law base (``scaling``), theta schedules (``schedule``) and
applying a theta to built megatron models (``apply``)."""
