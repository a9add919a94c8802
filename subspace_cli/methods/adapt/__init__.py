"""Adapter methods for `subspace adapt`: each wraps frozen base layers with trainable updates that
export exactly to a PEFT LoRA (or DoRA) adapter on the untouched base."""
