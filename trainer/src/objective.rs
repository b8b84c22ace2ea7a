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
use crate::job::ObjectiveSpec;
use crate::kto::kto_step_loss;
use crate::preference::{PreferenceObjective, preference_step_loss};
use crate::reward::reward_step_loss;
use crate::step::{Metric, StepSums};

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

    /// The summed (not yet divided) loss of one micro-batch, with its metrics added to `sums`;
    /// `None` when it has nothing to learn from. `reference` gives a preference or unpaired
    /// batch's reference log-probabilities (`Reference::logps`), or `None` without a reference.
    pub(crate) fn micro_batch<B: Backend>(
        &self,
        model: &LlamaForCausalLM<B>,
        hidden: HiddenFn<B>,
        batch: &Batch,
        reference: impl FnOnce(&Batch) -> Result<Option<Tensor<B, 1>>>,
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
                b,
                *params,
                device,
                sums,
            )),
            (Loss::Reward(params), Batch::Preference(b)) => {
                Some(reward_step_loss(model, hidden, b, *params, device, sums))
            }
            _ => unreachable!("checked before training: the objective fits the data"),
        };
        if let Some(loss) = &loss {
            sums.add(Metric::Loss, loss.clone().into_scalar().elem::<f32>() as f64);
        }
        Ok(loss)
    }
}
