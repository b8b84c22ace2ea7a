//! LoRA for temper-models, interchangeable with Hugging Face PEFT: configuration and PEFT's
//! matching rules, placing adapters, freezing the base, and the `adapter_config.json` +
//! `adapter_model.safetensors` format.
//!
//! The adapter's forward math ([`temper_models::lora::Lora`]) lives beside the model's
//! `Linear`, because it must run inside the model's forward and `models` sits below `peft`;
//! everything that decides where adapters go and how they are stored lives here.

pub mod adapter;
pub mod config;
pub mod error;
pub mod export;
mod experts;

pub use adapter::{
    BaseQuantization, Injected, QuantReport, count_parameters, inject, keep_base_bf16, load_adapter, merge_adapters,
    quantize_base,
    save_adapter,
};
pub use config::{InitLoraWeights, LoraConfig, SavedModule, TargetModules};
pub use error::{Error, Result};
pub use export::export_gguf;
