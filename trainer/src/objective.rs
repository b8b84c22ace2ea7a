//! The objective a job trains, as the loop sees it: a micro-batch in, its summed loss and its
//! metrics out. A new objective is a variant here (and its loss, a pure function, in
//! `temper-trl`); the loop does not change.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use temper_data::Batch;
use temper_models::LlamaForCausalLM;

use crate::blocks::HiddenFn;
use crate::error::Result;
use crate::forward::sft_loss;
use crate::grpo::grpo_step_loss;
use crate::job::ObjectiveSpec;
use crate::kto::{gathered_kl, kto_step_loss, local_kl};
use crate::preference::{PreferenceObjective, preference_step_loss};
use crate::reward::reward_step_loss;
use crate::step::{Metric, StepSums};
use crate::sync::Collective;

#[derive(Debug, Clone)]
pub(crate) enum Loss {
    /// Next-token cross-entropy over the target tokens.
    Sft,
    /// DPO (and its loss types), SimPO, ORPO over chosen/rejected pairs.
    Preference(PreferenceObjective),
    /// KTO over unpaired completions.
    Kto(temper_trl::KtoParams),
    /// A reward model's Bradley-Terry loss over chosen/rejected pairs.
    Reward(temper_trl::RewardParams),
    /// GRPO's clipped policy-gradient loss over generated completions, their log-probabilities
    /// read at the sampling `temperature`.
    Grpo {
        params: temper_trl::GrpoParams,
        temperature: f64,
    },
}

impl Loss {
    pub(crate) fn new(objective: &ObjectiveSpec) -> Self {
        let preference = match objective {
            ObjectiveSpec::Sft => return Loss::Sft,
            ObjectiveSpec::Dpo(d) => PreferenceObjective::Dpo(d.params()),
            ObjectiveSpec::Simpo(s) => PreferenceObjective::Simpo(s.params()),
            ObjectiveSpec::Orpo(o) => PreferenceObjective::Orpo { beta: o.beta },
            ObjectiveSpec::Kto(k) => return Loss::Kto(k.params()),
            ObjectiveSpec::Reward(r) => return Loss::Reward(r.params()),
            ObjectiveSpec::Grpo(g) => {
                return Loss::Grpo {
                    params: g.params(),
                    temperature: g.temperature,
                };
            }
        };
        Loss::Preference(preference)
    }

    /// The sums a step starts from. SFT's loss and accuracy are there even on a worker whose
    /// micro-batches had no target token, so every step logs them.
    pub(crate) fn empty_sums(&self) -> StepSums {
        let mut sums = StepSums::default();
        if let Loss::Sft = self {
            sums.add(Metric::Loss, 0.0);
            sums.add(Metric::MeanTokenAccuracy, 0.0);
        }
        sums
    }

    /// What a step's micro-batches need before their losses: each one's reference
    /// log-probabilities (`None` without a reference) and KTO's KL estimate (0 otherwise),
    /// averaged over the workers as TRL gathers it (one all-reduce per step, `slots` wide, on
    /// every worker). `model` is the policy, untracked (`no_grad`: in training its LoRA dropout
    /// still applies, as TRL's `no_grad` KL pass keeps train mode).
    pub(crate) fn prepare<B: Backend>(
        &self,
        model: &LlamaForCausalLM<B>,
        batches: &[Batch],
        reference: impl Fn(&Batch) -> Result<Option<Tensor<B, 1>>>,
        slots: usize,
        collective: Option<&dyn Collective>,
        device: &B::Device,
    ) -> Result<Vec<(Option<Tensor<B, 1>>, f64)>> {
        let mut references = Vec::with_capacity(batches.len());
        let mut local = Vec::with_capacity(batches.len());
        for batch in batches {
            let r = reference(batch)?;
            local.push(match (batch, &r) {
                (Batch::Unpaired(b), Some(r)) => local_kl(model, b, r, device),
                _ => None,
            });
            references.push(r);
        }
        let kls = match self {
            Loss::Kto(p) if p.loss_type.uses_kl() => {
                gathered_kl(&local, slots, collective).map_err(|source| crate::error::Error::Collective {
                    rank: collective.map_or(0, |c| c.rank()),
                    source,
                })?
            }
            _ => vec![0.0; batches.len()],
        };
        Ok(references.into_iter().zip(kls).collect())
    }

    /// The summed (not yet divided) loss of one micro-batch, with its metrics added to `sums`;
    /// `None` when it has nothing to learn from. `reference` gives a preference or unpaired
    /// batch's reference log-probabilities (`Reference::logps`), or `None` without a reference;
    /// `kl` is KTO's KL estimate of this micro-batch (`kto::gathered_kl`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn micro_batch<B: Backend>(
        &self,
        model: &LlamaForCausalLM<B>,
        hidden: HiddenFn<B>,
        batch: &Batch,
        reference: impl FnOnce(&Batch) -> Result<Option<Tensor<B, 1>>>,
        kl: f64,
        device: &B::Device,
        sums: &mut StepSums,
    ) -> Result<Option<Tensor<B, 1>>> {
        let loss = match (self, batch) {
            (Loss::Sft, Batch::Sft(b)) => sft_loss(model, hidden, b, device).map(|l| {
                sums.add(Metric::MeanTokenAccuracy, l.correct.into_scalar().elem::<i64>() as f64);
                l.sum
            }),
            (Loss::Preference(objective), Batch::Preference(b)) => Some(preference_step_loss(
                model,
                hidden,
                reference(batch)?,
                b,
                objective,
                device,
                sums,
            )),
            (Loss::Kto(params), Batch::Unpaired(b)) => Some(kto_step_loss(
                model,
                hidden,
                reference(batch)?.expect("KTO always has a reference (ObjectiveSpec::reference)"),
                kl,
                b,
                *params,
                device,
                sums,
            )),
            (Loss::Reward(params), Batch::Preference(b)) => {
                Some(reward_step_loss(model, hidden, b, *params, device, sums))
            }
            (Loss::Grpo { params, temperature }, Batch::Rollout(b)) => Some(grpo_step_loss(
                model,
                hidden,
                b,
                params,
                *temperature,
                device,
                sums,
            )),
            _ => unreachable!("checked before training: the objective fits the data"),
        };
        if let Some(loss) = &loss {
            sums.add(Metric::Loss, loss.clone().into_scalar().elem::<f32>() as f64);
        }
        Ok(loss)
    }
}
