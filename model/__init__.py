"""Networks: the BEiT encoder, tokenizers (own dVAE, DALL-E), checkpoints, optimiser groups."""
