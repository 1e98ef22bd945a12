"""Building blocks shared by the models: norms, rotary embeddings, Llama blocks, conv blocks, quantizer."""
