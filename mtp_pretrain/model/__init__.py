from mtp_pretrain.model.config import MODEL_SIZES, ModelConfig, count_parameters, model_config
from mtp_pretrain.model.transformer import MTPTransformer, shifted_tokens

__all__ = ["MODEL_SIZES", "ModelConfig", "MTPTransformer", "count_parameters", "model_config", "shifted_tokens"]
