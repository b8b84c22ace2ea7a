//! Throughput of SmolLM2-135M on the CPU backend this binary was built with.
//!
//!     cargo bench --bench forward [--no-default-features --features flex] -- MODE BATCH SEQ ITERS
//!
//! MODE `forward`: inference forward (logits for every position).
//! MODE `train`: forward + cross-entropy + backward through every weight (the work of a full
//! fine-tuning step, minus the optimizer), on burn's autodiff backend.
//! MODE `lora-train`: the same with the base frozen and LoRA r=16 (alpha 32) on every linear
//! layer, the work of a LoRA SFT step minus the optimizer.
//! `benches/run-forward.sh` runs both backends and PyTorch side by side.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use temper::backend::CpuBackend;
use temper_models::{ForwardOptions, LlamaForCausalLM, ModelConfig, gguf};

fn load<B: Backend>(path: &str, device: &B::Device) -> LlamaForCausalLM<B> {
    let file = gguf::Gguf::open(path).expect("open GGUF");
    let config: ModelConfig = gguf::config_from_gguf(&file).expect("config");
    let source = gguf::GgufSource::new(&file, &config).expect("source");
    LlamaForCausalLM::load(&config, &source, device, DType::F32).expect("load")
}

fn inputs<B: Backend>(batch: usize, seq: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    // Deterministic pseudo-text ids (same formula as forward_torch.py).
    let ids: Vec<i64> = (0..batch * seq).map(|i| ((i * 7919 + 13) % 49152) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("forward");
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, iters) = (num(2, 2), num(3, 256), num(4, 3));
    let path = std::env::var("TEMPER_SMOLLM2_GGUF").unwrap_or_else(|_| {
        format!(
            "{}/.cache/temper/SmolLM2-135M-Instruct.Q4_1.gguf",
            std::env::var("HOME").unwrap()
        )
    });
    let backend = if cfg!(feature = "ndarray") {
        "ndarray+openblas"
    } else {
        "flex"
    };
    let tokens = (batch * seq) as f64;
    let mut times = Vec::new();
    match mode {
        "forward" => {
            type B = CpuBackend;
            let device = Default::default();
            let model = load::<B>(&path, &device);
            for i in 0..=iters {
                let t = Instant::now();
                let logits = model.forward(inputs::<B>(batch, seq, &device), ForwardOptions::default(), None);
                let _ = logits.sum().into_scalar();
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64()); // the first run warms up
                }
            }
        }
        "train" | "lora-train" => {
            type B = Autodiff<CpuBackend>;
            let device = Default::default();
            let model = load::<B>(&path, &device);
            let model = if mode == "lora-train" {
                let lora = temper_peft::LoraConfig {
                    r: 16,
                    lora_alpha: 32.0,
                    target_modules: temper_peft::TargetModules::AllLinear,
                    ..Default::default()
                };
                temper_peft::inject(model, &lora, 0).expect("inject").0
            } else {
                model
            };
            for i in 0..=iters {
                let t = Instant::now();
                let ids = inputs::<B>(batch, seq, &device);
                let logits = model.forward(ids.clone(), ForwardOptions::default(), None);
                let [b, s, v] = logits.dims();
                let targets = ids.slice([0..b, 1..s]).unsqueeze_dim::<3>(2);
                let lp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]), 2);
                let loss = lp.gather(2, targets).mean().neg();
                let grads = loss.backward();
                drop(grads);
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
        }
        other => panic!("unknown mode {other} (forward | train | lora-train)"),
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "temper/{backend:<17} {mode:<8} batch {batch} x {seq}: median {median:.3} s/iter, {:.0} tokens/s",
        tokens / median
    );
}
