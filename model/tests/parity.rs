//! Parity with HF transformers + PEFT on small random-init checkpoints
//! (`model/fixtures/make_parity.py` made them): logits, a PEFT adapter's logits, its loss and
//! every LoRA gradient.

use bft_engine::{DType, Device, Tape, Tensor};
use bft_model::{ModelConfig, SafetensorsDir, Transformer, WeightSource};
use std::path::{Path, PathBuf};

const CASES: [&str; 3] = ["llama_gqa_untied", "llama_odd_tied", "qwen2_bias_tied"];

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/parity")
        .join(case)
}

fn load(case: &str) -> Transformer {
    let d = dir(case).join("model");
    let cfg = ModelConfig::from_file(&d.join("config.json")).unwrap();
    Transformer::load(&SafetensorsDir::open(&d).unwrap(), cfg, DType::F32).unwrap()
}

fn reference(case: &str, name: &str) -> Vec<f32> {
    let file = SafetensorsDir::open_file(&dir(case).join("reference.safetensors")).unwrap();
    file.tensor(name).unwrap().unwrap().to_vec::<f32>().unwrap()
}

fn ids(case: &str) -> Tensor {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir(case).join("reference.json")).unwrap())
            .unwrap();
    let rows: Vec<Vec<u32>> = serde_json::from_value(v["ids"].clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), [b, t], &Device::Cpu).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn logits_match_hf_transformers() {
    for case in CASES {
        let got = load(case)
            .logits(&ids(case))
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let diff = max_diff(&got, &reference(case, "logits"));
        assert!(diff <= 1e-4, "{case}: max |logits diff| {diff:e}");
    }
}

/// HF's causal-LM loss: mean cross-entropy of position t predicting token t + 1.
fn shifted_ce(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, t, v) = (logits.dims()[0], logits.dims()[1], logits.dims()[2]);
    let z = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape([b * (t - 1), v])
        .unwrap();
    let all = ids.to_vec::<u32>().unwrap();
    let next: Vec<u32> = (0..b)
        .flat_map(|i| all[i * t + 1..(i + 1) * t].to_vec())
        .collect();
    let next = Tensor::from_vec(next, [b * (t - 1)], &Device::Cpu).unwrap();
    let mask = Tensor::ones([b * (t - 1)], DType::F32, &Device::Cpu).unwrap();
    z.cross_entropy(&next, &mask).unwrap()
}

#[test]
fn peft_adapter_logits_loss_and_lora_gradients_match() {
    for case in CASES {
        let mut m = load(case);
        let cfg = m.load_peft(&dir(case).join("adapter")).unwrap();
        assert_eq!((cfg.rank, cfg.alpha, cfg.targets.len()), (4, 8.0, 7));
        let tape = Tape::new();
        for t in m.lora_tensors_mut() {
            *t = tape.track(t);
        }
        let ids = ids(case);
        let logits = m.logits(&ids).unwrap();
        let diff = max_diff(
            &logits.to_vec::<f32>().unwrap(),
            &reference(case, "lora_logits"),
        );
        assert!(diff <= 1e-4, "{case}: adapter logits differ by {diff:e}");
        let loss = shifted_ce(&logits, &ids);
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir(case).join("reference.json")).unwrap(),
        )
        .unwrap();
        let want_loss = v["lora_loss"].as_f64().unwrap();
        assert!(
            (loss.to_scalar().unwrap() - want_loss).abs() < 1e-5,
            "{case}: loss {} vs {want_loss}",
            loss.to_scalar().unwrap()
        );
        let grads = tape.backward(&loss).unwrap();
        let reference =
            SafetensorsDir::open_file(&dir(case).join("lora_grads.safetensors")).unwrap();
        let mut checked = 0;
        for (name, t) in m.lora_tensors() {
            let want = reference
                .tensor(&name)
                .unwrap()
                .unwrap_or_else(|| panic!("{case}: no reference for {name}"));
            let (g, w) = (
                grads.get(t).unwrap().to_vec::<f32>().unwrap(),
                want.to_vec::<f32>().unwrap(),
            );
            let scale = w.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-6);
            let rel = max_diff(&g, &w) / scale;
            assert!(
                rel <= 1e-4,
                "{case}: {name} gradient differs (relative {rel:e})"
            );
            checked += 1;
        }
        assert_eq!(checked, 28, "{case}: every LoRA factor of both layers");
        // With BFT_WRITE_ADAPTER=1, write a bft-trained-style adapter (perturbed factors) and its
        // logits for make_parity.py --check-bft-adapter to load with PEFT.
        if std::env::var_os("BFT_WRITE_ADAPTER").is_some() {
            let mut m = load(case);
            m.load_peft(&dir(case).join("adapter")).unwrap();
            for (i, t) in m.lora_tensors_mut().into_iter().enumerate() {
                *t = t
                    .add(
                        &Tensor::randn(t.dims().to_vec(), 0.05, i as u64, DType::F32, &Device::Cpu)
                            .unwrap(),
                    )
                    .unwrap();
            }
            let out = dir(case).join("bft_adapter");
            m.save_peft(&cfg, "parity fixture", &out).unwrap();
            let logits = m.logits(&ids).unwrap();
            bft_model::weights::write_safetensors(
                &out.join("bft_logits.safetensors"),
                &[("logits".into(), &logits)],
            )
            .unwrap();
        }
    }
}
