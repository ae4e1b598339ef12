"""Building training data for mmjax from public files.

- `convert`: caption and instruction datasets -> ArrayRecord shards (or LLaVA JSONL) with a
  report (`python -m data_pipelines.convert KIND --help`).
- `adapt`: format prompts, multiple-choice layout, multi-turn merging, VQA answer
  normalisation.
- `self_instruct`: instructions generated from captions and boxes by any OpenAI-compatible
  endpoint (`python -m data_pipelines.self_instruct --help`).
- `report`: what a built dataset holds (`python -m data_pipelines.report DIR`).
"""
