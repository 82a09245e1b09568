"""Interoperability with other ecosystems: Hugging Face transformers (``mtp_pretrain.interop.hf``).
See docs/interop.md."""

from mtp_pretrain.interop.hf import (HFInteropError, export_hf, hydra_overrides_from_hf, load_hf_model,
                                     load_hf_weights, model_config_from_hf)

__all__ = ["HFInteropError", "export_hf", "hydra_overrides_from_hf", "load_hf_model", "load_hf_weights",
           "model_config_from_hf"]
