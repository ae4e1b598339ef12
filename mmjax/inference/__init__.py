"""Generation: the KV-cache engine, sampling, loading a trained or imported model."""
from mmjax.inference.engine import Engine, Request, Result
from mmjax.inference.sampling import Sampling

__all__ = ["Engine", "Request", "Result", "Sampling"]
