"""Layer 1: parameter-efficient methods as parameter-tree transforms: LoRA, bottleneck
adapters, the trainable/frozen partition of a tree, peft adapter files."""
