"""The HLIP model: hierarchical vision tower, text tower, losses, factory."""

from hlip_fed.model.factory import create_model, create_tokenizer, load_pretrained, model_info
from hlip_fed.model.hlip import HLIP

__all__ = ["HLIP", "create_model", "create_tokenizer", "load_pretrained", "model_info"]
