"""The networks: vision towers, projector, Llama-family LLM and their LLaVA composition."""
from mmjax.models.config import (
    LlavaConfig,
    LLMConfig,
    ProjectorConfig,
    RopeConfig,
    RuntimeConfig,
    VisionConfig,
)
from mmjax.models.llava import Llava, merge_embeddings
from mmjax.models.llm import LLM
from mmjax.models.projector import Projector
from mmjax.models.vision import VisionTower

__all__ = ["LLMConfig", "LlavaConfig", "ProjectorConfig", "RopeConfig",
           "RuntimeConfig", "VisionConfig", "Llava", "LLM", "Projector", "VisionTower",
           "merge_embeddings"]
