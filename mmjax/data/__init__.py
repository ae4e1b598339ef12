"""The input side: sources, image ops, templates, tokenisation and masking, padding and
packing, bad-sample accounting, and the Grain pipeline that ties them together."""
