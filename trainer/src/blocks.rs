//! Activation checkpointing per decoder block (`training.gradient_checkpointing: true`), as
//! transformers' `gradient_checkpointing_enable()` does it: the forward keeps only each block's
//! input, outside the autodiff graph; after the loss's backward, each block runs again, last
//! first, with a graph of its own, and its output gradient flows back through it alone. The
//! activations held drop from every block's to one block's (plus the block inputs), for about
//! one more forward of compute.

use std::cell::RefCell;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Int, Tensor};
use temper_models::{ForwardOptions, LlamaForCausalLM};

/// How a training forward computes the final hidden states: [`plain`], or
/// [`Checkpointed::forward_hidden`].
pub(crate) type HiddenFn<'a, B> =
    &'a dyn Fn(&LlamaForCausalLM<B>, Tensor<B, 2, Int>, ForwardOptions<B>) -> Tensor<B, 3>;

/// The usual forward: every block's activations stay in the graph until the backward.
pub(crate) fn plain<B: Backend>(
    model: &LlamaForCausalLM<B>,
    input_ids: Tensor<B, 2, Int>,
    options: ForwardOptions<B>,
) -> Tensor<B, 3> {
    model.forward_hidden(input_ids, options, None)
}

/// One checkpointed forward, kept until [`Checkpointed::gradients`].
struct Saved<B: AutodiffBackend> {
    input_ids: Tensor<B, 2, Int>,
    options: ForwardOptions<B>,
    /// Each block's input, outside the graph.
    inputs: Vec<Tensor<B::InnerBackend, 3>>,
    /// Seeds block `i` ran with (`seed + i`), so that the second run draws the same dropout.
    seed: u64,
    /// The last block's output, as the leaf the rest of the loss's graph starts from.
    last: Tensor<B, 3>,
}

/// The checkpointed forwards of one micro-batch's loss.
pub(crate) struct Checkpointed<B: AutodiffBackend> {
    saved: RefCell<Vec<Saved<B>>>,
}

impl<B: AutodiffBackend> Checkpointed<B> {
    pub fn new() -> Self {
        Self {
            saved: RefCell::new(Vec::new()),
        }
    }

    /// Final hidden states, as [`plain`] computes them, with only the last norm in the graph.
    pub fn forward_hidden(
        &self,
        model: &LlamaForCausalLM<B>,
        input_ids: Tensor<B, 2, Int>,
        options: ForwardOptions<B>,
    ) -> Tensor<B, 3> {
        let device = input_ids.device();
        // One draw from the step's seeded stream, so that steps and micro-batches differ.
        let seed = Tensor::<B::InnerBackend, 1, Int>::random([1], Distribution::Uniform(0.0, 1e9), &device)
            .into_scalar()
            .elem::<i64>() as u64;
        // burn keeps the graph of an op whose inputs include a tracked parameter even after its
        // output is dropped (it goes only when a backward reaches those parameters), so the
        // first run uses the parameters untracked: no graph at all, dropout still on.
        let untracked = model.clone().no_grad();
        let (x, layer_inputs) = untracked.embed(input_ids.clone(), options.clone(), 0);
        let mut x = x.inner();
        let mut inputs = Vec::with_capacity(model.num_layers());
        for i in 0..model.num_layers() {
            inputs.push(x.clone());
            B::seed(&device, seed + i as u64);
            x = untracked.layer(i, Tensor::from_inner(x), &layer_inputs, None).inner();
        }
        let last = Tensor::from_inner(x).require_grad();
        self.saved.borrow_mut().push(Saved {
            input_ids,
            options,
            inputs,
            seed,
            last: last.clone(),
        });
        model.model.norm.forward(last)
    }

    /// The parameter gradients of the whole model, from `grads` (the loss's backward, which
    /// stopped at the last block's output) and one backward per block.
    pub fn gradients(&self, model: &LlamaForCausalLM<B>, grads: B::Gradients) -> GradientsParams {
        let mut total = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        for saved in self.saved.take() {
            let Some(mut grad) = saved.last.grad(&grads) else {
                continue;
            };
            let device = saved.last.device();
            let (x0, layer_inputs) = model.embed(saved.input_ids, saved.options, 0);
            for (i, input) in saved.inputs.into_iter().enumerate().rev() {
                B::seed(&device, saved.seed + i as u64);
                let x = Tensor::<B, 3>::from_inner(input).require_grad();
                let y = model.layer(i, x.clone(), &layer_inputs, None);
                let mut block = (y * Tensor::from_inner(grad)).sum().backward();
                grad = x.grad(&block).expect("a block's input requires its gradient");
                total.accumulate(model, GradientsParams::from_module(&mut block, &model.model.layers[i]));
            }
            // A trainable embedding (full fine-tuning): its gradient through the first block.
            if model.model.embed_tokens.val().is_require_grad() {
                let mut embed = (x0 * Tensor::from_inner(grad)).sum().backward();
                total.accumulate(model, GradientsParams::from_module(&mut embed, model));
            }
        }
        // The final norm and the head (and a tied embedding's use there).
        total.accumulate(model, GradientsParams::from_grads(grads, model));
        total.grads()
    }
}
