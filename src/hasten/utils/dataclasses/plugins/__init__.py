"""One module per engine plugin: gradient accumulation, torch.compile, FSDP, DeepSpeed, Megatron-LM."""
