//! `temper generate`: load a model, render a prompt, print the completion.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use temper_models::{Message, Sampling, generate, load_pretrained};

use crate::backend::BackendJob;

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// A Hugging Face model directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter directory in PEFT's format (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn and render it with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message for `--chat`.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object: text, token_ids (of the completion), prompt_token_ids.
    #[arg(long)]
    pub json: bool,
}

impl BackendJob for GenerateArgs {
    type Output = Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let sampling = Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_length: None,
        };
        // Before the model loads: a bad flag is found in a moment.
        sampling
            .validate()
            .map_err(|e| anyhow::anyhow!("--{}", e.to_string().trim_start_matches("generate: ").replace('_', "-")))?;
        let mut loaded = load_pretrained::<B>(&self.model, &device, DType::F32)?;
        if let Some(dir) = &self.adapter {
            let (model, _) = temper_peft::load_adapter(loaded.model, dir)?;
            loaded.model = model;
        }
        if loaded.model.score.is_some() {
            anyhow::bail!(
                "{}: a reward model (a `score` head{}) scores sequences and does not generate: use `temper score`",
                self.model.display(),
                if self.adapter.is_some() {
                    ", from the adapter"
                } else {
                    ""
                }
            );
        }
        let tok = &loaded.tokenizer;
        let prompt_ids = if self.chat {
            let mut messages = Vec::new();
            if let Some(system) = &self.system {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", &self.prompt));
            let text = tok.apply_chat_template(&messages, true)?;
            tok.encode(&text, false)?
        } else {
            tok.encode(&self.prompt, true)?
        };
        if prompt_ids.is_empty() {
            anyhow::bail!("the prompt encodes to no tokens");
        }
        let context = loaded.config.max_position_embeddings;
        if prompt_ids.len() + self.max_new_tokens > context {
            eprintln!(
                "note: the model's context is {context} tokens; with a {}-token prompt, generation stops \
                 after at most {} new tokens (--max-new-tokens {})",
                prompt_ids.len(),
                context.saturating_sub(prompt_ids.len()),
                self.max_new_tokens
            );
        }
        let sampling = Sampling {
            max_length: Some(context),
            ..sampling
        };
        let ids = generate(&loaded.model, &prompt_ids, &loaded.eos_token_ids(), &sampling, &device)?;
        let text = tok.decode(&ids, true)?;
        if self.json {
            let out = serde_json::json!({
                "text": text,
                "token_ids": ids,
                "prompt_token_ids": prompt_ids,
            });
            println!("{out}");
        } else {
            println!("{text}");
        }
        Ok(())
    }
}
