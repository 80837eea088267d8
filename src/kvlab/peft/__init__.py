"""Parameter-efficient fine-tuning on every attention variant: LoRA, QLoRA, AdaLoRA, prefix
tuning, P-tuning v2 and prompt tuning. :func:`attach` / :func:`load_adapter` are the entry points."""

from kvlab.peft.adalora import AdaLoraConfig, AdaLoraLinear, RankAllocator
from kvlab.peft.adapter import (
                                LORA_FAMILY,
                                METHODS,
                                AdapterSpec,
                                Attached,
                                adapter_parameters,
                                adapter_state_dict,
                                attach,
                                export_peft,
                                load_adapter,
                                merge_prompt_reparameterization,
                                parameter_count,
                                read_adapter_config,
                                save_adapter,
)
from kvlab.peft.lora import LoraConfig, LoraLinear, lora_layers, merge_and_unload
from kvlab.peft.prefix import PrefixAdapter, PromptAdapter, PromptConfig

__all__ = ["AdaLoraConfig", "AdaLoraLinear", "AdapterSpec", "Attached", "LORA_FAMILY", "LoraConfig", "LoraLinear",
           "METHODS", "PrefixAdapter", "PromptAdapter", "PromptConfig", "RankAllocator", "adapter_parameters",
           "adapter_state_dict", "attach", "export_peft", "load_adapter", "lora_layers", "merge_and_unload",
           "merge_prompt_reparameterization", "parameter_count", "read_adapter_config", "save_adapter"]
