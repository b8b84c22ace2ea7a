//! Llama-family decoder models on burn, loaded from the files users have: Hugging Face
//! directories (config.json + safetensors, sharded or not) and llama.cpp GGUF files; their
//! tokenizers and chat templates; and text generation.

pub mod atomic;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod lora;
pub mod moe;
pub mod quant;
pub mod save;
pub mod tokenizer;
pub mod weights;

pub use config::{Family, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use generate::{Sampling, generate, generate_batch};
pub use llama::{ForwardOptions, KvCache, LlamaForCausalLM};
pub use load::{Loaded, load_config_and_tokenizer, load_pretrained, load_weights};
pub use tokenizer::{ChatTemplate, Message, RenderedChat, Tokenizer};
