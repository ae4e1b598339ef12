"""The input side: image ops, tokenizers (and, with the data issue, the Grain pipeline)."""
