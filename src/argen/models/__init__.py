"""Single-device models: the VQ image tokenizer and the Llama generator, with named configs."""
