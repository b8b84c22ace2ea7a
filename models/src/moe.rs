//! Mixture-of-experts routing shared by the decoder (which routes) and the trainer (which adds
//! the load-balancing loss): top-k choice per token, and the routing of a forward, recorded on
//! demand.

use std::any::Any;
use std::cell::RefCell;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

/// Each row's `k` largest values' indices, largest first; ties go to the lower index (as
/// `torch.topk` orders them on the CPU).
///
/// # Panics
/// If `values` is not a whole number of rows of `width` or `k > width` (programmer errors).
pub fn top_k_rows(values: &[f32], width: usize, k: usize) -> Vec<usize> {
    assert!(k <= width && values.len().is_multiple_of(width), "top {k} of rows of {width}");
    let mut out = Vec::with_capacity(values.len() / width * k);
    let mut order: Vec<usize> = Vec::with_capacity(width);
    for row in values.chunks_exact(width) {
        order.clear();
        order.extend(0..width);
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        out.extend_from_slice(&order[..k]);
    }
    out
}

/// How one MoE layer routed one forward's tokens.
pub struct Routing<B: Backend> {
    /// `[tokens, experts]`, the router's softmax in f32, in the autodiff graph.
    pub probs: Tensor<B, 2>,
    /// `[tokens * top_k]`: each token's chosen experts, most probable first.
    pub chosen: Vec<usize>,
}

/// One MoE layer's routing in one forward, with which rows are real tokens.
pub struct RecordedRouting<B: Backend> {
    pub routing: Routing<B>,
    /// `[tokens]`, 1 for real tokens and 0 for padding; `None`: every row counts.
    pub valid: Option<Tensor<B, 1>>,
}

thread_local! {
    /// The routings recorded by [`record_routing`] (type-erased: the backend is generic),
    /// `None` when nothing records.
    static RECORDED: RefCell<Option<Vec<Box<dyn Any>>>> = const { RefCell::new(None) };
}

/// Runs `f` and returns, with its result, the routing of every MoE layer that ran in it on this
/// thread, in order (the trainer's forward, for the load-balancing loss).
pub fn record_routing<B: Backend, R>(f: impl FnOnce() -> R) -> (R, Vec<RecordedRouting<B>>) {
    let outer = RECORDED.with(|r| r.borrow_mut().replace(Vec::new()));
    let result = f();
    let recorded = RECORDED.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer)).unwrap_or_default();
    let routings = recorded
        .into_iter()
        .filter_map(|b| b.downcast::<RecordedRouting<B>>().ok().map(|b| *b))
        .collect();
    (result, routings)
}

/// Whether a [`record_routing`] is running on this thread.
pub(crate) fn recording() -> bool {
    RECORDED.with(|r| r.borrow().is_some())
}

/// Adds one layer's routing to the running record (when there is one).
pub(crate) fn record<B: Backend>(routing: RecordedRouting<B>) {
    RECORDED.with(|r| {
        if let Some(v) = r.borrow_mut().as_mut() {
            v.push(Box::new(routing));
        }
    });
}

/// The Switch Transformer load-balancing loss, as transformers' `load_balancing_loss_func`:
/// over every layer's rows together (padding left out), `experts · Σₑ fₑ · Pₑ`, with `fₑ` the
/// top-`k` choices that went to expert `e` per row (a count outside the graph; the `fₑ` sum to
/// `k`, as transformers counts them) and `Pₑ` its mean router probability. It uses the forward's
/// own softmax and choices (transformers computes them again from the logits, to the same
/// values). `None` without records.
pub fn load_balancing_loss<B: Backend>(records: &[RecordedRouting<B>]) -> Option<Tensor<B, 1>> {
    let [_, experts] = records.first()?.routing.probs.dims();
    let device = records[0].routing.probs.device();
    let mut counts = vec![0f32; experts];
    let mut rows = 0f32;
    let mut prob_sum: Option<Tensor<B, 1>> = None;
    for r in records {
        let Routing { probs, chosen } = &r.routing;
        let tokens = probs.dims()[0];
        let valid: Vec<f32> = match &r.valid {
            Some(v) => v.clone().into_data().convert::<f32>().to_vec().expect("f32 mask"),
            None => vec![1.0; tokens],
        };
        for (t, chosen) in chosen.chunks_exact(chosen.len() / tokens).enumerate() {
            for &e in chosen {
                counts[e] += valid[t];
            }
        }
        rows += valid.iter().sum::<f32>();
        let weighted = match &r.valid {
            Some(v) => probs.clone() * v.clone().cast(DType::F32).unsqueeze_dim::<2>(1),
            None => probs.clone(),
        };
        let sum = weighted.sum_dim(0).reshape([experts]);
        prob_sum = Some(match prob_sum {
            Some(p) => p + sum,
            None => sum,
        });
    }
    let counts = Tensor::<B, 1>::from_data(TensorData::new(counts, [experts]), (&device, DType::F32));
    let rows = rows.max(1.0);
    Some((counts * prob_sum?).sum().mul_scalar(experts as f64 / (rows as f64 * rows as f64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_takes_the_largest_first_and_breaks_ties_low() {
        assert_eq!(top_k_rows(&[0.1, 0.5, 0.2, 0.5, 0.3, 0.0, 0.9, 0.1], 4, 2), vec![1, 3, 2, 0]);
    }
}
