//! A job after its checks: the second stage of reading a config, as ripgrep turns its parsed
//! `lowargs` into `hiargs`. [`JobConfig`] is what the YAML file says (and what `config.yaml`
//! saves); [`Job`] is what runs, with the states the checks allow as the only states its types
//! can hold: an objective with its parameters, an adapter or full fine-tuning, a push target
//! with its repository.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use temper_kernels::Products;
use temper_peft::{BaseQuantization, LoraConfig};

use crate::config::{
    AdapterKind, DeviceSpec, DpoSection, GrpoSection, JobConfig, KtoSection, Objective, OrpoSection, Precision,
    RewardSection, SimpoSection, TrainingSection,
};
use crate::error::{Error, Result};

/// A checked job, ready to run. Reading it touches no network: a model or dataset given as a
/// Hub id is fetched by [`Job::resolve_hub_ids`], which the caller runs explicitly.
#[derive(Debug, Clone)]
pub struct Job {
    /// The file's settings, the chosen objective's section filled in with its defaults.
    pub config: JobConfig,
    pub objective: ObjectiveSpec,
    pub adapter: AdapterSpec,
    /// Where the finished run is published (`hub.push: true`).
    pub push: Option<PushTarget>,
}

/// The training objective with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectiveSpec {
    Sft,
    Dpo(DpoSection),
    Simpo(SimpoSection),
    Orpo(OrpoSection),
    Kto(KtoSection),
    Reward(RewardSection),
    Grpo(GrpoSection),
}

impl ObjectiveSpec {
    pub fn kind(&self) -> Objective {
        match self {
            Self::Sft => Objective::Sft,
            Self::Dpo(_) => Objective::Dpo,
            Self::Simpo(_) => Objective::Simpo,
            Self::Orpo(_) => Objective::Orpo,
            Self::Kto(_) => Objective::Kto,
            Self::Reward(_) => Objective::Reward,
            Self::Grpo(_) => Objective::Grpo,
        }
    }

    /// The name in the config (and the model card's tag).
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Trained on chosen/rejected pairs.
    pub fn is_preference(&self) -> bool {
        self.kind().is_preference()
    }

    /// GRPO: completions generated during training.
    pub fn is_online(&self) -> bool {
        matches!(self, Self::Grpo(_))
    }

    /// DPO against a reference model (not `reference_free`).
    /// Whether the objective compares with a reference model: `Some(precompute)` (its
    /// log-probabilities computed once before training, or live at each step), `None` without.
    pub fn reference(&self) -> Option<bool> {
        match self {
            Self::Dpo(d) if !d.reference_free => Some(d.precompute_ref_log_probs),
            Self::Kto(k) => Some(k.precompute_ref_log_probs),
            // GRPO's completions are generated during training: nothing to precompute.
            Self::Grpo(g) if g.beta != 0.0 => Some(false),
            _ => None,
        }
    }

    /// Whether the data are unpaired completions (KTO; pairs are split in two).
    pub fn is_unpaired(&self) -> bool {
        matches!(self, Self::Kto(_))
    }

    /// How the loader batches this objective's data: KTO's unpaired completions, with the KL
    /// pairs its loss needs; `None` for the other objectives.
    pub fn unpaired_batches(&self) -> Option<temper_data::Unpaired> {
        match self {
            Self::Kto(k) => Some(temper_data::Unpaired {
                kl: k.loss_type.uses_kl(),
            }),
            _ => None,
        }
    }

    /// One pass over the data (seed 0, one worker) in this objective's batches of
    /// `batch_size`; callers override the rest.
    pub fn loader_options(&self, batch_size: usize) -> temper_data::LoaderOptions {
        temper_data::LoaderOptions {
            batch_size,
            seed: 0,
            rank: 0,
            world_size: 1,
            epochs: Some(1),
            unpaired: self.unpaired_batches(),
            drop_long_pairs: matches!(self, Self::Reward(_)),
            prompts: matches!(self, Self::Grpo(_)),
        }
    }

    /// The rows of one loader batch: a micro-batch, or for GRPO the prompts of one step's
    /// generation round (its completions, `num_generations` per prompt, make the step's
    /// micro-batches).
    pub fn loader_rows(&self, t: &TrainingSection) -> usize {
        match self {
            Self::Grpo(g) => (t.micro_batch_size * t.gradient_accumulation_steps / g.num_generations).max(1),
            _ => t.micro_batch_size,
        }
    }
}

/// What a run trains.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterSpec {
    /// Every weight; the output is a full checkpoint.
    Full,
    Lora {
        /// PEFT's configuration of a fresh adapter (ignored when `init_from` gives one).
        config: LoraConfig,
        /// Start from this PEFT adapter directory.
        init_from: Option<PathBuf>,
        /// Keep the frozen base block-quantized (QLoRA-style).
        quantize_base: Option<BaseQuantization>,
        /// LoRA+: how many times faster the B matrices learn.
        loraplus_lr_ratio: Option<f64>,
    },
}

impl AdapterSpec {
    pub fn is_lora(&self) -> bool {
        matches!(self, Self::Lora { .. })
    }

    pub fn loraplus_lr_ratio(&self) -> Option<f64> {
        match self {
            Self::Lora { loraplus_lr_ratio, .. } => *loraplus_lr_ratio,
            Self::Full => None,
        }
    }

    /// The adapter a run starts from, when it does not start fresh.
    pub fn init_from(&self) -> Option<&Path> {
        match self {
            Self::Lora { init_from, .. } => init_from.as_deref(),
            Self::Full => None,
        }
    }
}

/// A Hub repository to push the finished run to.
#[derive(Debug, Clone, PartialEq)]
pub struct PushTarget {
    /// `OWNER/NAME`; created if missing.
    pub repo: String,
    pub private: bool,
    /// The branch (default `main`).
    pub revision: Option<String>,
    pub create_pr: bool,
}

impl Job {
    /// Reads a YAML file, applies `key.path=value` overrides, checks every value that can be
    /// checked without the model or the data, and resolves the typed job. Errors name the file
    /// and the key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::new(JobConfig::parse(path, overrides)?)
    }

    /// Checks a parsed config and resolves it. Errors name `config.file` and the key.
    pub fn new(config: JobConfig) -> Result<Self> {
        let file = config.file.clone();
        Self::resolve(config).map_err(|e| e.in_file(&file))
    }

    fn resolve(mut config: JobConfig) -> Result<Self> {
        config.validate()?;
        let t = &mut config.training;
        // The chosen objective's section with its defaults, so the saved config shows what ran.
        let objective = match t.objective {
            Objective::Sft => ObjectiveSpec::Sft,
            Objective::Dpo => ObjectiveSpec::Dpo(t.dpo.get_or_insert_with(Default::default).clone()),
            Objective::Simpo => ObjectiveSpec::Simpo(t.simpo.get_or_insert_with(Default::default).clone()),
            Objective::Orpo => ObjectiveSpec::Orpo(t.orpo.get_or_insert_with(Default::default).clone()),
            Objective::Kto => ObjectiveSpec::Kto(t.kto.get_or_insert_with(Default::default).clone()),
            Objective::Reward => ObjectiveSpec::Reward(t.reward.get_or_insert_with(Default::default).clone()),
            Objective::Grpo => ObjectiveSpec::Grpo(t.grpo.clone().expect("validated: grpo has its section")),
        };
        let a = &config.adapter;
        let adapter = match a.kind {
            AdapterKind::Full => AdapterSpec::Full,
            AdapterKind::Lora => AdapterSpec::Lora {
                config: a.lora_config()?,
                init_from: a.path.clone(),
                quantize_base: a.quantize_base,
                loraplus_lr_ratio: a.loraplus_lr_ratio,
            },
        };
        if let (ObjectiveSpec::Reward(_), AdapterSpec::Lora { config: lora, .. }) = (&objective, &adapter)
            && lora.modules_to_save.contains(&temper_peft::SavedModule::LmHead)
        {
            return Err(Error::config(
                "adapter.modules_to_save",
                "a reward model scores with its `score` head (trained in full and saved with the adapter) and has \
                 no language head: `lm_head` cannot be trained with `objective: reward`",
            ));
        }
        let h = &config.hub;
        let push = match (h.push, &h.repo) {
            (false, _) => None,
            (true, Some(repo)) => Some(PushTarget {
                repo: repo.clone(),
                private: h.private,
                revision: h.revision.clone(),
                create_pr: h.create_pr,
            }),
            (true, None) => {
                return Err(Error::config(
                    "hub.repo",
                    "`hub.push: true` needs the repository, OWNER/NAME",
                ));
            }
        };
        Ok(Self {
            config,
            objective,
            adapter,
            push,
        })
    }

    /// The second, explicit stage that may download: a model or dataset path that is not on
    /// disk but reads `OWNER/NAME` becomes its snapshot folder in the Hugging Face cache.
    pub fn resolve_hub_ids(&mut self) -> Result<()> {
        self.config.resolve_hub_ids()
    }

    /// The dtype the weights are stored and computed in on `device`: `precision`, where `auto`
    /// means bf16 on GPUs. On the CPU it is f32 but for f16 (which CPU backends refuse): bf16
    /// there is [`Job::products`] over f32 tensors.
    pub fn storage_dtype(&self, device: DeviceSpec) -> DType {
        match (self.config.training.precision, device) {
            (Precision::F16, _) => DType::F16,
            (_, DeviceSpec::Cpu) | (Precision::F32, _) => DType::F32,
            (Precision::Auto, _) | (Precision::Bf16, _) => DType::BF16,
        }
    }

    /// The inputs of the base's products on `device`. On the CPU `bf16` means bf16 inputs and f32
    /// sums (a frozen base held in bf16), as PyTorch computes with bf16 weights; `auto` chooses it
    /// where the processor multiplies bf16 natively (AVX512-BF16), where it is about twice as
    /// fast as f32. GPUs compute in their storage dtype.
    pub fn products(&self, device: DeviceSpec) -> Products {
        match (self.config.training.precision, device) {
            (Precision::Bf16, DeviceSpec::Cpu) => Products::Bf16,
            (Precision::Auto, DeviceSpec::Cpu) if temper_kernels::cpu_has_bf16() => Products::Bf16,
            _ => Products::F32,
        }
    }

    /// What [`Job::products`] chose and why, for the first line of a run's log.
    pub fn precision_line(&self, device: DeviceSpec) -> String {
        let precision = self.config.training.precision;
        match (precision, device, self.products(device)) {
            (Precision::Auto, DeviceSpec::Cpu, Products::Bf16) => {
                "precision: bf16 (auto: this CPU multiplies bf16 natively, AVX512-BF16; f32 adapters, optimizer and loss)".into()
            }
            (Precision::Auto, DeviceSpec::Cpu, Products::F32) => {
                "precision: f32 (auto: this CPU has no bf16 instructions, where bf16 would be slower)".into()
            }
            (_, DeviceSpec::Cpu, Products::Bf16) if !temper_kernels::cpu_has_bf16() => {
                "precision: bf16 (this CPU has no bf16 instructions: the bf16 products are computed in f32, slower than `precision: f32`)".into()
            }
            (_, DeviceSpec::Cpu, Products::Bf16) => "precision: bf16 (f32 adapters, optimizer and loss)".into(),
            (_, _, _) => format!("precision: {:?}", self.storage_dtype(device)).to_lowercase(),
        }
    }

    /// The YAML file the job was read from.
    pub fn file(&self) -> &Path {
        &self.config.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job file in a fresh folder (the model path must exist; nothing is read from it).
    fn job(name: &str, yaml: &str, overrides: &[&str]) -> Result<Job> {
        let dir = std::env::temp_dir().join(format!("temper-job-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.gguf"), b"").unwrap();
        let file = dir.join("job.yaml");
        let yaml = format!(
            "model: {{path: {}}}\ndata: {{path: d.jsonl}}\noutput_dir: out\n{yaml}",
            dir.join("model.gguf").display()
        );
        std::fs::write(&file, yaml).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let job = Job::load(&file, &overrides);
        std::fs::remove_dir_all(&dir).unwrap();
        job
    }

    #[test]
    fn the_objective_carries_its_parameters_and_the_config_shows_them() {
        let j = job("dpo", "training: {objective: dpo}", &["training.dpo.beta=0.5"]).unwrap();
        let ObjectiveSpec::Dpo(d) = &j.objective else {
            panic!("{:?}", j.objective)
        };
        assert_eq!(d.beta, 0.5);
        assert!(j.objective.reference().is_some());
        // The saved config shows the section with its defaults.
        assert!(j.config.to_yaml().contains("precompute_ref_log_probs: false"));

        let j = job("simpo", "training: {objective: simpo}", &[]).unwrap();
        assert_eq!(j.objective, ObjectiveSpec::Simpo(SimpoSection::default()));
        assert!(j.objective.reference().is_none());
        let j = job("free", "training: {objective: dpo, dpo: {reference_free: true}}", &[]).unwrap();
        assert!(j.objective.reference().is_none());
    }

    #[test]
    fn the_adapter_push_target_and_dtype_resolve() {
        let j = job(
            "lora",
            "adapter: {r: 4, modules_to_save: [embed_tokens], loraplus_lr_ratio: 16}\nhub: {push: true, repo: me/x}",
            &[],
        )
        .unwrap();
        let AdapterSpec::Lora { config, .. } = &j.adapter else {
            panic!("{:?}", j.adapter)
        };
        assert_eq!(config.r, 4);
        assert_eq!(config.modules_to_save, [temper_peft::SavedModule::EmbedTokens]);
        assert_eq!(j.adapter.loraplus_lr_ratio(), Some(16.0));
        assert_eq!(j.push.as_ref().map(|p| p.repo.as_str()), Some("me/x"));
        assert_eq!(j.storage_dtype(DeviceSpec::Cpu), DType::F32);
        assert_eq!(j.storage_dtype(DeviceSpec::Cuda(0)), DType::BF16);

        let j = job("full", "adapter: {type: full}\ntraining: {precision: f16}", &[]).unwrap();
        assert_eq!((j.adapter.clone(), j.push.clone()), (AdapterSpec::Full, None));
        assert_eq!(j.adapter.loraplus_lr_ratio(), None);
        assert_eq!(j.storage_dtype(DeviceSpec::Wgpu), DType::F16);
    }

    #[test]
    fn refusals_name_the_file_and_key() {
        for (name, overrides, expected) in [
            (
                "push",
                &["hub.push=true"][..],
                "hub.repo: `hub.push: true` needs the repository",
            ),
            (
                "save",
                &["adapter.modules_to_save=[q_proj]"],
                "adapter.modules_to_save: \"q_proj\"",
            ),
            (
                "orpo",
                &["training.orpo={beta: 1}"],
                "training.orpo: applies to `objective: orpo`",
            ),
        ] {
            let e = job(name, "", overrides).unwrap_err().to_string();
            assert!(e.contains("job.yaml") && e.contains(expected), "{name}: {e}");
        }
    }
}
