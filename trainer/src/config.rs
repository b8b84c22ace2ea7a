//! A job's YAML file: raw serde structs (`deny_unknown_fields`, explicit defaults), `--set`
//! overrides, and the checks that run before any model is loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use temper_data::DataConfig;
use temper_peft::{BaseQuantization, InitLoraWeights, LoraConfig, TargetModules};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub adapter: AdapterSection,
    pub data: DataConfig,
    #[serde(default)]
    pub training: TrainingSection,
    pub output_dir: PathBuf,
    /// `cpu`, `cuda`, `cuda:N`, `wgpu` (the command line's `--device` wins).
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(default)]
    pub hub: HubSection,
    /// `temper launch`'s settings (its command-line flags override them).
    #[serde(default)]
    pub launch: LaunchSection,
    /// The YAML file this job was read from, named by errors found later (training, data).
    #[serde(skip)]
    pub file: PathBuf,
}

/// Data-parallel launch: `temper launch` reads these; `temper train` ignores them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSection {
    /// Workers on this machine (one per device); default: one per listed device, or 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nproc_per_node: Option<usize>,
    /// The local devices to use, e.g. `[0, 1, 2, 3]` (CUDA indices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnodes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_rank: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_port: Option<u16>,
    /// Restarts of the whole group from the last checkpoint after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    /// Seconds without a finished step after which a worker counts as hung.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_timeout: Option<u64>,
    /// Which collective engine sums the gradients (default `auto`: from the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<CollectiveEngine>,
}

/// The engine that sums the workers' gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveEngine {
    /// `nccl` for CUDA workers, `burn` otherwise.
    #[default]
    Auto,
    /// NVIDIA's NCCL, on the GPUs (CUDA workers only).
    Nccl,
    /// burn-collective, through host memory (any device).
    Burn,
}

impl CollectiveEngine {
    pub const NAMES: [&str; 3] = ["auto", "nccl", "burn"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The engine for workers on `device`: `Auto` resolved, or why the choice cannot work.
    pub fn resolve(self, device: DeviceSpec) -> std::result::Result<Self, String> {
        match (self, device) {
            (Self::Auto, DeviceSpec::Cuda(_)) => Ok(Self::Nccl),
            (Self::Auto, _) => Ok(Self::Burn),
            (Self::Nccl, DeviceSpec::Cuda(_)) | (Self::Burn, _) => Ok(self),
            (Self::Nccl, other) => Err(format!(
                "the nccl engine sums gradients on CUDA devices, and the workers' device is {other}; use `burn` or `auto`"
            )),
        }
    }
}

impl std::str::FromStr for CollectiveEngine {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| [Self::Auto, Self::Nccl, Self::Burn][i])
            .ok_or_else(|| {
                format!(
                    "unknown collective engine {s:?}; expected one of {}",
                    Self::NAMES.join(", ")
                )
            })
    }
}

/// Publishing the result: after a completed run, the output directory (adapter, model card,
/// config, metrics; not the checkpoints) is pushed to a Hub repository.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    #[serde(default)]
    pub push: bool,
    /// `OWNER/NAME`; created if missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Create the repository private.
    #[serde(default)]
    pub private: bool,
    /// The branch to commit to (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Open a pull request instead of committing to the branch.
    #[serde(default)]
    pub create_pr: bool,
}

/// A device named on the command line or in a config: `cpu`, `cuda`, `cuda:N`, `wgpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Wgpu,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(format!("unknown device {s:?} (expected cpu, cuda, cuda:N or wgpu)")),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Wgpu => write!(f, "wgpu"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory, a GGUF file, or a Hub id (`OWNER/NAME`, found in the
    /// Hugging Face cache or downloaded into it).
    pub path: PathBuf,
    /// With a Hub id: the branch, tag or commit (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The base model's Hub id, for the model card and `adapter_config.json`, when `path` is
    /// a local directory or file (with a Hub id `path`, that id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// The Hub id `path` was resolved from (the local snapshot is then in `path`).
    #[serde(skip)]
    pub hub_id: Option<String>,
    /// Random weights of the shape `config.json` describes (for benchmarks: speed does not
    /// depend on the values). The directory needs `config.json` and a tokenizer only.
    #[serde(default)]
    pub random_init: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    #[default]
    Lora,
    /// Every weight trained (no adapter); the output is a full checkpoint.
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetSpec {
    /// `all-linear`, or a regular expression matched against whole module names.
    One(String),
    /// Module names or name suffixes.
    List(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitSpec {
    Bool(bool),
    Named(String),
}

/// LoRA settings, with PEFT's `LoraConfig` key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    #[serde(default, rename = "type")]
    pub kind: AdapterKind,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: TargetSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<TargetSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
    /// `true` (Kaiming A, zero B), `gaussian`, `pissa`, or `false` (both random).
    #[serde(default = "default_init")]
    pub init_lora_weights: InitSpec,
    /// LoRA+: the B matrices learn this many times faster than the A matrices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
    /// Keep the frozen base block-quantized (QLoRA-style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize_base: Option<BaseQuantization>,
    /// Start from this PEFT adapter directory instead of a fresh adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> TargetSpec {
    TargetSpec::One("all-linear".into())
}
fn default_init() -> InitSpec {
    InitSpec::Bool(true)
}

impl Default for AdapterSection {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl AdapterSection {
    /// The PEFT configuration this section describes.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let targets = |spec: &TargetSpec| match spec {
            TargetSpec::One(s) if s == "all-linear" => TargetModules::AllLinear,
            TargetSpec::One(s) => TargetModules::Regex(s.clone()),
            TargetSpec::List(l) => TargetModules::Names(l.clone()),
        };
        let init = match &self.init_lora_weights {
            InitSpec::Bool(true) => InitLoraWeights::KaimingZero,
            InitSpec::Bool(false) => InitLoraWeights::Random,
            InitSpec::Named(n) if n == "gaussian" => InitLoraWeights::Gaussian,
            InitSpec::Named(n) if n == "pissa" => InitLoraWeights::Pissa,
            InitSpec::Named(n) => {
                return Err(Error::config(
                    "adapter.init_lora_weights",
                    format!("{n:?} is not one of true, false, gaussian, pissa"),
                ));
            }
        };
        Ok(LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: targets(&self.target_modules),
            exclude_modules: self.exclude_modules.as_ref().map(targets),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: None,
            rank_pattern: self.rank_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            alpha_pattern: self.alpha_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            modules_to_save: self
                .modules_to_save
                .iter()
                .map(|m| {
                    m.parse()
                        .map_err(|message| Error::config("adapter.modules_to_save", message))
                })
                .collect::<Result<_>>()?,
            init_lora_weights: init,
            base_model_name_or_path: None,
            revision: None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    #[default]
    Sft,
    /// Preference training on chosen/rejected pairs against a reference (`training.dpo`).
    Dpo,
    /// Reference-free, length-normalised preference training (`training.simpo`).
    Simpo,
    /// Odds-ratio preference optimisation: NLL plus an odds-ratio term, no reference
    /// (`training.orpo`).
    Orpo,
    /// Kahneman-Tversky optimisation on unpaired completions labelled desirable or not, against
    /// a reference (`training.kto`).
    Kto,
    /// A reward model: a scalar score per sequence (a `score` head), trained on chosen/rejected
    /// pairs with the Bradley-Terry loss (`training.reward`).
    Reward,
    /// Group relative policy optimisation: completions generated during training, scored by
    /// reward functions, reinforced relative to their group (`training.grpo`).
    Grpo,
}

impl Objective {
    /// Trained on chosen/rejected pairs (or KTO's labelled completions).
    pub fn is_preference(self) -> bool {
        !matches!(self, Objective::Sft | Objective::Grpo)
    }

    /// The name in the config (and the model card's tag).
    pub fn name(self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Dpo => "dpo",
            Objective::Simpo => "simpo",
            Objective::Orpo => "orpo",
            Objective::Kto => "kto",
            Objective::Reward => "reward",
            Objective::Grpo => "grpo",
        }
    }
}

/// DPO's options, with TRL's `DPOConfig` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// One loss or a list of them (`[sigmoid, sft]`), combined with `loss_weights`.
    #[serde(default = "default_loss_type", deserialize_with = "one_or_many")]
    pub loss_type: Vec<temper_trl::DpoLossType>,
    /// One weight per `loss_type` (default 1 each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_weights: Option<Vec<f64>>,
    /// RPO's weight of the chosen completions' NLL (older TRL's `rpo_alpha`): the same as adding
    /// `sft` to `loss_type` with this weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_alpha: Option<f64>,
    #[serde(default)]
    pub label_smoothing: f64,
    /// No reference model: its log-probabilities are taken as 0.
    #[serde(default)]
    pub reference_free: bool,
    /// Compute the reference's log-probabilities in one pass before training (saved with the
    /// checkpoints), so each step runs only the policy.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
}

fn default_beta() -> f64 {
    0.1
}

fn default_loss_type() -> Vec<temper_trl::DpoLossType> {
    vec![temper_trl::DpoLossType::Sigmoid]
}

/// `loss_type: sigmoid` or `loss_type: [sigmoid, sft]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<temper_trl::DpoLossType>, D::Error> {
    use serde::de::Error as _;
    let value = Value::deserialize(d)?;
    if value.is_sequence() {
        serde_yaml::from_value(value).map_err(D::Error::custom)
    } else {
        serde_yaml::from_value(value)
            .map(|one| vec![one])
            .map_err(D::Error::custom)
    }
}

impl Default for DpoSection {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl DpoSection {
    /// The objective as `trl` takes it: each loss with its weight, RPO's term last.
    pub fn params(&self) -> temper_trl::DpoParams {
        let weights = self
            .loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.loss_type.len()]);
        let mut losses: Vec<_> = self.loss_type.iter().copied().zip(weights).collect();
        if let Some(alpha) = self.rpo_alpha {
            losses.push((temper_trl::DpoLossType::Sft, alpha));
        }
        temper_trl::DpoParams {
            beta: self.beta,
            losses,
            label_smoothing: self.label_smoothing,
        }
    }
}

/// SimPO's options (TRL: `CPOConfig` with `loss_type: simpo`). The defaults are the SimPO
/// paper's (β 2, γ 0.5, no NLL term); TRL's `CPOConfig` defaults to β 0.1 and `cpo_alpha` 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpoSection {
    #[serde(default = "default_simpo_beta")]
    pub beta: f64,
    /// The target reward margin γ (TRL's `simpo_gamma`).
    #[serde(default = "default_simpo_gamma", alias = "simpo_gamma")]
    pub gamma: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Weight of the chosen completions' NLL (CPO-SimPO when > 0).
    #[serde(default)]
    pub cpo_alpha: f64,
}

fn default_simpo_beta() -> f64 {
    2.0
}
fn default_simpo_gamma() -> f64 {
    0.5
}

impl Default for SimpoSection {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl SimpoSection {
    pub fn params(&self) -> temper_trl::SimpoParams {
        temper_trl::SimpoParams {
            beta: self.beta,
            gamma: self.gamma,
            label_smoothing: self.label_smoothing,
            cpo_alpha: self.cpo_alpha,
        }
    }
}

/// ORPO's options (TRL: `ORPOConfig`): β weighs the odds-ratio term against the NLL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrpoSection {
    #[serde(default = "default_beta")]
    pub beta: f64,
}

/// KTO's options, with TRL's `KTOConfig` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoSection {
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Weight of the desirable rows' losses.
    #[serde(default = "one")]
    pub desirable_weight: f64,
    /// Weight of the undesirable rows' losses.
    #[serde(default = "one")]
    pub undesirable_weight: f64,
    #[serde(default)]
    pub loss_type: temper_trl::KtoLossType,
    /// Compute the reference's log-probabilities once, before training (for every micro-batch
    /// the run will see: KTO's KL pairs are made within them), and drop the reference.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
}

fn one() -> f64 {
    1.0
}

/// GRPO's options, with TRL's `GRPOConfig` names and defaults. The generation round of a step
/// is `micro_batch_size × gradient_accumulation_steps` completions per worker (TRL's
/// `steps_per_generation` equal to the accumulation), whole groups of `num_generations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// Completions per prompt (a group); at least 2.
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    #[serde(default = "default_completion_length")]
    pub max_completion_length: usize,
    #[serde(default = "one")]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    /// 0: no top-k filtering.
    #[serde(default)]
    pub top_k: usize,
    /// Weight of the KL term against the reference (the base, adapter off); 0 skips the
    /// reference pass.
    #[serde(default)]
    pub beta: f64,
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// The upper clip (DAPO's clip-higher); `epsilon` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// Caps the unclipped ratio too (two-sided clipping); TRL recommends > 1 + epsilon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Updates per generation round (μ): the round's completions serve this many steps.
    #[serde(default = "default_one")]
    pub num_iterations: usize,
    #[serde(default)]
    pub loss_type: temper_trl::GrpoLossType,
    #[serde(default)]
    pub scale_rewards: temper_trl::ScaleRewards,
    #[serde(default)]
    pub importance_sampling_level: temper_trl::ImportanceSampling,
    /// Truncated completions (no EOS within `max_completion_length`) count for nothing.
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// Weigh the KL term by the importance ratio, as TRL does by default.
    #[serde(default = "yes")]
    pub use_bias_correction_kl: bool,
    /// One weight per reward function (all 1 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_weights: Option<Vec<f64>>,
    /// The reward functions; their weighted sum is a completion's reward.
    pub rewards: Vec<RewardFunction>,
    /// Write each logged step's completions with their rewards to `completions.jsonl`.
    #[serde(default = "yes")]
    pub log_completions: bool,
}

fn default_generations() -> usize {
    8
}

fn default_completion_length() -> usize {
    512
}

fn default_epsilon() -> f64 {
    0.2
}

fn yes() -> bool {
    true
}

impl GrpoSection {
    pub fn params(&self) -> temper_trl::GrpoParams {
        temper_trl::GrpoParams {
            loss_type: self.loss_type,
            beta: self.beta,
            epsilon_low: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            delta: self.delta,
            importance_sampling: self.importance_sampling_level,
            max_completion_length: self.max_completion_length,
            bias_correction_kl: self.use_bias_correction_kl,
        }
    }
}

/// A GRPO reward function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardFunction {
    /// 1 when the completion's final answer (`#### N`, `\boxed{}`, or the last number) equals
    /// the row's `column`, else 0.
    Accuracy {
        #[serde(default = "default_answer_column")]
        column: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// 1 when the regular expression matches in the completion, else 0.
    Format {
        pattern: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Minus `penalty` per completion token beyond `target`.
    Length {
        target: usize,
        #[serde(default = "default_length_penalty")]
        penalty: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// An external program, started once and kept alive: one JSON line per completion on its
    /// standard input (`prompt`, `completion`, the row's other columns), one number per line on
    /// its standard output.
    Command {
        command: Vec<String>,
        /// Seconds to wait for each answer.
        #[serde(default = "default_command_timeout")]
        timeout_s: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A reward model's score of prompt + completion: a `*ForSequenceClassification` directory,
    /// or its base with a reward adapter (`objective: reward`). It must share the policy's
    /// tokenizer (it reads the policy's token ids).
    Model {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        adapter: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

fn default_answer_column() -> String {
    "answer".into()
}

fn default_length_penalty() -> f64 {
    0.01
}

fn default_command_timeout() -> u64 {
    60
}

impl RewardFunction {
    /// Its name in the metrics (`rewards/<name>/mean`): the one given, else its type.
    pub fn name(&self) -> &str {
        let (given, kind) = match self {
            Self::Accuracy { name, .. } => (name, "accuracy"),
            Self::Format { name, .. } => (name, "format"),
            Self::Length { name, .. } => (name, "length"),
            Self::Command { name, .. } => (name, "command"),
            Self::Model { name, .. } => (name, "model"),
        };
        given.as_deref().unwrap_or(kind)
    }
}

/// Reward modelling's options, with TRL's `RewardConfig` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// Adds `coefficient · mean((r_chosen + r_rejected)²)` to the loss, keeping scores near 0
    /// (TRL recommends 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub center_rewards_coefficient: Option<f64>,
}

impl RewardSection {
    pub fn params(&self) -> temper_trl::RewardParams {
        temper_trl::RewardParams {
            center_rewards_coefficient: self.center_rewards_coefficient,
        }
    }
}

impl Default for KtoSection {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl KtoSection {
    pub fn params(&self) -> temper_trl::KtoParams {
        temper_trl::KtoParams {
            beta: self.beta,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
            loss_type: self.loss_type,
        }
    }
}

impl Default for OrpoSection {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 on GPUs, and on CPUs that multiply bf16 natively (AVX512-BF16); f32 on other CPUs,
    /// where bf16 products are slower than f32 ([`crate::Job::products`]).
    #[default]
    Auto,
    Bf16,
    /// With dynamic loss scaling (optim.rs, `LossScaler`), as PyTorch's `GradScaler` does.
    F16,
    F32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    #[serde(default)]
    pub objective: Objective,
    /// The options of the preference objectives; only the chosen objective's section may be
    /// given (the resolved config shows it with its defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simpo: Option<SimpoSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orpo: Option<OrpoSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kto: Option<KtoSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<GrpoSection>,
    /// Passes over the data; ignored when `max_steps` is set.
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    #[serde(default = "default_micro_batch")]
    pub micro_batch_size: usize,
    #[serde(default = "default_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "default_lr", alias = "lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub lr_scheduler: Schedule,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Warmup as a fraction of the total steps (used when `warmup_steps` is 0).
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Global-norm gradient clipping; 0 turns it off.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Trade compute for memory: activation checkpointing per decoder block, as transformers'
    /// `gradient_checkpointing_enable()` does (blocks.rs): only each block's input is kept,
    /// and each block runs again during the backward pass. SmolLM2-135M, 4 x 256 tokens:
    /// 3.8 -> 1.3 GiB peak, the same steps.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default = "default_one_u64")]
    pub logging_steps: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<u64>,
    /// At each evaluation, answers to the first evaluation rows generated (greedy) and scored
    /// as `temper eval` scores them, logged as `eval_<scorer>` with the samples as TensorBoard
    /// text and in `eval_generations.jsonl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_generation: Option<EvalGeneration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
}

/// The largest micro-batch and accumulation count a job may ask for.
const MAX_SIZE: usize = 1 << 16;

fn default_epochs() -> u64 {
    1
}
fn default_micro_batch() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_one_u64() -> u64 {
    1
}
fn default_lr() -> f64 {
    2e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}

/// `training.eval_generation`: scorers run on generated answers during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalGeneration {
    /// The first evaluation rows answered at each evaluation.
    #[serde(default = "default_eval_generation_rows")]
    pub rows: usize,
    #[serde(default = "default_eval_generation_tokens")]
    pub max_new_tokens: usize,
    pub scorers: Vec<crate::eval::Scorer>,
}

fn default_eval_generation_rows() -> usize {
    8
}
fn default_eval_generation_tokens() -> usize {
    128
}

impl Default for TrainingSection {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl JobConfig {
    /// The first stage of reading a job: the YAML file with `key.path=value` overrides applied,
    /// unchecked (`Job::load` checks and resolves it).
    pub fn parse(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut config: Self = read_yaml(path, overrides)?;
        config.file = path.to_path_buf();
        config.expand_home();
        Ok(config)
    }

    /// The second stage of loading, which the caller runs explicitly because it may download:
    /// a model or dataset path that is not on disk but reads `OWNER/NAME` is a Hub id, and
    /// becomes the snapshot folder in the Hugging Face cache (downloaded there unless it is
    /// already, or `HF_HUB_OFFLINE` is set). Errors name the job's file and key.
    pub fn resolve_hub_ids(&mut self) -> Result<()> {
        let file = self.file.clone();
        self.resolve_hub_ids_in_place().map_err(|e| e.in_file(&file))
    }

    fn resolve_hub_ids_in_place(&mut self) -> Result<()> {
        let model = self.model.path.display().to_string();
        if is_hub_id(&model) {
            let dir = temper_hub::resolve(temper_hub::RepoType::Model, &model, self.model.revision.as_deref())
                .map_err(|e| {
                    Error::config(
                        "model.path",
                        format!("{model}: not a local path, and from the Hub: {e}"),
                    )
                })?;
            self.model.path = dir;
            self.model.hub_id = Some(model);
        }
        let resolve_data = |key: String, p: &mut String| -> Result<()> {
            if is_hub_id(p) {
                let dir = temper_hub::resolve(temper_hub::RepoType::Dataset, p, None)
                    .map_err(|e| Error::config(&key, format!("{p}: not a local path, and from the Hub: {e}")))?;
                *p = dir.display().to_string();
            }
            Ok(())
        };
        let data = &mut self.data;
        if let Some(p) = &mut data.path {
            resolve_data("data.path".into(), p)?;
        }
        for (i, s) in data.sources.iter_mut().enumerate() {
            resolve_data(format!("data.sources[{i}].path"), &mut s.path)?;
        }
        if let Some(eval) = &mut data.eval {
            if let Some(p) = &mut eval.path {
                resolve_data("data.eval.path".into(), p)?;
            }
            for (i, s) in eval.sources.iter_mut().enumerate() {
                resolve_data(format!("data.eval.sources[{i}].path"), &mut s.path)?;
            }
        }
        Ok(())
    }

    /// The base model's Hub id, when known.
    pub fn base_model_id(&self) -> Option<&str> {
        self.model.base_model.as_deref().or(self.model.hub_id.as_deref())
    }

    /// `~/` at the start of a path means the home directory, as in a shell.
    fn expand_home(&mut self) {
        let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
            return;
        };
        let expand = |p: &str| match p.strip_prefix("~/") {
            Some(rest) => home.join(rest).display().to_string(),
            None => p.to_string(),
        };
        self.model.path = PathBuf::from(expand(&self.model.path.display().to_string()));
        self.output_dir = PathBuf::from(expand(&self.output_dir.display().to_string()));
        if let Some(p) = &self.adapter.path {
            self.adapter.path = Some(PathBuf::from(expand(&p.display().to_string())));
        }
        let data = &mut self.data;
        data.path = data.path.as_deref().map(expand);
        data.sources.iter_mut().for_each(|s| s.path = expand(&s.path));
        if let Some(eval) = &mut data.eval {
            eval.path = eval.path.as_deref().map(expand);
            eval.sources.iter_mut().for_each(|s| s.path = expand(&s.path));
        }
        for r in self.training.grpo.iter_mut().flat_map(|g| g.rewards.iter_mut()) {
            if let RewardFunction::Model { path, adapter, .. } = r {
                *path = PathBuf::from(expand(&path.display().to_string()));
                if let Some(a) = adapter {
                    *a = PathBuf::from(expand(&a.display().to_string()));
                }
            }
        }
    }

    /// Range and consistency checks; errors carry the key path (`Job::new` runs them).
    pub(crate) fn validate(&self) -> Result<()> {
        let t = &self.training;
        let a = &self.adapter;
        let check = |ok: bool, key: &str, message: String| if ok { Ok(()) } else { Err(Error::config(key, message)) };
        let positive = |v: f64, key: &str| check(v > 0.0, key, format!("must be > 0, got {v}"));
        if let Some(id) = &self.model.base_model {
            check(
                temper_hub::is_repo_id(id),
                "model.base_model",
                format!("`{id}` is not a Hub id (OWNER/NAME)"),
            )?;
        }
        if let (true, Some(repo)) = (self.hub.push, &self.hub.repo) {
            check(
                temper_hub::is_repo_id(repo),
                "hub.repo",
                format!("`{repo}` is not a Hub id (OWNER/NAME)"),
            )?;
        }
        // A Hub id is checked when `resolve_hub_ids` fetches it.
        let model_path = self.model.path.display().to_string();
        check(
            self.model.path.exists() || is_hub_id(&model_path),
            "model.path",
            format!("{model_path} does not exist"),
        )?;
        check(
            self.model.revision.is_none() || is_hub_id(&model_path),
            "model.revision",
            "applies to a Hub id in `model.path`; this path is local".into(),
        )?;
        if a.kind == AdapterKind::Lora {
            check(a.r > 0, "adapter.r", format!("must be > 0, got {}", a.r))?;
            positive(a.lora_alpha, "adapter.lora_alpha")?;
            check(
                (0.0..1.0).contains(&a.lora_dropout),
                "adapter.lora_dropout",
                format!("must be in [0, 1), got {}", a.lora_dropout),
            )?;
            if let Some(ratio) = a.loraplus_lr_ratio {
                positive(ratio, "adapter.loraplus_lr_ratio")?;
            }
            if let Some(p) = &a.path {
                check(
                    p.join("adapter_config.json").exists(),
                    "adapter.path",
                    format!("{} holds no adapter_config.json", p.display()),
                )?;
            }
            a.lora_config()?.validate(Path::new("")).map_err(|e| match e {
                temper_peft::Error::Config { key, message, .. } => Error::config(&format!("adapter.{key}"), message),
                other => Error::Peft(other),
            })?;
        } else {
            check(
                a.quantize_base.is_none(),
                "adapter.quantize_base",
                "a quantized base needs LoRA (full fine-tuning trains the base)".into(),
            )?;
        }
        positive(t.learning_rate, "training.learning_rate")?;
        check(
            !self.output_dir.as_os_str().is_empty(),
            "output_dir",
            "is empty (a directory for the adapter, checkpoints and logs)".into(),
        )?;
        // Sizes past these are typos, not jobs: caught here rather than by the allocator.
        check(
            (1..=MAX_SIZE).contains(&t.micro_batch_size),
            "training.micro_batch_size",
            format!("must be in 1..={MAX_SIZE}, got {}", t.micro_batch_size),
        )?;
        check(
            (1..=MAX_SIZE).contains(&t.gradient_accumulation_steps),
            "training.gradient_accumulation_steps",
            format!("must be in 1..={MAX_SIZE}, got {}", t.gradient_accumulation_steps),
        )?;
        check(t.max_steps != Some(0), "training.max_steps", "must be > 0".into())?;
        check(t.epochs > 0, "training.epochs", "must be > 0".into())?;
        check(
            t.weight_decay >= 0.0,
            "training.weight_decay",
            format!("must be >= 0, got {}", t.weight_decay),
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta1),
            "training.adam_beta1",
            "must be in [0, 1)".into(),
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta2),
            "training.adam_beta2",
            "must be in [0, 1)".into(),
        )?;
        check(t.adam_epsilon > 0.0, "training.adam_epsilon", "must be > 0".into())?;
        check(t.max_grad_norm >= 0.0, "training.max_grad_norm", "must be >= 0".into())?;
        check(
            (0.0..1.0).contains(&t.warmup_ratio),
            "training.warmup_ratio",
            "must be in [0, 1)".into(),
        )?;
        check(t.logging_steps > 0, "training.logging_steps", "must be > 0".into())?;
        check(t.eval_steps != Some(0), "training.eval_steps", "must be > 0".into())?;
        if let Some(g) = &t.eval_generation {
            let key = "training.eval_generation";
            check(
                t.eval_steps.is_some() && self.data.eval.is_some(),
                key,
                "runs at each evaluation: set `training.eval_steps` and `data.eval`".into(),
            )?;
            check(g.rows > 0, &format!("{key}.rows"), "must be > 0".into())?;
            check(g.max_new_tokens > 0, &format!("{key}.max_new_tokens"), "must be > 0".into())?;
            check(!g.scorers.is_empty(), &format!("{key}.scorers"), "give at least one scorer".into())?;
            if let Some(i) = g.scorers.iter().position(|s| !s.generates()) {
                return Err(Error::config(
                    &format!("{key}.scorers[{i}]"),
                    "`choice` generates nothing: score multiple choice with `temper eval`",
                ));
            }
            crate::eval::config::check_scorers(&g.scorers, &format!("{key}.scorers"))?;
        }
        check(t.save_steps != Some(0), "training.save_steps", "must be > 0".into())?;
        for (key, given, owner) in [
            ("training.dpo", t.dpo.is_some(), Objective::Dpo),
            ("training.simpo", t.simpo.is_some(), Objective::Simpo),
            ("training.orpo", t.orpo.is_some(), Objective::Orpo),
            ("training.kto", t.kto.is_some(), Objective::Kto),
            ("training.reward", t.reward.is_some(), Objective::Reward),
            ("training.grpo", t.grpo.is_some(), Objective::Grpo),
        ] {
            check(
                !given || t.objective == owner,
                key,
                format!(
                    "applies to `objective: {}`, but the objective is `{}`",
                    owner.name(),
                    t.objective.name()
                ),
            )?;
        }
        if let Some(d) = &t.dpo {
            positive(d.beta, "training.dpo.beta")?;
            check(
                !d.loss_type.is_empty(),
                "training.dpo.loss_type",
                "is an empty list".into(),
            )?;
            if let Some(w) = &d.loss_weights {
                check(
                    w.len() == d.loss_type.len(),
                    "training.dpo.loss_weights",
                    format!("has {} weights for {} loss types", w.len(), d.loss_type.len()),
                )?;
            }
            let robust = d.loss_type.contains(&temper_trl::DpoLossType::Robust);
            check(
                (0.0..if robust { 0.5 } else { 1.0 }).contains(&d.label_smoothing),
                "training.dpo.label_smoothing",
                format!(
                    "must be in [0, {}), got {}",
                    if robust { "0.5 for the robust loss" } else { "1" },
                    d.label_smoothing
                ),
            )?;
            check(
                !(d.precompute_ref_log_probs && d.reference_free),
                "training.dpo.precompute_ref_log_probs",
                "there is no reference to precompute with `reference_free: true`".into(),
            )?;
        }
        if let Some(s) = &t.simpo {
            positive(s.beta, "training.simpo.beta")?;
            check(
                (0.0..0.5).contains(&s.label_smoothing),
                "training.simpo.label_smoothing",
                format!("must be in [0, 0.5), got {}", s.label_smoothing),
            )?;
        }
        if let Some(o) = &t.orpo {
            positive(o.beta, "training.orpo.beta")?;
        }
        if let Some(c) = t.reward.as_ref().and_then(|r| r.center_rewards_coefficient) {
            check(
                c >= 0.0 && c.is_finite(),
                "training.reward.center_rewards_coefficient",
                format!("must be >= 0, got {c}"),
            )?;
        }
        if t.objective == Objective::Kto {
            let k = t.kto.clone().unwrap_or_default();
            positive(k.beta, "training.kto.beta")?;
            positive(k.desirable_weight, "training.kto.desirable_weight")?;
            positive(k.undesirable_weight, "training.kto.undesirable_weight")?;
            check(
                !k.loss_type.uses_kl() || t.micro_batch_size > 1,
                "training.micro_batch_size",
                "KTO's KL estimate pairs each row's prompt with another row's completion of the same micro-batch, \
                 so it needs at least 2 rows (as TRL's KTOTrainer); or use `kto.loss_type: apo_zero_unpaired`"
                    .into(),
            )?;
        }
        if t.objective == Objective::Grpo {
            self.validate_grpo()?;
        }
        check(
            t.save_total_limit != Some(0),
            "training.save_total_limit",
            "must be > 0".into(),
        )?;
        self.data.validate("data").map_err(|e| match e {
            temper_data::Error::Config { key, message } => Error::config(&key, message),
            other => Error::Data(other),
        })?;
        Ok(())
    }

    fn validate_grpo(&self) -> Result<()> {
        let t = &self.training;
        let Some(g) = &t.grpo else {
            return Err(Error::config(
                "training.grpo",
                "`objective: grpo` needs its section with at least `rewards:` (e.g. `- type: accuracy`)",
            ));
        };
        let check = |ok: bool, key: &str, message: String| if ok { Ok(()) } else { Err(Error::config(key, message)) };
        check(
            g.num_generations >= 2,
            "training.grpo.num_generations",
            format!(
                "must be >= 2, got {}: advantages are relative to the other completions of the same prompt",
                g.num_generations
            ),
        )?;
        let round = t.micro_batch_size * t.gradient_accumulation_steps;
        check(
            round.is_multiple_of(g.num_generations),
            "training.grpo.num_generations",
            format!(
                "a step generates micro_batch_size x gradient_accumulation_steps = {round} completions per worker, \
                 which must be whole groups of {}",
                g.num_generations
            ),
        )?;
        check(
            (1..=1 << 16).contains(&g.max_completion_length),
            "training.grpo.max_completion_length",
            format!("must be in 1..=65536, got {}", g.max_completion_length),
        )?;
        check(
            g.temperature > 0.0 && g.temperature.is_finite(),
            "training.grpo.temperature",
            format!("must be > 0 (GRPO samples), got {}", g.temperature),
        )?;
        check(
            g.top_p > 0.0 && g.top_p <= 1.0,
            "training.grpo.top_p",
            format!("must be in (0, 1], got {}", g.top_p),
        )?;
        check(
            g.beta >= 0.0 && g.beta.is_finite(),
            "training.grpo.beta",
            format!("must be >= 0, got {}", g.beta),
        )?;
        check(
            g.epsilon >= 0.0 && g.epsilon < 1.0,
            "training.grpo.epsilon",
            format!("must be in [0, 1), got {}", g.epsilon),
        )?;
        if let Some(e) = g.epsilon_high {
            check(
                e >= 0.0 && e.is_finite(),
                "training.grpo.epsilon_high",
                format!("must be >= 0, got {e}"),
            )?;
        }
        if let Some(d) = g.delta {
            check(
                d > 1.0 && d.is_finite(),
                "training.grpo.delta",
                format!("must be > 1 (it caps the ratio from above), got {d}"),
            )?;
        }
        check(
            g.num_iterations >= 1,
            "training.grpo.num_iterations",
            "must be >= 1".into(),
        )?;
        check(
            !g.rewards.is_empty(),
            "training.grpo.rewards",
            "is empty: GRPO needs at least one reward function".into(),
        )?;
        if let Some(w) = &g.reward_weights {
            check(
                w.len() == g.rewards.len(),
                "training.grpo.reward_weights",
                format!("has {} weights for {} reward functions", w.len(), g.rewards.len()),
            )?;
            check(
                w.iter().all(|w| w.is_finite()),
                "training.grpo.reward_weights",
                "must be numbers".into(),
            )?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in g.rewards.iter().enumerate() {
            let key = |field: &str| format!("training.grpo.rewards[{i}].{field}");
            check(
                names.insert(r.name().to_string()),
                &key("name"),
                format!("`{}` names two reward functions: give each its own `name`", r.name()),
            )?;
            match r {
                RewardFunction::Format { pattern, .. } => {
                    if let Err(e) = regex::Regex::new(pattern) {
                        return Err(Error::config(&key("pattern"), format!("is not a regular expression: {e}")));
                    }
                }
                RewardFunction::Length { penalty, .. } => check(
                    penalty.is_finite() && *penalty >= 0.0,
                    &key("penalty"),
                    format!("must be >= 0, got {penalty}"),
                )?,
                RewardFunction::Command { command, timeout_s, .. } => {
                    check(
                        command.first().is_some_and(|c| !c.is_empty()),
                        &key("command"),
                        "is empty: the program and its arguments, e.g. [python3, reward.py]".into(),
                    )?;
                    check(*timeout_s > 0, &key("timeout_s"), "must be > 0".into())?;
                }
                RewardFunction::Accuracy { column, .. } => {
                    check(!column.is_empty(), &key("column"), "is empty".into())?;
                }
                RewardFunction::Model { path, .. } => {
                    check(!path.as_os_str().is_empty(), &key("path"), "is empty".into())?;
                }
            }
        }
        check(
            self.data.eval.is_none(),
            "data.eval",
            "GRPO runs do not evaluate on held-out data during training yet: drop `data.eval` and score the \
             adapter afterwards with `temper eval` (configs/eval-arith.yaml)"
                .into(),
        )?;
        Ok(())
    }

    /// The config as YAML, as saved beside the outputs (a model from the Hub by its id).
    pub fn to_yaml(&self) -> String {
        let mut shown = self.clone();
        if let Some(id) = &self.model.hub_id {
            shown.model.path = PathBuf::from(id);
        }
        serde_yaml::to_string(&shown).expect("a config serializes")
    }
}

/// A path that is not on disk but reads `OWNER/NAME` (and not as a mistyped local path).
fn is_hub_id(p: &str) -> bool {
    !Path::new(p).exists() && temper_hub::is_repo_id(p) && !looks_local(p)
}

/// A missing path that reads `OWNER/NAME` but is surely a mistyped local path: a file name
/// extension of the files Temper reads, or a first folder that exists here (`data/trian.jsonl`,
/// `runs/x`). Asking the Hub for it would only add a wait and a confusing error.
fn looks_local(p: &str) -> bool {
    const EXTENSIONS: [&str; 9] = [
        "jsonl",
        "json",
        "parquet",
        "arrow",
        "csv",
        "txt",
        "gguf",
        "safetensors",
        "yaml",
    ];
    let path = Path::new(p);
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let first = p.split('/').next().unwrap_or_default();
    extension.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) || Path::new(first).is_dir()
}

/// A YAML file with `key.path=value` overrides applied, into `T`; errors name the file and
/// the key (or line).
pub(crate) fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let value: Value = serde_yaml::from_str(&text).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        key: e.location().map(|l| format!("line {}", l.line())).unwrap_or_default(),
        message: e.to_string(),
    })?;
    with_overrides(value, path, overrides)
}

/// A config from `file` (YAML) or, without one, from the overrides alone (a command given
/// as flags), and the name its errors give as the file (`(command line)` without one).
pub(crate) fn read_file_or_flags<T: serde::de::DeserializeOwned>(
    file: Option<&Path>,
    overrides: &[String],
) -> Result<(T, PathBuf)> {
    match file {
        Some(path) => Ok((read_yaml(path, overrides)?, path.to_path_buf())),
        None => {
            let origin = PathBuf::from("(command line)");
            let empty = Value::Mapping(Default::default());
            Ok((with_overrides(empty, &origin, overrides)?, origin))
        }
    }
}

/// `value` (read from `path`, for the errors) with `key.path=value` overrides applied, into `T`.
pub(crate) fn with_overrides<T: serde::de::DeserializeOwned>(mut value: Value, path: &Path, overrides: &[String]) -> Result<T> {
    for o in overrides {
        apply_override(&mut value, o).map_err(|message| Error::Config {
            file: path.to_path_buf(),
            key: format!("--set {o}"),
            message,
        })?;
    }
    serde_path_to_error::deserialize(value).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        key: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// `~/` at the start of a path means the home directory, as in a shell.
pub(crate) fn expand_home(p: &str) -> String {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest).display().to_string(),
        _ => p.to_string(),
    }
}

/// `a.b.c=value`: sets a key (creating maps on the way); the value is parsed as YAML, so
/// numbers, booleans and lists keep their types.
fn apply_override(root: &mut Value, spec: &str) -> std::result::Result<(), String> {
    let (path, raw) = spec.split_once('=').ok_or("expected KEY.PATH=VALUE")?;
    let value: Value = serde_yaml::from_str(raw).map_err(|e| format!("value: {e}"))?;
    let mut node = root;
    let keys: Vec<&str> = path.split('.').collect();
    for (i, key) in keys.iter().enumerate() {
        if key.is_empty() {
            return Err("empty key".into());
        }
        if !node.is_mapping() {
            if node.is_null() {
                *node = Value::Mapping(Default::default());
            } else {
                return Err(format!("{} is not a section", keys[..i].join(".")));
            }
        }
        let map = node.as_mapping_mut().expect("a mapping");
        let k = Value::String(key.to_string());
        if i + 1 == keys.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_keep_yaml_types() {
        let mut v: Value = serde_yaml::from_str("training: {learning_rate: 1.0}\ndata: {path: a}").unwrap();
        apply_override(&mut v, "training.learning_rate=1e-4").unwrap();
        apply_override(&mut v, "data.path=other.jsonl").unwrap();
        apply_override(&mut v, "adapter.target_modules=[q_proj, v_proj]").unwrap();
        assert_eq!(v["training"]["learning_rate"].as_f64(), Some(1e-4));
        assert_eq!(v["data"]["path"].as_str(), Some("other.jsonl"));
        assert_eq!(v["adapter"]["target_modules"][1].as_str(), Some("v_proj"));
        assert!(apply_override(&mut v, "data.path.x=1").is_err());
    }
}
